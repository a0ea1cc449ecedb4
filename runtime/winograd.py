"""Winograd F(m×m, 3×3) convolution on the GPU (or the Triton interpreter): generated Triton
kernels for the input and output transforms around one batched GEMM over the α² tile positions.

    V[ξ, c, p] = (Bᵀ d_{c,p} B)[ξ]      input transform  (Triton; constants unrolled in the source)
    M[ξ]       = U[ξ] @ V[ξ]            U = G g Gᵀ, done once at build time; cuBLAS bmm (tensor cores)
    y[n,k,tile]= Aᵀ M_{k,p} A + bias    output transform (Triton)

Bytes model (fp16, N·C·H·W input x, K outputs, P = N·⌈H/m⌉·⌈W/m⌉ tiles, α = m + 2):
read x + write/read V (α²·C·P) + write/read M (α²·K·P) + write y. FLOPs of the GEMM: 2·α²·K·C·P,
(α/m)² / 9 of direct convolution's 2·9·K·C·H·W. Unfused, the V and M round trips dominate: this is
the baseline that a fused (transform-in-GEMM-prologue/epilogue) kernel must beat.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch

from .kernels import load_kernel


def _lin(coeffs, names) -> str:
    """Σ c·name with exact zeros skipped and ±1 written without a multiply."""
    terms = []
    for c, nm in zip(coeffs, names):
        c = float(c)
        if c == 0.0:
            continue
        terms.append(nm if c == 1.0 else f"-{nm}" if c == -1.0 else f"{c!r} * {nm}")
    return " + ".join(terms).replace("+ -", "- ") if terms else "0.0"


def _tile_prologue(chan: str, count: str, block: str, m: int, offset: str) -> list[str]:
    """Source lines shared by both transforms: a [BLOCK_<chan>, BLOCK_P] tile of (channel, tile p),
    its bounds mask, and p's image n and top-left corner (h0, w0)."""
    return [f"    {chan} = tl.program_id(1) * {block} + tl.arange(0, {block})[:, None]",
            "    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]",
            f"    ok = ({chan} < {count}) & (p < P)",
            "    n = p // (NH * NW)",
            f"    h0 = ((p // NW) % NH) * {m}{offset}",
            f"    w0 = (p % NW) * {m}{offset}"]


def input_transform_source(BT: np.ndarray, m: int, name: str) -> str:
    a = BT.shape[0]
    L = [f"@triton.jit\ndef {name}(x, v, C, H, W, NH, NW, P, pad, sxn, sxc, sxh, sxw, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):"]
    L += _tile_prologue("c", "C", "BLOCK_C", m, " - pad") + ["    base = x + n * sxn + c * sxc"]
    for i in range(a):
        for j in range(a):
            L.append(f"    d{i}_{j} = tl.load(base + (h0 + {i}) * sxh + (w0 + {j}) * sxw, mask=ok & (h0 + {i} >= 0) & (h0 + {i} < H)"
                     f" & (w0 + {j} >= 0) & (w0 + {j} < W), other=0.0).to(tl.float32)")
    for r in range(a):  # t = Bᵀ d
        for j in range(a):
            L.append(f"    t{r}_{j} = {_lin(BT[r], [f'd{i}_{j}' for i in range(a)])}")
    for r in range(a):  # V = t B
        for s in range(a):
            L.append(f"    tl.store(v + ({r * a + s} * C + c) * P + p, ({_lin(BT[s], [f't{r}_{j}' for j in range(a)])}).to(v.dtype.element_ty), mask=ok)")
    return "\n".join(L) + "\n"


def output_transform_source(AT: np.ndarray, m: int, name: str) -> str:
    a = AT.shape[1]
    L = [f"@triton.jit\ndef {name}(mm, y, bias, K, HO, WO, NH, NW, P, syn, syk, syh, syw, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):"]
    L += _tile_prologue("k", "K", "BLOCK_K", m, "") + [
        "    b = tl.load(bias + k, mask=k < K, other=0.0).to(tl.float32) if HAS_BIAS else 0.0"]
    for r in range(a):
        for s in range(a):
            L.append(f"    m{r}_{s} = tl.load(mm + ({r * a + s} * K + k) * P + p, mask=ok, other=0.0).to(tl.float32)")
    for i in range(m):  # s = Aᵀ M
        for s in range(a):
            L.append(f"    s{i}_{s} = {_lin(AT[i], [f'm{r}_{s}' for r in range(a)])}")
    for i in range(m):  # y = s A
        for j in range(m):
            L.append(f"    tl.store(y + n * syn + k * syk + (h0 + {i}) * syh + (w0 + {j}) * syw, ({_lin(AT[j], [f's{i}_{s}' for s in range(a)])} + b)"
                     f".to(y.dtype.element_ty), mask=ok & (h0 + {i} < HO) & (w0 + {j} < WO))")
    return "\n".join(L) + "\n"


def filter_transform(weight: torch.Tensor, transform) -> torch.Tensor:
    """U = G g Gᵀ for every (k, c), in float64, laid out [α², K, C] for the batched GEMM."""
    _, G, _ = transform.numpy()
    a = transform.alpha
    G64 = torch.tensor(G, dtype=torch.float64, device=weight.device)
    U = G64 @ weight.double() @ G64.T  # (K, C, α, α)
    return U.permute(2, 3, 0, 1).reshape(a * a, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


@functools.lru_cache(maxsize=64)
def transform_kernels(m: int, points: str, scaling: str, device_type: str, cache_dir: str):
    """(input kernel, output kernel, source, transform) for the exact, verified transform with
    these finite points (space-separated rationals) and Lagrange-scaling placement."""
    from fxforge.passes.winograd.construct import toom_cook
    from fxforge.passes.winograd.verify import require_verified

    transform = require_verified(toom_cook(m, 3, points.split(), scaling), dims=(1,))
    AT, _, BT = transform.numpy()
    tag = hashlib.sha256(np.concatenate([AT.ravel(), BT.ravel()]).tobytes()).hexdigest()[:10]
    src = "# fxforge Winograd transforms " + transform.name + " points " + " ".join(transform.points_str()) + " inf\n"
    src += "import triton\nimport triton.language as tl\n\n\n"
    src += input_transform_source(BT, m, f"wino_in_{tag}") + "\n\n" + output_transform_source(AT, m, f"wino_out_{tag}")
    k_in = load_kernel(f"wino_in_{tag}", src, device_type, cache_dir)
    k_out = load_kernel(f"wino_out_{tag}", src, device_type, cache_dir)
    return k_in, k_out, src, transform


def winograd_apply(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, m: int, points: str, padding: int,
                   scaling: str = "G", cache_dir: str | None = None) -> torch.Tensor:
    """conv2d(x, w, bias, padding) for U = filter_transform(w, transform(m, points, scaling))."""
    from fxforge.config import current

    k_in, k_out, _, _ = transform_kernels(m, points, scaling, x.device.type, cache_dir or current().cache_dir)
    N, C, H, W = x.shape
    a, K = m + 2, U.shape[1]
    HO, WO = H + 2 * padding - 2, W + 2 * padding - 2
    NH, NW = -(-HO // m), -(-WO // m)
    P = N * NH * NW
    V = torch.empty(a * a, C, P, device=x.device, dtype=x.dtype)
    bc, bp, bk = 32, 64, 32
    k_in[(-(-P // bp), -(-C // bc))](x, V, C, H, W, NH, NW, P, padding, *x.stride(), BLOCK_C=bc, BLOCK_P=bp)
    M = torch.bmm(U, V)  # (α², K, P): tensor cores, fp32 accumulation
    y = torch.empty(N, K, HO, WO, device=x.device, dtype=x.dtype)
    k_out[(-(-P // bp), -(-K // bk))](M, y, bias if bias is not None else y, K, HO, WO, NH, NW, P, *y.stride(),
                                      HAS_BIAS=bias is not None, BLOCK_K=bk, BLOCK_P=bp)
    return y


@torch.library.custom_op("fxforge::winograd_conv2d", mutates_args=())
def winograd_conv2d(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, m: int, points: str,
                    padding: int, scaling: str) -> torch.Tensor:
    """The graph-level op the ``winograd_conv`` pass writes: a 3×3 stride-1 convolution whose filter
    was transformed at compile time (U), run by this module's kernels."""
    return winograd_apply(x, U, bias, m, points, padding, scaling)


@winograd_conv2d.register_fake
def _(x, U, bias, m, points, padding, scaling):
    return x.new_empty((x.shape[0], U.shape[1], x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2))


class WinogradConv2d:
    """A 3×3, stride-1 convolution with fixed weights, run as Winograd F(m×m, 3×3).

    ``transform`` is an exact ``passes.winograd.construct.Transform`` (verified by the library);
    the filter transform U = G g Gᵀ happens here, once, in float64.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transform, padding: int, cache_dir: str | None = None):
        from fxforge.config import current

        self.m, self.padding, self.bias = transform.m, padding, bias
        self.points, self.scaling = " ".join(transform.points_str()), transform.scaling
        self.U = filter_transform(weight, transform)
        self.cache_dir = cache_dir or current().cache_dir
        self.source = transform_kernels(self.m, self.points, self.scaling, weight.device.type, self.cache_dir)[2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return winograd_apply(x, self.U, self.bias, self.m, self.points, self.padding, self.scaling, self.cache_dir)
