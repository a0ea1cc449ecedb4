"""Exact Toom-Cook / Winograd F(m, r) transforms from rational interpolation points plus infinity.

For F(m, r) there are alpha = m + r - 1 evaluation points: n = alpha - 1 finite rational points
a_0..a_{n-1} and the point at infinity (which reads the leading coefficient). With

    V  (alpha x alpha)  Vandermonde rows [1, a, ..., a^(alpha-1)], infinity row e_(alpha-1)
    Vm (alpha x m), Vr (alpha x r)   the same rows truncated to m and r columns

linear convolution of a degree r-1 and a degree m-1 polynomial is s = V^-1 [(Vr g) * (Vm h)]; its
transpose is the correlation ("FIR") form used by convolution layers:

    y = A^T [(G g) * (B^T d)],   A^T = Vm^T,  G = Vr,  B^T = V^-T.

V^-1 is built from the Lagrange basis (no matrix inversion): column i is N_i(x) / den_i with
N_i = prod_{k != i}(x - a_k) and den_i = prod_{k != i}(a_i - a_k); the infinity column is
prod_k (x - a_k). The diagonal of Lagrange factors 1/den_i can be moved freely between A, G and B
(the product is unchanged), which decides where the fractions live: `scaling` = "G" (default, as in
wincnn and Lavin & Gray: B^T is fraction-free), "A", "B" or "balanced" (power-of-two factors that
equalise row magnitudes go into A and B, so their exactness in fp16 is unchanged; the non-dyadic
remainder goes into G, which is applied to the weights once, at compile time).

Everything is exact (fractions.Fraction); `Transform.AT/G/BT` give sympy Matrices of Rationals.
2D F(m x m, r x r) is the nested form Y = A^T [(G g G^T) * (B^T d B)] A.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

SCALINGS = ("G", "A", "B", "balanced")

def parse_point(p) -> Fraction:
    """A finite rational point from int, Fraction, sympy Rational or a string like "5/6"."""
    if isinstance(p, Fraction):
        return p
    if isinstance(p, float):
        # Floats are ambiguous (0.1 is not 1/10); insist on exact input so that nothing is silently
        # rounded before verification.
        if not p.is_integer():
            raise TypeError(f"point {p!r} is a float; pass an exact rational (Fraction, '5/6', sympy Rational)")
        return Fraction(int(p))
    if hasattr(p, "p") and hasattr(p, "q"):  # sympy Rational / Integer
        return Fraction(int(p.p), int(p.q))
    if isinstance(p, str) and p.strip().lower() in ("inf", "oo", "infinity"):
        raise ValueError("infinity is always added; list only the finite points")
    return Fraction(p)


def canonical_points(points: Iterable) -> tuple[Fraction, ...]:
    """Sort points as 0, 1, -1, 2, -2, ... (by |p|, positive first): only row order changes."""
    pts = [parse_point(p) for p in points]
    return tuple(sorted(pts, key=lambda p: (abs(p), p < 0)))


def poly_from_roots(roots: Sequence[Fraction]) -> list[Fraction]:
    """Coefficients (lowest degree first) of the monic polynomial prod (x - root)."""
    c = [Fraction(1)]
    for a in roots:
        nxt = [Fraction(0)] * (len(c) + 1)
        for j, cj in enumerate(c):
            nxt[j + 1] += cj      # x * c
            nxt[j] -= a * cj      # -a * c
        c = nxt
    return c


def _pow2_near(x: float) -> Fraction:
    """The power of two nearest to x > 0 in log scale, as an exact Fraction."""
    e = int(np.round(np.log2(x)))
    return Fraction(2) ** e


@dataclass(frozen=True)
class Transform:
    """An exact F(m, r) transform. `points` are the finite points; infinity is the last row."""

    m: int
    r: int
    points: tuple[Fraction, ...]
    scaling: str
    AT_q: tuple = field(repr=False, compare=False)
    G_q: tuple = field(repr=False, compare=False)
    BT_q: tuple = field(repr=False, compare=False)

    @property
    def alpha(self) -> int:
        return self.m + self.r - 1

    @property
    def name(self) -> str:
        return f"F({self.m},{self.r})"

    def points_str(self) -> list[str]:
        return [str(p) for p in self.points]

    # sympy views (the brief's "matrices as sympy Rationals"); built on demand because sympy is slow.
    @cached_property
    def AT(self):
        return _to_sympy(self.AT_q)

    @cached_property
    def G(self):
        return _to_sympy(self.G_q)

    @cached_property
    def BT(self):
        return _to_sympy(self.BT_q)

    def numpy(self, dtype=np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A^T, G, B^T) as float arrays (correctly rounded from the exact values)."""
        f = lambda M: np.array([[float(x) for x in row] for row in M], dtype=np.float64).astype(dtype)
        return f(self.AT_q), f(self.G_q), f(self.BT_q)

    def max_denominator(self) -> int:
        return max(p.denominator for p in self.points) if self.points else 1

    def is_dyadic(self) -> bool:
        """All points have power-of-two denominators (so A and B^T constants are dyadic)."""
        return all(p.denominator & (p.denominator - 1) == 0 for p in self.points)

    def to_dict(self) -> dict:
        return {"m": self.m, "r": self.r, "points": self.points_str() + ["inf"], "scaling": self.scaling}


def _to_sympy(M):
    import sympy

    return sympy.Matrix([[sympy.Rational(x.numerator, x.denominator) for x in row] for row in M])


def vandermonde_parts(points: Sequence[Fraction], m: int, r: int):
    """Exact (Vm, Vr, N, den): evaluation matrices and the un-normalised Lagrange basis."""
    alpha = m + r - 1
    n = alpha - 1
    ev = lambda cols: [[a ** j for j in range(cols)] for a in points] + [[Fraction(0)] * (cols - 1) + [Fraction(1)]]
    Vm, Vr = ev(m), ev(r)
    # N is alpha x alpha; column i holds the coefficients of N_i (finite points) or of prod(x - a_k).
    cols, den = [], []
    for i, a in enumerate(points):
        others = points[:i] + points[i + 1:]
        cols.append(poly_from_roots(others) + [Fraction(0)])      # degree n-1, padded to alpha
        d = Fraction(1)
        for b in others:
            d *= a - b
        den.append(d)
    cols.append(poly_from_roots(points))                           # degree n = alpha - 1
    den.append(Fraction(1))
    N = [[cols[j][i] for j in range(alpha)] for i in range(alpha)]
    assert len(cols) == alpha and n == len(points)
    return Vm, Vr, N, den


def toom_cook(m: int, r: int, points: Iterable, scaling: str = "G", canonical: bool = True) -> Transform:
    """Build the exact F(m, r) transform on `points` (m + r - 2 distinct finite rationals) plus infinity."""
    if m < 1 or r < 1:
        raise ValueError("m and r must be positive")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    pts = canonical_points(points) if canonical else tuple(parse_point(p) for p in points)
    need = m + r - 2
    if len(pts) != need:
        raise ValueError(f"F({m},{r}) needs {need} finite points plus infinity, got {len(pts)}")
    if len(set(pts)) != len(pts):
        raise ValueError(f"points must be distinct: {[str(p) for p in pts]}")
    Vm, Vr, N, den = vandermonde_parts(pts, m, r)
    alpha = m + r - 1
    f = [1 / d for d in den]                                       # Lagrange factors (row i of B^T)
    # Per-row multipliers (a_i, g_i, b_i) with a_i * g_i * b_i = f_i. Signs go to B so that the
    # scale in G is positive (matches the Lavin & Gray / wincnn F(2,3) matrices).
    sA, sG, sB = [Fraction(1)] * alpha, [Fraction(1)] * alpha, [Fraction(1)] * alpha
    for i in range(alpha):
        sign = Fraction(1 if f[i] > 0 else -1)
        mag = abs(f[i])
        if scaling == "G":
            sG[i], sB[i] = mag, sign
        elif scaling == "A":
            sA[i], sB[i] = mag, sign
        elif scaling == "B":
            sB[i] = f[i]
        else:  # balanced: equalise max|A col|, max|G row|, max|B row| with power-of-two factors in A, B
            a_max = max(abs(Vm[i][j]) for j in range(m))
            g_max = max(abs(Vr[i][j]) for j in range(r))
            b_max = max(abs(N[j][i]) for j in range(alpha))
            target = (float(a_max) * float(g_max) * float(b_max) * float(mag)) ** (1.0 / 3.0)
            sA[i] = _pow2_near(target / float(a_max))
            sB[i] = sign * _pow2_near(target / float(b_max))
            sG[i] = mag / (sA[i] * abs(sB[i]))
    AT = tuple(tuple(Vm[i][j] * sA[i] for i in range(alpha)) for j in range(m))
    G = tuple(tuple(Vr[i][j] * sG[i] for j in range(r)) for i in range(alpha))
    BT = tuple(tuple(N[j][i] * sB[i] for j in range(alpha)) for i in range(alpha))
    return Transform(m=m, r=r, points=pts, scaling=scaling, AT_q=AT, G_q=G, BT_q=BT)


def from_matrices(m: int, r: int, AT, G, BT, points=(), scaling: str = "custom") -> Transform:
    """Wrap arbitrary exact matrices (e.g. hand-written or deliberately wrong) as a Transform, so
    that they can be passed to the verifier. Entries may be ints, Fractions, strings or sympy."""
    conv = lambda M: tuple(tuple(parse_point(x) for x in row) for row in (M.tolist() if hasattr(M, "tolist") else M))
    return Transform(m=m, r=r, points=tuple(parse_point(p) for p in points), scaling=scaling,
                     AT_q=conv(AT), G_q=conv(G), BT_q=conv(BT))


def numeric_transform(points: Sequence[float], m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 (A^T, G, B^T) for *real* (unsnapped) points, fractions in G; for the search's inner loop.
    Uses the same Lagrange construction as `toom_cook` (no inverse), so it is accurate for any
    distinct points; B^T row i is sign(f_i) N_i and G row i is |f_i| Vr_i."""
    pts = np.asarray(points, dtype=np.float64)
    alpha = m + r - 1
    n = alpha - 1
    if pts.shape != (n,):
        raise ValueError(f"F({m},{r}) needs {n} finite points")
    Vm = np.zeros((alpha, m))
    Vr = np.zeros((alpha, r))
    Vm[:n] = pts[:, None] ** np.arange(m)
    Vr[:n] = pts[:, None] ** np.arange(r)
    Vm[n, m - 1] = 1.0
    Vr[n, r - 1] = 1.0
    BT = np.zeros((alpha, alpha))
    scale = np.ones(alpha)
    for i in range(n):
        others = np.delete(pts, i)
        c = np.polynomial.polynomial.polyfromroots(others) if n > 1 else np.array([1.0])
        BT[i, : len(c)] = c
        scale[i] = 1.0 / np.prod(pts[i] - others)
    c = np.polynomial.polynomial.polyfromroots(pts)
    BT[n, : len(c)] = c
    sign = np.sign(scale)
    BT *= sign[:, None]
    G = Vr * np.abs(scale)[:, None]
    return Vm.T.copy(), G, BT


def standard_points(m: int, r: int) -> tuple[Fraction, ...]:
    """The conventional integer points 0, 1, -1, 2, -2, ... (first m + r - 2 of them)."""
    seq, k = [Fraction(0)], 1
    while len(seq) < m + r - 2:
        seq += [Fraction(k), Fraction(-k)]
        k += 1
    return tuple(seq[: m + r - 2])
