"""Numerical metrics of a Winograd transform: conditioning, constants, range, error.

Condition numbers (2-norm, sigma_max / sigma_min, computed in float64 from the exact values):
  kappa_vandermonde_finite  the (alpha-1) x (alpha-1) Vandermonde matrix of the finite points only.
                            **This is NOVA's figure**: it gives 1.97e5 for the standard F(8,3) points
                            {0, +-1, +-2, +-3, +-4}, matching the abstract's "kappa = 2 x 10^5 for
                            F(8,3)"; no other matrix here comes close (see `cond_report`).
  kappa_vandermonde_inf     the alpha x alpha Vandermonde with the infinity row (= kappa(B^T) for
                            scaling "B", i.e. B^T = V^-T).
  kappa_AT, kappa_G, kappa_BT  of the matrices as built (depends on the scaling placement).
Each has a 2D value: the 2D transforms are Kronecker products (A (x) A etc.) and the singular values
of a Kronecker product are the pairwise products, so kappa_2d = kappa_1d^2 exactly; this identity is
used rather than an SVD of a matrix whose kappa may exceed 1/eps (tested on small cases).

Error amplification (analytic): for iid N(0,1) data and filters and independent relative rounding
errors of size u in V = B^T d B (and likewise in U and M), the 2D output error relative to direct
is governed by W2 = W1^2 with W1 = mean_j sum_i A_ij^2 |G_i|^2 |B_i|^2 / r, invariant under the
A/G/B scaling. Predicted error ratio vs direct: sqrt(1 + W2) for the "stage" model and
sqrt(1 + 2 W2 / 3) for "tc" (inputs and output rounding are common to both algorithms).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from .construct import Transform
from .emulate import DTYPE_MAX, canon_dtype, relative_error, round_to


def _cond(M) -> float:
    s = np.linalg.svd(np.asarray(M, dtype=np.float64), compute_uv=False)
    return float("inf") if s[-1] == 0 else float(s[0] / s[-1])


def _float_points(points) -> np.ndarray:
    return np.array([float(p) for p in points], dtype=np.float64)


def kappa_nova(points) -> float:
    """NOVA's condition number: kappa_2 of the square Vandermonde on the finite points."""
    x = _float_points(points)
    return _cond(np.vander(x, increasing=True))


def kappa_vandermonde_inf(points) -> float:
    x = _float_points(points)
    n = len(x)
    V = np.zeros((n + 1, n + 1))
    V[:n] = np.vander(x, n + 1, increasing=True)
    V[n, n] = 1.0
    return _cond(V)


def cond_report(t: Transform) -> dict:
    AT, G, BT = t.numpy()
    one = {
        "kappa_vandermonde_finite": kappa_nova(t.points),
        "kappa_vandermonde_inf": kappa_vandermonde_inf(t.points),
        "kappa_AT": _cond(AT),
        "kappa_G": _cond(G),
        "kappa_BT": _cond(BT),
    }
    out = {}
    for k, v in one.items():
        out[k + "_1d"] = v
        out[k + "_2d"] = v * v
    return out


def error_amplification(mats, r: int) -> dict:
    """Analytic W1 (1D) and W2 (2D) error amplification; see the module docstring."""
    AT, G, BT = (np.asarray(x, dtype=np.float64) for x in (mats.numpy() if hasattr(mats, "numpy") else mats))
    w = (AT ** 2 * ((G ** 2).sum(1) * (BT ** 2).sum(1))[None, :]).sum(1) / r
    W1 = float(w.mean())
    return {"W1": W1, "W2": W1 * W1, "pred_ratio_stage": float(np.sqrt(1 + W1 * W1)),
            "pred_ratio_tc": float(np.sqrt(1 + 2 * W1 * W1 / 3))}


def _exact_in(q: Fraction, dtype: str) -> tuple[bool, float]:
    """Is q exactly representable in dtype; relative rounding error of its nearest dtype value."""
    v = float(round_to(float(q), dtype))
    if not np.isfinite(v):
        return False, float("inf")
    if q == 0:
        return True, 0.0
    exact = Fraction(v) == q
    return exact, abs(float((Fraction(v) - q) / q))


def constants_report(t: Transform, dtype: str = "fp16") -> dict:
    """Per matrix: magnitude range, whether every constant is exact in `dtype`, worst rounding error."""
    dtype = canon_dtype(dtype)
    out = {}
    for name, M in (("AT", t.AT_q), ("G", t.G_q), ("BT", t.BT_q)):
        vals = [x for row in M for x in row]
        nz = [abs(x) for x in vals if x != 0]
        ex = [_exact_in(x, dtype) for x in vals]
        out[name] = {
            "max_abs": float(max(nz)) if nz else 0.0,
            "min_abs_nonzero": float(min(nz)) if nz else 0.0,
            "exact": all(e for e, _ in ex),
            "n_inexact": sum(not e for e, _ in ex),
            "max_rel_rounding": max(err for _, err in ex),
            "dyadic": all(x.denominator & (x.denominator - 1) == 0 for x in vals),
        }
    out["all_exact"] = all(out[k]["exact"] for k in ("AT", "G", "BT"))
    out["AT_BT_exact"] = out["AT"]["exact"] and out["BT"]["exact"]
    return out


HEADROOM_CHANNELS = 1024   # channel count assumed when judging the typical size of the channel sum M


def range_report(t: Transform, dtype: str = "fp16", input_bound: float = 1.0, weight_bound: float = 1.0,
                 channels: int = 1, typical_channels: int = HEADROOM_CHANNELS) -> dict:
    """Worst-case and typical magnitudes of the 2D pipeline's intermediates.

    Worst case for |d| <= input_bound, |g| <= weight_bound, via infinity norms (max row l1 norm):
    V = B^T d B <= ||B^T||^2 |d|, U = G g G^T <= ||G||^2 |g|, M = sum_c U V <= C |U| |V|, and the
    first half of the output transform Z = A^T M <= ||A^T|| |M| (the final Y is the convolution
    itself, bounded by C r^2 |d| |g| whatever the transform). `max_input_no_overflow` is the largest
    |d| for which no intermediate can overflow `dtype`; `rms_*` are the largest standard deviations
    for N(0,1) data and filters, i.e. the typical scale (overflow in practice starts far below the
    worst case). `headroom` = dtype max / the largest typical intermediate (V, U, or M with
    `typical_channels` channels): how many standard deviations of slack remain before overflow.
    """
    dtype = canon_dtype(dtype)
    AT, G, BT = t.numpy()
    nB, nG, nA = (float(np.abs(X).sum(1).max()) for X in (BT, G, AT))
    V = nB ** 2 * input_bound
    U = nG ** 2 * weight_bound
    M = channels * U * V
    Z = nA * M
    lim = DTYPE_MAX[dtype]
    per_unit_input = max(nB ** 2, channels * U * nB ** 2, nA * channels * U * nB ** 2)
    g2, b2 = (G ** 2).sum(1), (BT ** 2).sum(1)   # squared row norms
    return {
        "norm_inf_AT": nA, "norm_inf_G": nG, "norm_inf_BT": nB,
        "bound_V": V, "bound_U": U, "bound_M": M, "bound_Z": Z,
        "bound_Y": float(channels * t.r ** 2 * input_bound * weight_bound),
        "overflow_possible": bool(max(V, U, M, Z) > lim),
        "max_input_no_overflow": float(lim / per_unit_input),
        "rms_V": float(b2.max()), "rms_U": float(g2.max()),
        "rms_M_per_sqrt_channel": float((g2 * b2).max()),
        "headroom": float(lim / max(b2.max() * input_bound, g2.max() * weight_bound,
                                    (g2 * b2).max() * np.sqrt(typical_channels) * input_bound * weight_bound)),
    }


def empirical_errors(t: Transform, dtypes=("fp16", "bf16"), models=("stage", "tc", "native"), **kw) -> dict:
    """{dtype: {model: ErrorResult.to_dict()}} on the standard random workload (see emulate.make_data)."""
    return {dt: {mo: relative_error(t, t.m, t.r, dt, mo, **kw).to_dict() for mo in models} for dt in dtypes}


def full_report(t: Transform, dtypes=("fp16", "bf16"), models=("stage", "tc"), **kw) -> dict:
    """Everything above in one JSON-able dict (used by the library, the CLI and the benchmarks)."""
    return {
        "cond": cond_report(t),
        "amplification": error_amplification(t, t.r),
        "constants": {dt: constants_report(t, dt) for dt in dtypes},
        "range": {dt: range_report(t, dt) for dt in dtypes},
        "error": empirical_errors(t, dtypes, models, **kw),
    }
