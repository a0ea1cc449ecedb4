"""Hadamard rotations for outlier mitigation before quantization (QuaRot / INT-vs-FP style).

For a linear layer ``y = x @ w.T`` with ``w [N, K]``, pick an orthogonal ``R [K, K]`` and use
``y = (x @ R) @ (w @ R).T``. Here ``R = blockdiag(D_b H_b, ..., D_b H_b)``: ``K / b`` copies of a ``b x b``
normalized Sylvester Hadamard matrix ``H_b`` (``H_b = H_b.T``, ``H_b @ H_b = I``), optionally preceded by a
diagonal of random signs ``D_b`` (the "random Hadamard" of QuaRot / the INT-vs-FP code, shared by all
blocks). ``block = b`` must be a power of two dividing K; ``block=None`` means one block of size K (K itself a
power of two). Rotation runs along the reduction axis K only, so it commutes with per-output-channel scales
and changes nothing for N.

* ``rotate_weight(w, block)``  = ``w @ R`` (done offline; dense per-block matmul in float64).
* ``rotate_activation(x, block)`` = ``x @ R`` along the last dim, computed with a fast Walsh-Hadamard
  transform (log2 b butterfly stages of adds/subtracts, then one multiply by 1/sqrt(b)); this is what a fused
  kernel prologue would do on each K-tile (a b=32 block fits one tile).

Sylvester ordering: ``H[i, j] = (-1)^popcount(i & j) / sqrt(n)`` -- the natural order an in-place FWHT gives.
"""
from __future__ import annotations

import math

import torch

__all__ = ["fwht", "hadamard_matrix", "random_signs", "rotate_activation", "rotate_weight", "rotation_matrix"]


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def _check_block(block: int, k: int) -> None:
    if not _is_pow2(block):
        raise ValueError(f"Hadamard block must be a power of two, got {block!r}")
    if k % block:
        raise ValueError(f"Hadamard block {block} does not divide the reduction dim K={k}; pad K or use a "
                         f"block that divides it")


def _resolve_block(block: int | None, k: int) -> int:
    if block is None:
        if not _is_pow2(k):
            raise ValueError(f"a full Hadamard rotation needs K to be a power of two, got K={k}; use a "
                             f"block-diagonal rotation (e.g. block=32)")
        return k
    _check_block(block, k)
    return block


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix ``[n, n]`` (symmetric, orthogonal); ``n`` a power of two."""
    if not _is_pow2(n):
        raise ValueError(f"Hadamard size must be a power of two, got {n!r}")
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def random_signs(n: int, seed: int = 0, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """A reproducible +-1 vector of length ``n`` (the ``D`` of a random Hadamard rotation)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype=dtype, device=device)


def _check_signs(signs: torch.Tensor | None, block: int) -> None:
    if signs is not None and signs.shape != (block,):
        raise ValueError(f"signs must have shape ({block},), got {tuple(signs.shape)}")


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Fast Walsh-Hadamard transform along the last dim (a power of two): ``x @ H`` (Sylvester order),
    scaled by 1/sqrt(n) if ``normalize``. log2(n) stages of (a + b, a - b) butterflies."""
    n = x.shape[-1]
    if not _is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two last dim, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    y = y.reshape(*lead, n)
    return y / math.sqrt(n) if normalize else y


def rotation_matrix(k: int, block: int | None, signs: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The dense ``[K, K]`` rotation ``R`` used by :func:`rotate_weight` / :func:`rotate_activation`."""
    b = _resolve_block(block, k)
    _check_signs(signs, b)
    hb = hadamard_matrix(b, torch.float64, device)
    if signs is not None:
        hb = signs.to(device=hb.device, dtype=torch.float64)[:, None] * hb
    return torch.block_diag(*([hb] * (k // b))).to(dtype)


def rotate_weight(w: torch.Tensor, block: int | None = 32, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``w @ R`` for a weight ``[N, K]`` (R as in the module docstring); computed in float64, returned in
    ``w.dtype``. ``block=None`` = full K x K rotation (K a power of two)."""
    if w.dim() != 2:
        raise ValueError(f"rotate_weight expects a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    b = _resolve_block(block, k)
    _check_signs(signs, b)
    rb = hadamard_matrix(b, torch.float64, w.device)
    if signs is not None:
        rb = signs.to(device=w.device, dtype=torch.float64)[:, None] * rb
    out = (w.double().reshape(n, k // b, b) @ rb).reshape(n, k)
    return out.to(w.dtype)


def rotate_activation(x: torch.Tensor, block: int | None = 32, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ R`` along the last dim of an activation ``[..., K]`` via the FWHT (in ``x``'s dtype), so that
    ``rotate_activation(x, b) @ rotate_weight(w, b).T == x @ w.T`` up to rounding."""
    k = x.shape[-1]
    b = _resolve_block(block, k)
    _check_signs(signs, b)
    y = x.reshape(*x.shape[:-1], k // b, b)
    if signs is not None:
        y = y * signs.to(dtype=x.dtype, device=x.device)
    return fwht(y).reshape(x.shape)
