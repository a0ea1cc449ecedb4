"""The ``winograd_conv`` pass: 3×3, stride-1 convolutions with constant weights → Winograd F(m, 3).

    before: %w = get_attr[conv.weight]
            %y = aten.convolution(%x, %w, %b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    after:  %U = get_attr[_winograd_U_0]        # G g Gᵀ, computed once here in float64
            %y = fxforge.winograd_conv2d(%x, %U, %b, 4, "0 2/3 -2/3 8/5 -8/5", 1, "G")

Point sets come from the verified library (passes/winograd/pointsets.json), chosen for the input's
dtype by fp16/bf16 error. Other convolutions (strided, dilated, grouped, transposed, non-3×3,
non-constant weights) are left alone. Opt-in (not in the default pipeline): on the H100 the current
unfused kernels are slower than cuDNN and, in fp16, ~4.5× less accurate (benchmarks/results/winograd_gpu.md).
"""
from __future__ import annotations

import torch
from fxforge.pipeline import Pass
from fxforge.registry import registry
from torch import fx

aten = torch.ops.aten


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


@registry.register_pass
class WinogradConv(Pass):
    name = "winograd_conv"

    def call(self, gm: fx.GraphModule) -> bool:
        from fxforge.runtime.winograd import filter_transform

        from .winograd import library

        m = int(self.options.get("m", 4))
        modified = False
        for node in list(gm.graph.nodes):
            if node.target is not aten.convolution.default:
                continue
            x, w, b, stride, padding, dilation, transposed, _, groups = node.args
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                continue
            weight = getattr(gm, w.target)
            pad = _pair(padding)
            if (weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3) or _pair(stride) != (1, 1)
                    or _pair(dilation) != (1, 1) or transposed or groups != 1 or pad[0] != pad[1]):
                continue
            dtype = {torch.bfloat16: "bf16"}.get(weight.dtype, "fp16")
            entry = library.found(m, 3, "error", dtype)
            transform = entry.transform()
            attr = f"_winograd_U_{len([n for n in gm.graph.nodes if str(n.target).startswith('_winograd_U_')])}"
            gm.register_buffer(attr, filter_transform(weight.detach(), transform))
            with gm.graph.inserting_before(node):
                u = gm.graph.get_attr(attr)
                new = gm.graph.call_function(torch.ops.fxforge.winograd_conv2d.default,
                                             (x, u, b, m, " ".join(transform.points_str()), pad[0], transform.scaling))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        return modified
