"""Snapping real point vectors to simple rationals, and a local search on the rational lattice.

Two lattices: bounded denominators (all a/b with b <= max_den; what NOVA calls "simple rationals")
and dyadic (a / 2^k with k <= bits; every power of such a point is exact in binary floating point
as long as it fits the mantissa, so A^T and B^T constants have a chance of being exact in fp16).
The local search moves one coordinate at a time to a neighbouring lattice point while the
objective improves, because rounding each coordinate independently can lose most of what the
continuous optimum gained (kappa is steep near coincident points).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Sequence

import numpy as np


def snap_value(x: float, max_den: int | None = None, bits: int | None = None) -> Fraction:
    if bits is not None:
        s = 1 << bits
        return Fraction(int(np.rint(x * s)), s)
    return Fraction(x).limit_denominator(max_den or 1)


def lattice_neighbours(q: Fraction, max_den: int | None = None, bits: int | None = None, k: int = 3) -> list[Fraction]:
    """Lattice points near q (q itself excluded), nearest first, at most 2k of them."""
    if bits is not None:
        step = Fraction(1, 1 << bits)
        cand = [q + j * step for j in range(-k, k + 1) if j]
    else:
        x = float(q)
        cand = set()
        for b in range(1, (max_den or 1) + 1):
            a0 = int(np.floor(x * b))
            for a in range(a0 - 1, a0 + 3):
                f = Fraction(a, b)
                if f != q:
                    cand.add(f)
        cand = sorted(cand, key=lambda f: (abs(f - q), f.denominator, f))[: 2 * k]
    return sorted(cand, key=lambda f: (abs(f - q), f.denominator, f))


def expand(params: Sequence, n: int, symmetric: bool) -> list:
    """Parameter vector -> point list. Symmetric: 0 (if n is odd) and +-p for each p."""
    if not symmetric:
        return list(params)
    pts = [type(params[0])(0) if params else 0] if n % 2 else []
    for p in params:
        pts += [p, -p]
    return pts


def n_params(n: int, symmetric: bool) -> int:
    return n // 2 if symmetric else n


def valid_points(pts: Sequence, min_gap: float = 1e-9) -> bool:
    vals = sorted(float(p) for p in pts)
    return len(set(pts)) == len(pts) and all(b - a > min_gap for a, b in zip(vals, vals[1:]))


def refine(params: list[Fraction], objective: Callable[[list[Fraction]], float], n: int, symmetric: bool,
           max_den: int | None = None, bits: int | None = None, sweeps: int = 4, k: int = 3):
    """Greedy coordinate descent on the lattice. `objective` takes the *point list*.
    Returns (params, value, evaluations)."""
    params = list(params)
    cur_pts = expand(params, n, symmetric)
    best = objective(cur_pts) if valid_points(cur_pts) else np.inf
    evals = 1
    for _ in range(sweeps):
        improved = False
        for i in range(len(params)):
            for q in lattice_neighbours(params[i], max_den, bits, k):
                if symmetric and q <= 0:
                    continue
                trial = params[:i] + [q] + params[i + 1:]
                pts = expand(trial, n, symmetric)
                if not valid_points(pts):
                    continue
                v = objective(pts)
                evals += 1
                if v < best - 1e-12:
                    best, params, improved = v, trial, True
        if not improved:
            break
    return params, best, evals
