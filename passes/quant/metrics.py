"""Quantization error and storage metrics.

``sqnr_db`` is torchao's ``compute_error`` (20 log10 ||ref|| / ||ref - q||, written as 10 log10 of the energy
ratio) in float64. ``bytes_per_weight`` is the storage cost the kernels' bytes models use: codes (with the
K padding), block scales, zero points and the per-tensor scale, amortized per original weight element.
"""
from __future__ import annotations

import math

import torch

from .formats import SCALE_BYTES, QuantFormat, get_format

__all__ = ["bytes_per_weight", "sqnr_db"]


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB, in float64.
    ``inf`` for an exact match; ``-inf`` for a zero reference with a nonzero error."""
    if ref.shape != approx.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(approx.shape)}")
    r = ref.detach().double()
    sig = float((r * r).sum())
    err = float(((r - approx.detach().double().to(r.device)) ** 2).sum())
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def bytes_per_weight(fmt: QuantFormat | str, K: int, N: int | None = None) -> float:
    """Stored bytes per original weight element of an ``[N, K]`` weight in ``fmt``:
    ``(bits/8 * Kp + nb * (scale_bytes + zero_bytes)) / K + tensor_scale_bytes / (N * K)`` with Kp the padded K
    and nb the blocks per row. With ``N=None`` the per-tensor scale (4 bytes per tensor) is left out."""
    fmt = get_format(fmt)
    if K <= 0 or (N is not None and N <= 0):
        raise ValueError(f"K and N must be positive, got K={K}, N={N}")
    kp, nb = fmt.padded_k(K), fmt.n_blocks(K)
    per_row = fmt.bits / 8 * kp + nb * (SCALE_BYTES[fmt.scale] + (1 if fmt.zero_point else 0))
    total = per_row / K
    if fmt.tensor_scale and N is not None:
        total += 4.0 / (N * K)
    return total
