"""Winograd conv2d in torch, with fp16 / bf16 rounding emulated, for model-level fidelity on CPU.

This is the numerical reference for the future Triton pass, not a fast kernel: it tiles an NCHW
input (stride 1, dilation 1, groups 1, any padding, any r x r kernel), applies
Y = A^T [(G g G^T) * (B^T d B)] A per tile with the channel reduction done as a batched matmul over
the alpha^2 tile positions (the same structure as the GPU plan), and crops the last partial tiles.

Precision follows emulate.PrecisionModel ("stage" or "tc"; `dtype=None` runs exactly in float64):
values are rounded to the dtype with torch casts (round-to-nearest-even, fp16 overflow -> inf) at
the same points as the numpy tile emulator, and arithmetic between rounding points is float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .construct import Transform
from .emulate import canon_dtype, get_model

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def rounder(dtype: str | None):
    """x -> x rounded to `dtype`, kept in float32 (identity when dtype is None)."""
    if dtype is None:
        return lambda x: x
    td = TORCH_DTYPES[canon_dtype(dtype)]
    return lambda x: x.to(td).to(torch.float32)


def _check(w: torch.Tensor, t: Transform):
    if w.shape[-1] != t.r or w.shape[-2] != t.r:
        raise ValueError(f"{t.name} needs a {t.r}x{t.r} kernel, got {tuple(w.shape[-2:])}")


def _sandwich(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M X M^T over the last two axes, as two large GEMMs (a 2-D right operand lets torch fold all
    batch axes into one matmul, instead of ~1e5 tiny batched ones)."""
    Y = X.contiguous() @ M.T
    return (Y.transpose(-1, -2).contiguous() @ M.T).transpose(-1, -2)


def winograd_conv2d(x: torch.Tensor, w: torch.Tensor, t: Transform, bias: torch.Tensor | None = None,
                    padding: int = 0, dtype: str | None = None, model="stage") -> torch.Tensor:
    """conv2d(x, w, bias, stride=1, padding=padding) by Winograd F(m x m, r x r)."""
    _check(w, t)
    pm = get_model(model)
    if pm.native_accum:
        raise NotImplementedError("the 'native' (fp16-accumulation) model is only in the numpy tile emulator")
    m, r, a = t.m, t.r, t.alpha
    exact = dtype is None
    cdt = torch.float64 if exact else torch.float32
    rd = rounder(dtype)
    N, C, H, W = x.shape
    K = w.shape[0]
    Ho, Wo = H + 2 * padding - r + 1, W + 2 * padding - r + 1
    nh, nw = -(-Ho // m), -(-Wo // m)
    # pad so that nh*m + r - 1 rows exist: the extra zeros only feed outputs that are cropped
    xp = F.pad(x.to(cdt), (padding, nw * m + r - 1 - W - padding, padding, nh * m + r - 1 - H - padding))
    AT64, G64, BT64 = (torch.tensor(M, dtype=torch.float64) for M in t.numpy())
    consts = [M.to(cdt) for M in (AT64, G64, BT64)]
    if not exact and pm.round_constants:
        consts = [rd(M) for M in consts]
    AT, G, BT = consts
    d = rd(xp).unfold(2, a, m).unfold(3, a, m)                        # (N, C, nh, nw, a, a)
    V = rd(_sandwich(BT, d))
    if not exact and pm.filter_exact:
        U = rd(_sandwich(G64, rd(w.to(cdt)).double()).to(cdt))         # compile-time filter transform
    else:
        U = rd(_sandwich(G, rd(w.to(cdt))))                            # (K, C, a, a)
    # batched GEMM over the a*a positions: (a*a, N*nh*nw, C) @ (a*a, C, K)
    Vb = V.permute(4, 5, 0, 2, 3, 1).reshape(a * a, N * nh * nw, C)
    Ub = U.permute(2, 3, 1, 0).reshape(a * a, C, K)
    Mb = torch.bmm(Vb, Ub).reshape(a, a, N, nh, nw, K).permute(2, 5, 3, 4, 0, 1)   # (N, K, nh, nw, a, a)
    if not exact and pm.round_M:
        Mb = rd(Mb)
    Y = rd(_sandwich(AT, Mb))                                          # (N, K, nh, nw, m, m)
    Y = Y.permute(0, 1, 2, 4, 3, 5).reshape(N, K, nh * m, nw * m)[:, :, :Ho, :Wo]
    if bias is not None:
        Y = rd(Y + rd(bias.to(cdt)).view(1, -1, 1, 1))
    return Y


def direct_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0,
                  dtype: str | None = None) -> torch.Tensor:
    """Direct conv2d with inputs/weights/output rounded to `dtype` and fp32 accumulation (what cuDNN
    does for fp16 by default); exact float64 when dtype is None."""
    rd = rounder(dtype)
    cdt = torch.float64 if dtype is None else torch.float32
    y = rd(F.conv2d(rd(x.to(cdt)), rd(w.to(cdt)), padding=padding))
    if bias is not None:
        y = rd(y + rd(bias.to(cdt)).view(1, -1, 1, 1))
    return y


def supports(w: torch.Tensor, stride=1, dilation=1, groups=1, r: int = 3) -> bool:
    """Which convolutions the Winograd rewrite applies to (the rest are left alone)."""
    s = (stride,) * 2 if isinstance(stride, int) else tuple(stride)
    dl = (dilation,) * 2 if isinstance(dilation, int) else tuple(dilation)
    return w.dim() == 4 and tuple(w.shape[-2:]) == (r, r) and s == (1, 1) and dl == (1, 1) and groups == 1
