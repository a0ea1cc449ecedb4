"""Exact verification of Winograd transforms over Q[d, g].

`verify_1d` checks, as a polynomial identity in the symbols d_0..d_{alpha-1}, g_0..g_{r-1}, that
A^T [(G g) * (B^T d)] equals the direct correlation y_i = sum_k d_{i+k} g_k. `verify_2d` does the same
for the nested 2D algorithm Y = A^T [(G g G^T) * (B^T d B)] A with alpha^2 + r^2 symbols, by actually
running the nested pipeline on polynomials (so a bug in the nesting, not just in the 1D matrices,
would be caught). Arithmetic is sympy's sparse polynomial ring over QQ: exact, and fast enough for
F(8,3) in 2D (~2 s). No floating point is involved anywhere, so "verified" means the transform
computes exact convolution for every input.

Nothing that fails here may be used: `require_verified` raises.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .construct import Transform


class UnverifiedTransformError(ValueError):
    """A transform failed exact verification."""


@dataclass(frozen=True)
class Verification:
    ok: bool
    dims: int
    method: str
    detail: str
    seconds: float

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dims": self.dims, "method": self.method, "detail": self.detail}


def _ring(names: list[str]):
    from sympy.polys.domains import QQ
    from sympy.polys.rings import ring

    R, *gens = ring(",".join(names), QQ)
    return R, gens


def _qq(x):
    from sympy.polys.domains import QQ

    return QQ(x.numerator, x.denominator)


def _shape_error(t: Transform) -> str | None:
    a, m, r = t.alpha, t.m, t.r
    if len(t.AT_q) != m or any(len(row) != a for row in t.AT_q):
        return f"A^T must be {m}x{a}"
    if len(t.G_q) != a or any(len(row) != r for row in t.G_q):
        return f"G must be {a}x{r}"
    if len(t.BT_q) != a or any(len(row) != a for row in t.BT_q):
        return f"B^T must be {a}x{a}"
    return None


def _matvec_rows(M, X, R):
    """M (numeric, p x q) times X (polynomials, q x s); skips zero constants."""
    out = []
    for row in M:
        nz = [(k, _qq(c)) for k, c in enumerate(row) if c != 0]
        out.append([sum((c * X[k][j] for k, c in nz), R.zero) for j in range(len(X[0]))])
    return out


def _T(X):
    return [list(col) for col in zip(*X)]


def verify_1d(t: Transform) -> Verification:
    t0 = time.perf_counter()
    err = _shape_error(t)
    if err:
        return Verification(False, 1, "sympy-ring-QQ", err, time.perf_counter() - t0)
    a, m, r = t.alpha, t.m, t.r
    R, gens = _ring([f"d{i}" for i in range(a)] + [f"g{k}" for k in range(r)])
    d, g = [[x] for x in gens[:a]], [[x] for x in gens[a:]]
    Gg = _matvec_rows(t.G_q, g, R)
    Bd = _matvec_rows(t.BT_q, d, R)
    prod = [[Gg[i][0] * Bd[i][0]] for i in range(a)]
    y = _matvec_rows(t.AT_q, prod, R)
    for i in range(m):
        want = sum((d[i + k][0] * g[k][0] for k in range(r)), R.zero)
        if y[i][0] != want:
            diff = y[i][0] - want
            return Verification(False, 1, "sympy-ring-QQ",
                                f"output {i}: residual has {len(diff.terms())} terms, e.g. {str(diff.as_expr())[:120]}",
                                time.perf_counter() - t0)
    return Verification(True, 1, "sympy-ring-QQ", "exact identity", time.perf_counter() - t0)


def verify_2d(t: Transform) -> Verification:
    t0 = time.perf_counter()
    err = _shape_error(t)
    if err:
        return Verification(False, 2, "sympy-ring-QQ", err, time.perf_counter() - t0)
    a, m, r = t.alpha, t.m, t.r
    names = [f"d{i}_{j}" for i in range(a) for j in range(a)] + [f"g{i}_{j}" for i in range(r) for j in range(r)]
    R, gens = _ring(names)
    d = [[gens[i * a + j] for j in range(a)] for i in range(a)]
    g = [[gens[a * a + i * r + j] for j in range(r)] for i in range(r)]
    V = _T(_matvec_rows(t.BT_q, _T(_matvec_rows(t.BT_q, d, R)), R))   # B^T d B
    U = _T(_matvec_rows(t.G_q, _T(_matvec_rows(t.G_q, g, R)), R))     # G g G^T
    M = [[U[i][j] * V[i][j] for j in range(a)] for i in range(a)]
    Y = _T(_matvec_rows(t.AT_q, _T(_matvec_rows(t.AT_q, M, R)), R))   # A^T M A
    for x in range(m):
        for y in range(m):
            want = sum((d[x + k][y + l] * g[k][l] for k in range(r) for l in range(r)), R.zero)
            if Y[x][y] != want:
                diff = Y[x][y] - want
                return Verification(False, 2, "sympy-ring-QQ",
                                    f"output ({x},{y}): residual has {len(diff.terms())} terms",
                                    time.perf_counter() - t0)
    return Verification(True, 2, "sympy-ring-QQ", "exact identity", time.perf_counter() - t0)


def verify(t: Transform, dims=(1, 2)) -> dict[int, Verification]:
    """Verify in each requested dimension; returns {dims: Verification}."""
    fns = {1: verify_1d, 2: verify_2d}
    return {k: fns[k](t) for k in dims}


def require_verified(t: Transform, dims=(1, 2)) -> Transform:
    """Return `t` if it passes exact verification in `dims`, else raise UnverifiedTransformError."""
    for k, v in verify(t, dims).items():
        if not v.ok:
            raise UnverifiedTransformError(f"{t.name} on points {t.points_str()} fails {k}D verification: {v.detail}")
    return t
