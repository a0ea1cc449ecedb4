"""Low-precision emulation of 2D Winograd F(m x m, r x r) and of direct correlation, in numpy.

The question answered: how far from a float64 correlation (of the *unrounded* float64 data) does a
fp16 / bf16 implementation land? Rounding is emulated exactly: values are rounded to the target
format (round-to-nearest-even, with fp16 overflow to inf) at the points named by a `PrecisionModel`,
and arithmetic between rounding points is done in float32 (BLAS sgemm accumulates in fp32) or, for
the "native" model, every multiply-add is rounded to the target format.

Presets (the same rules apply to the direct baseline: inputs rounded, accumulation as stated, output
rounded):
  stage   every stage output is rounded to the dtype: inputs, B^T d B, G g G^T, the channel sum
          M = sum_c U*V, and Y = A^T M A; constants (A^T, G, B^T) are rounded to the dtype; fp32
          accumulation inside a stage.  This is the brief's definition and the default.
  tc      what a fused tensor-core kernel does: V and U are rounded (they are GEMM operands), the
          channel sum stays in fp32 and is consumed by the output transform in fp32, the filter
          transform is done once at compile time in float64 from the exact constants.
  native  like `stage` but with *every* multiply-add rounded to the dtype (fp16 accumulation),
          for both Winograd and direct. A pessimistic baseline (anchors-passes §5.4 used it for direct).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DTYPE_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38, "fp32": 3.4028234663852886e38}
DTYPE_EPS = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "fp32": 2.0 ** -24}  # unit roundoff
ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def canon_dtype(dtype: str) -> str:
    d = ALIASES.get(str(dtype).replace("torch.", ""), str(dtype).replace("torch.", ""))
    if d not in DTYPE_MAX:
        raise ValueError(f"unsupported dtype {dtype!r}; use fp16, bf16 or fp32")
    return d


def round_to(x, dtype: str) -> np.ndarray:
    """Round float values to `dtype` (RNE), returned as float64 holding exactly representable values."""
    dtype = canon_dtype(dtype)
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "fp16":
            return x.astype(np.float16).astype(np.float64)      # numpy converts double->half correctly
        if dtype == "fp32":
            return x.astype(np.float32).astype(np.float64)
        # bf16: 8 significant bits, fp32 exponent range. Round the float64 significand directly (no
        # double rounding through fp32); np.rint is round-half-even.
        mant, exp = np.frexp(x)
        y = np.ldexp(np.rint(mant * 256.0) / 256.0, exp)
        y = np.where(np.abs(y) > DTYPE_MAX["bf16"], np.sign(y) * np.inf, y)
        # below fp32's normal range bf16 has subnormals with a fixed quantum
        tiny = 2.0 ** -126
        q = 2.0 ** -133
        return np.where(np.abs(x) < tiny, np.rint(x / q) * q, y)


@dataclass(frozen=True)
class PrecisionModel:
    name: str
    round_constants: bool = True
    native_accum: bool = False      # every multiply-add rounded to the dtype
    round_M: bool = True            # channel-sum result rounded before the output transform
    filter_exact: bool = False      # filter transform in float64 from exact constants (compile time)


MODELS = {
    "stage": PrecisionModel("stage"),
    "tc": PrecisionModel("tc", round_M=False, filter_exact=True),
    "native": PrecisionModel("native", native_accum=True),
}


def get_model(model) -> PrecisionModel:
    return model if isinstance(model, PrecisionModel) else MODELS[model]


def _mm_native(A, X, rd):
    """A (p x q) @ X (..., q, s) with every multiply-add rounded (sequential FMA-style)."""
    out = np.zeros(X.shape[:-2] + (A.shape[0], X.shape[-1]))
    for q in range(A.shape[1]):
        out = rd(out + A[:, q][:, None] * X[..., q:q + 1, :])
    return out


def _tr2(M, X, native, rd):
    """M X M^T over the last two axes."""
    if native:
        Y = _mm_native(M, X, rd)
        return np.swapaxes(_mm_native(M, np.swapaxes(Y, -1, -2), rd), -1, -2)
    M32 = M.astype(np.float32)
    return (M32 @ X.astype(np.float32) @ M32.T).astype(np.float64)


def make_data(m: int, r: int, tiles: int = 128, channels: int = 16, filters: int = 8, seed: int = 0,
              dist: str = "normal"):
    """Random input tiles d (T, C, alpha, alpha) and filters g (K, C, r, r), float64."""
    rng = np.random.default_rng(seed)
    a = m + r - 1
    d = rng.standard_normal((tiles, channels, a, a))
    if dist == "relu":
        d = np.maximum(d, 0.0)
    elif dist == "uniform":
        d = rng.uniform(-1.0, 1.0, d.shape)
    elif dist != "normal":
        raise ValueError(f"unknown dist {dist!r}")
    g = rng.standard_normal((filters, channels, r, r))
    return d, g


def direct_tiles(d, g, m: int, dtype: str | None = None, model="stage") -> np.ndarray:
    """Direct correlation of tiles: out[t,k,x,y] = sum_{c,i,j} d[t,c,x+i,y+j] g[k,c,i,j].
    dtype None means exact float64 (the reference)."""
    r = g.shape[-1]
    if dtype is None:
        out = np.zeros((d.shape[0], g.shape[0], m, m))
        for i in range(r):
            for j in range(r):
                out += np.einsum("tcxy,kc->tkxy", d[:, :, i:i + m, j:j + m], g[:, :, i, j])
        return out
    pm = get_model(model)
    rd = lambda x: round_to(x, dtype)
    d16, g16 = rd(d), rd(g)
    if pm.native_accum:
        out = np.zeros((d.shape[0], g.shape[0], m, m))
        for c in range(d.shape[1]):
            for i in range(r):
                for j in range(r):
                    out = rd(out + d16[:, None, c, i:i + m, j:j + m] * g16[None, :, c, i, j, None, None])
        return out
    out = np.zeros((d.shape[0], g.shape[0], m, m), dtype=np.float32)
    d32, g32 = d16.astype(np.float32), g16.astype(np.float32)
    for i in range(r):
        for j in range(r):
            patch = d32[:, :, i:i + m, j:j + m].transpose(0, 2, 3, 1)      # (T, m, m, C)
            out += (patch @ g32[:, :, i, j].T).transpose(0, 3, 1, 2)       # fp32 accumulation
    return rd(out)


def winograd_tiles(mats, d, g, dtype: str | None = None, model="stage") -> np.ndarray:
    """2D Winograd on tiles with float (A^T, G, B^T) `mats` (exact values as float64)."""
    AT, G, BT = (np.asarray(x, dtype=np.float64) for x in mats)
    if dtype is None:
        V = BT @ d @ BT.T
        U = G @ g @ G.T
        M = np.einsum("tcxy,kcxy->tkxy", V, U)
        return AT @ M @ AT.T
    pm = get_model(model)
    rd = lambda x: round_to(x, dtype)
    d16, g16 = rd(d), rd(g)
    ATc, Gc, BTc = (rd(x) for x in (AT, G, BT)) if pm.round_constants else (AT, G, BT)
    with np.errstate(over="ignore", invalid="ignore"):
        V = rd(_tr2(BTc, d16, pm.native_accum, rd))
        U = rd(G @ g16 @ G.T) if pm.filter_exact else rd(_tr2(Gc, g16, pm.native_accum, rd))
        if pm.native_accum:
            M = np.zeros((d.shape[0], g.shape[0]) + V.shape[-2:])
            for c in range(d.shape[1]):
                M = rd(M + V[:, None, c] * U[None, :, c])
        else:
            # batched GEMM over the alpha^2 tile positions: (a, a, T, C) @ (a, a, C, K), fp32 accumulation
            Vp = V.astype(np.float32).transpose(2, 3, 0, 1)
            Up = U.astype(np.float32).transpose(2, 3, 1, 0)
            M = (Vp @ Up).transpose(2, 3, 0, 1).astype(np.float64)
            if pm.round_M:
                M = rd(M)
        return rd(_tr2(ATc, M, pm.native_accum, rd))


def rel_err(out, ref) -> float:
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@dataclass(frozen=True)
class ErrorResult:
    dtype: str
    model: str
    direct: float
    winograd: float
    ratio: float
    finite: bool
    config: dict

    def to_dict(self) -> dict:
        return asdict(self)


def relative_error(mats, m: int, r: int, dtype: str = "fp16", model="stage", tiles: int = 128,
                   channels: int = 16, filters: int = 8, seed: int = 0, dist: str = "normal",
                   data=None) -> ErrorResult:
    """Relative L2 error of 2D Winograd and of direct correlation, both vs float64 direct on the
    unrounded data. `mats` is a Transform or a float (A^T, G, B^T) triple."""
    if hasattr(mats, "numpy"):
        mats = mats.numpy()
    dtype = canon_dtype(dtype)
    pm = get_model(model)
    d, g = data if data is not None else make_data(m, r, tiles, channels, filters, seed, dist)
    ref = direct_tiles(d, g, m)
    e_dir = rel_err(direct_tiles(d, g, m, dtype, pm), ref)
    e_win = rel_err(winograd_tiles(mats, d, g, dtype, pm), ref)
    cfg = {"tiles": int(d.shape[0]), "channels": int(d.shape[1]), "filters": int(g.shape[0]), "seed": seed, "dist": dist}
    return ErrorResult(dtype, pm.name, e_dir, e_win, e_win / e_dir, bool(np.isfinite(e_win)), cfg)
