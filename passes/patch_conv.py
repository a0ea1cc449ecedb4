"""``patch_conv``: a convolution whose stride equals its kernel (ViT's patch embedding) -> one matmul.

With stride == kernel, no padding, dilation 1 and groups 1 the kernel windows tile the input without
overlap, so the convolution is exactly a matmul of the flattened patches with the flattened weight
(the same products, summed over the same C·kh·kw terms in fp32 by either library)::

    before: %y = aten.convolution(%x [N,C,H,W], %w [K,C,kh,kw], %b, [kh,kw], [0,0], [1,1], False, [0,0], 1)
    after:  %p = aten.reshape(aten.permute(aten.reshape(%x, [-1,C,Ho,kh,Wo,kw]), [0,2,4,1,3,5]), [-1, C·kh·kw])
            %m = aten.addmm(%b, %p, aten.permute(aten.reshape(%w, [K, C·kh·kw]), [1,0]))     # or aten.mm
            %y = aten.permute(aten.reshape(%m, [-1,Ho,Wo,K]), [0,3,1,2])                    # [N,K,Ho,Wo] view

Why: cuDNN runs ViT-B/16's 16x16/16 patch embedding (64 images, fp16) as an implicit GEMM at ~40
TFLOP/s plus two layout conversions: ~0.55 ms of a 6 ms forward on the H100
(benchmarks/results/profile_vit.md); the patch gather is one copy kernel (19 MB) and the GEMM goes to
the matmul lowering (cuBLAS / Triton, autotuned). The result is an NHWC-strided view of [N, K, Ho, Wo];
ViT's ``flatten(2).transpose(1, 2)`` then reads it without a copy. A convolution whose result is a
graph output gets a contiguous copy, so callers see eager's layout.

Left alone: other strides / paddings / dilations / groups, 1x1 kernels (cuDNN's NCHW 1x1 path needs
no layout change), H or W not a multiple of the kernel, symbolic C / H / W, non-float inputs.
"""
from __future__ import annotations

import torch
from fxforge.pipeline import Pass
from fxforge.registry import registry
from torch import fx

aten = torch.ops.aten


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _static(*vals) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in vals)


@registry.register_pass
class PatchConvToMatmul(Pass):
    """Non-overlapping (stride == kernel) convolutions as a patch gather + matmul (module docstring)."""

    name = "patch_conv"

    def call(self, gm: fx.GraphModule) -> bool:
        modified = False
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        outputs = set()
        fx.node.map_arg(out_node.args, outputs.add)
        for n in list(gm.graph.nodes):
            if n.target is not aten.convolution.default:
                continue
            x, w, b, stride, padding, dilation, transposed, _, groups = n.args
            xv, wv = x.meta.get("val"), w.meta.get("val") if isinstance(w, fx.Node) else None
            if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)) or xv.dim() != 4 or wv.dim() != 4:
                continue
            if not xv.dtype.is_floating_point or transposed or groups != 1:
                continue
            K, C, kh, kw = wv.shape
            _, C_in, H, W = xv.shape
            if not _static(K, C, kh, kw, C_in, H, W) or kh * kw == 1 or C != C_in:
                continue
            if _pair(stride) != (kh, kw) or _pair(padding) != (0, 0) or _pair(dilation) != (1, 1):
                continue
            if H % kh or W % kw:
                continue
            ho, wo, depth = H // kh, W // kw, C * kh * kw
            g = gm.graph
            with g.inserting_before(n):
                tiles = g.call_function(aten.reshape.default, (x, [-1, C, ho, kh, wo, kw]))
                tiles = g.call_function(aten.permute.default, (tiles, [0, 2, 4, 1, 3, 5]))
                patches = g.call_function(aten.reshape.default, (tiles, [-1, depth]))
                w2 = g.call_function(aten.reshape.default, (w, [K, depth]))
                wt = g.call_function(aten.permute.default, (w2, [1, 0]))
                if b is None:
                    mm = g.call_function(aten.mm.default, (patches, wt))
                else:
                    mm = g.call_function(aten.addmm.default, (b, patches, wt))
                nhwc = g.call_function(aten.reshape.default, (mm, [-1, ho, wo, K]))
                y = g.call_function(aten.permute.default, (nhwc, [0, 3, 1, 2]))
                if n in outputs:  # callers of the graph see eager's (contiguous) layout
                    y = g.call_function(aten.clone.default, (y,), {"memory_format": torch.contiguous_format})
            n.replace_all_uses_with(y)
            g.erase_node(n)
            modified = True
        return modified
