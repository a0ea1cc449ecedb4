"""Differential testing of fxforge's ATen lowering over an op table (CPU, Triton interpreter).

Every table entry is a small function of tensors built from torch ops. Each case wraps it in an
``nn.Module``, compiles it with ``fxforge.compile`` (the AOT front door), runs it and compares with
a float64 reference: ``fn`` run on the same inputs cast to float64 (integer/bool inputs unchanged).
A subset also goes through the JIT front door (``torch.compile(..., backend="fxforge")``).

Errors are relative-norm errors (``fxforge.debug.rel_err``: a NaN/Inf mismatch is an infinite error,
so NaN never passes). Tolerances are in ``TOL`` below:

- float32, pointwise: 1e-5. One fp32 rounding per op gives ~6e-8 relative; even a handful of
  transcendental ops that are a few ulps off stay far below 1e-5.
- float32, accumulating ops (reductions, norms, softmax, matmuls): 1e-4. A sum of K fp32 terms
  carries a worst-case error of ~K*eps*sum|x_i| while the relative-norm error is taken against
  |sum x_i|, which for zero-mean data is ~sqrt(K) smaller than sum|x_i|; K is up to 3000 here
  (all-dims reduction of (1, 1000, 3)), so K*eps ~ 3.6e-4 worst case and ~sqrt(K)*eps ~ 7e-6 in
  practice: 1e-4 leaves room for a different (blocked / tree) summation order without letting a
  wrong result (error ~1) through.
- bfloat16: the compiled error must be at most ``eager_factor`` times the error of eager bfloat16
  (``fn`` on the bf16 inputs, against the same float64 reference) plus ``floor``. fxforge computes
  bf16 in fp32 registers and rounds once per stored value, so it should never be much worse than
  eager, which rounds after every op. The floor (1e-3, a quarter of bf16's largest relative
  rounding error 2**-8) covers ops that eager bf16 computes exactly (relu, neg, ...) where a single
  different rounding of the final store would otherwise fail a zero bound.
- integer and bool outputs must equal the eager result exactly (``torch.equal``).

Entries marked ``expect_kernel=True`` use only ops that have a Triton lowering: they must compile to
at least one kernel with no fallback, and (where ``kinds`` is given) to kernels of those kinds.

Besides the ordinary ranges, a few entries probe the edges torch defines: inputs near 0 for
expm1/log1p/tanh (where exp(x)-1, log(1+x), 2*sigmoid(2x)-1 lose all precision), overflow to inf,
and NaN propagation (torch's relu/maximum/clamp/amax return NaN for a NaN input).

Failing cases are left in on purpose: each is a bug report against fxforge.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

# fxforge first: it must be imported before triton (it sets TRITON_INTERPRET=1 when there is no CUDA).
import fxforge
import fxforge.backend
import pytest
import torch
import torch.nn.functional as F
from fxforge.debug import rel_err

# ---- tolerances ---------------------------------------------------------------------------------
TOL = {
    torch.float32: {"pointwise": 1e-5, "accum": 1e-4},
    torch.bfloat16: {"eager_factor": 2.0, "floor": 1e-3},
}

FLOATS = (torch.float32, torch.bfloat16)
INT = (torch.int64,)
BOOL = (torch.bool,)

DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int64: "int64", torch.bool: "bool"}

# ---- sizes ----------------------------------------------------------------------------------------
# Irregular on purpose: every size leaves a partial block, so the kernels' masks are exercised.
PW_SHAPES = ((1,), (7,), (33,), (1000,), (2, 7, 33))
# Unary ops see one contiguous operand: the 3-D shape adds nothing the binary/view entries miss.
UNARY_SHAPES = ((1,), (7,), (33,), (1000,))
INT_SHAPES = ((7,), (1000,), (2, 7, 33))
RED_SHAPES = ((2, 7, 33), (3, 1, 5), (1, 1000, 3))
# keepdim=True only changes the output's shape/strides: fewer sizes.
RED_KEEP_SHAPES = ((2, 7, 33), (3, 1, 5))
VIEW_SHAPES = ((2, 7, 33), (3, 1, 5), (1, 1000, 3))
# (M, K, N) with each in {1, 7, 33, 65}
MM_SIZES = ((1, 33, 7), (33, 65, 7), (7, 1, 33), (65, 7, 65), (1, 1, 1))
# bfloat16 cases check rounding rather than masking/indexing (which float32 covers on every size):
# they run on a subset of the sizes, to keep the file's runtime down.
# (Looked up by value: VIEW_SHAPES equals RED_SHAPES and shares its subset.)
BF16_SIZES = {
    PW_SHAPES: ((7,), (1000,), (2, 7, 33)),
    UNARY_SHAPES: ((7,), (1000,)),
    RED_KEEP_SHAPES: ((2, 7, 33),),
    RED_SHAPES: ((2, 7, 33), (1, 1000, 3)),
    MM_SIZES: ((1, 33, 7), (33, 65, 7), (7, 1, 33)),
}


# ---- input generators -----------------------------------------------------------------------------
def gen(kind: str, shape, dtype):
    """A tensor of ``shape``; float kinds are drawn in fp32 then cast to ``dtype``."""
    shape = tuple(shape)
    if kind == "int":
        return torch.randint(-50, 50, shape, dtype=torch.int64)
    if kind == "smallint":
        return torch.randint(1, 9, shape, dtype=torch.int64)
    if kind == "bool":
        return torch.rand(shape) < 0.5
    if kind == "randn":
        t = torch.randn(shape)
    elif kind == "wide":  # floor/ceil/trunc/casts: many values on both sides of integers
        t = torch.randn(shape) * 4
    elif kind == "pos":  # log/sqrt/pow: strictly positive, away from 0
        t = torch.rand(shape) * 2 + 0.05
    elif kind == "unit":  # log1p: (0, 1)
        t = torch.rand(shape) * 0.98 + 0.01
    elif kind == "away0":  # divisors / reciprocal: |x| in [0.5, 1.5]
        t = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(shape))
    elif kind == "ties":  # comparisons / maximum: many exactly-equal pairs across two draws
        t = torch.round(torch.randn(shape) * 2) / 2
    elif kind == "tiny":  # expm1 / log1p / tanh near 0: where the naive formulas cancel
        t = torch.rand(shape) * 1e-4 + 1e-6
    elif kind == "tiny_signed":
        t = torch.randn(shape) * 1e-4
    elif kind == "big":  # exp/sigmoid overflow region
        t = torch.randn(shape) * 60
    elif kind == "nan":  # randn with some NaNs
        t = torch.randn(shape)
        t[torch.rand(shape) < 0.2] = float("nan")
        t.view(-1)[0] = float("nan")
    else:
        raise ValueError(kind)
    return t.to(dtype)


def unary(kind="randn"):
    return lambda s, dt: (gen(kind, s, dt),)


def same2(ka="randn", kb="randn"):
    return lambda s, dt: (gen(ka, s, dt), gen(kb, s, dt))


def lead(s):
    """A shape of higher rank than ``s[-1:]`` (for broadcasting across ranks)."""
    return (3,) + tuple(s) if len(s) == 1 else tuple(s)


def bcast_last(ka="randn", kb="randn"):
    # a: (..., n) with rank >= 2, b: (n,)  -- b broadcast along all leading dims
    return lambda s, dt: (gen(ka, lead(s), dt), gen(kb, s[-1:], dt))


def bcast_outer(ka="randn", kb="randn"):
    # a: s + (1,), b: (5,)  -- both operands broadcast, ranks differ
    return lambda s, dt: (gen(ka, tuple(s) + (1,), dt), gen(kb, (5,), dt))


def bcast_mid(ka="randn", kb="randn"):
    # a: s, b: (s[0], 1, ..., 1) -- a size-1 broadcast in the middle of b
    return lambda s, dt: (gen(ka, s, dt), gen(kb, (s[0],) + (1,) * (len(s) - 1), dt))


def with_mask(kx="randn"):
    return lambda s, dt: (gen(kx, s, dt), gen("bool", s, dt))


def with_int(kx="randn"):
    return lambda s, dt: (gen(kx, s, dt), gen("int", s, dt))


def int2():
    return lambda s, dt: (gen("int", s, dt), gen("int", s, dt))


def bool2():
    return lambda s, dt: (gen("bool", s, dt), gen("bool", s, dt))


def norm_inputs(affine=True):
    def build(s, dt):
        x = gen("randn", s, dt) * 2 + 0.5
        if not affine:
            return (x,)
        return (x, gen("randn", s[-1:], dt), gen("randn", s[-1:], dt))
    return build


def rms_inputs(s, dt):
    return (gen("randn", s, dt), gen("randn", s[-1:], dt))


def transpose_inputs(s, dt):
    t = (s[1], s[0]) + tuple(s[2:])
    return (gen("randn", s, dt), gen("randn", t, dt))


def permute_inputs(s, dt):
    return (gen("randn", s, dt), gen("randn", (s[2], s[0], s[1]), dt))


def mm_inputs(sz, dt):
    M, K, N = sz
    return (gen("randn", (M, K), dt), gen("randn", (K, N), dt))


def mm_ta_inputs(sz, dt):
    M, K, N = sz
    return (gen("randn", (K, M), dt), gen("randn", (K, N), dt))


def linear_inputs(bias=True, residual=False):
    def build(sz, dt):
        M, K, N = sz
        out = [gen("randn", (2, M, K), dt), gen("randn", (N, K), dt) / K ** 0.5]
        if bias:
            out.append(gen("randn", (N,), dt))
        if residual:
            out.append(gen("randn", (2, M, N), dt))
        return tuple(out)
    return build


def bmm_inputs(sz, dt):
    M, K, N = sz
    return (gen("randn", (3, M, K), dt), gen("randn", (3, K, N), dt))


def addmm_inputs(bias_2d=False):
    def build(sz, dt):
        M, K, N = sz
        return (gen("randn", (M, N) if bias_2d else (N,), dt), gen("randn", (M, K), dt), gen("randn", (K, N), dt))
    return build


# ---- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpCase:
    name: str
    fn: Callable  # fn(*tensors) -> tensor (or tuple of tensors)
    build: Callable  # (size, dtype) -> tuple of tensors
    sizes: tuple = PW_SHAPES
    dtypes: tuple = FLOATS  # INT / BOOL for integer- or bool-only entries
    expect_kernel: bool = True  # only ops with a Triton lowering: >=1 kernel, no fallback
    kinds: tuple = ()  # kernel kinds that must appear in report.kernel_kinds()
    accum: bool = False  # fp32 tolerance "accum" (reductions, norms, matmuls) instead of "pointwise"
    # Round the float64 reference to the output dtype before comparing: for results that overflow
    # the output dtype's range (exp of large inputs), where float64 stays finite but eager is inf.
    ref_in_out_dtype: bool = False


PW = ("pointwise",)
RED = ("reduction",)
MMK = ("matmul",)

TABLE: list[OpCase] = [
    # -- arithmetic, broadcasting across ranks, scalars, alpha
    OpCase("add", lambda a, b: a + b, same2()),
    OpCase("add_bcast", lambda a, b: a + b, bcast_last(), kinds=PW),
    OpCase("add_bcast_outer", lambda a, b: a + b, bcast_outer(), kinds=PW),
    OpCase("add_scalar", lambda a: a + 2.5, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("add_alpha", lambda a, b: torch.add(a, b, alpha=2.0), bcast_mid(), sizes=VIEW_SHAPES, kinds=PW),
    OpCase("sub_bcast", lambda a, b: a - b, bcast_mid(), sizes=VIEW_SHAPES, kinds=PW),
    OpCase("sub_alpha", lambda a, b: torch.sub(a, b, alpha=0.5), bcast_last(), kinds=PW),
    OpCase("rsub_scalar", lambda a: 1.0 - a, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("mul_bcast", lambda a, b: a * b, bcast_outer(), kinds=PW),
    OpCase("mul_scalar", lambda a: a * -1.5, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("div_bcast", lambda a, b: a / b, bcast_last("randn", "away0"), kinds=PW),
    OpCase("div_scalar", lambda a: a / 3.0, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("rdiv_scalar", lambda a: 2.0 / a, unary("away0"), sizes=UNARY_SHAPES, kinds=PW),
    # -- unary math
    OpCase("neg", lambda a: -a, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("abs", torch.abs, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("exp", torch.exp, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("exp2", torch.exp2, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("expm1", torch.expm1, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("log", torch.log, unary("pos"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("log2", torch.log2, unary("pos"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("log1p", torch.log1p, unary("unit"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("sqrt", torch.sqrt, unary("pos"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("rsqrt", torch.rsqrt, unary("pos"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("reciprocal", torch.reciprocal, unary("away0"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("sigmoid", torch.sigmoid, unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("tanh", torch.tanh, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("erf", torch.erf, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("sin", torch.sin, unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("cos", torch.cos, unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("floor", torch.floor, unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("ceil", torch.ceil, unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("trunc", torch.trunc, unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    # Near 0, where exp(x)-1 / log(1+x) / 2*sigmoid(2x)-1 cancel: the reason expm1/log1p exist.
    OpCase("expm1_tiny", torch.expm1, unary("tiny_signed"), sizes=((7,), (1000,))),
    OpCase("log1p_tiny", torch.log1p, unary("tiny"), sizes=((7,), (1000,))),
    OpCase("tanh_tiny", torch.tanh, unary("tiny_signed"), sizes=((7,), (1000,))),
    # Extremes: overflow to inf, saturation, NaN propagation.
    OpCase("exp_big", torch.exp, unary("big"), sizes=((33,), (1000,)), ref_in_out_dtype=True),
    OpCase("sigmoid_big", torch.sigmoid, unary("big"), sizes=((33,), (1000,))),
    OpCase("tanh_big", torch.tanh, unary("big"), sizes=((33,), (1000,))),
    OpCase("relu_nan", torch.relu, unary("nan"), sizes=((33,), (1000,))),
    OpCase("maximum_nan", torch.maximum, same2("nan", "randn"), sizes=((33,), (1000,))),
    OpCase("clamp_nan", lambda a: torch.clamp(a, -0.5, 0.5), unary("nan"), sizes=((33,), (1000,))),
    # (x + 1) so that the reduction reads a fused value rather than the graph input directly
    OpCase("amax_nan", lambda a: (a + 1.0).amax(-1), unary("nan"), sizes=((7, 33), (3, 1000)), kinds=RED, accum=True),
    # -- activations
    OpCase("relu", torch.relu, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("gelu", lambda a: F.gelu(a), unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("silu", F.silu, unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("leaky_relu", lambda a: F.leaky_relu(a, 0.2), unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("hardtanh", F.hardtanh, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("hardtanh_range", lambda a: F.hardtanh(a, -0.25, 2.0), unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("clamp_min", lambda a: torch.clamp(a, min=-0.3), unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("clamp_max", lambda a: torch.clamp(a, max=0.7), unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("clamp_both", lambda a: torch.clamp(a, -0.5, 0.5), unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("maximum", torch.maximum, same2("ties", "ties"), kinds=PW),
    OpCase("minimum_bcast", torch.minimum, bcast_last("ties", "ties"), kinds=PW),
    # -- pow
    OpCase("pow_2", lambda a: a ** 2, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("pow_3", lambda a: torch.pow(a, 3), unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("pow_0.5", lambda a: a ** 0.5, unary("pos"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("pow_-1", lambda a: a ** -1, unary("away0"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("pow_1.7", lambda a: a ** 1.7, unary("pos"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("pow_tt", torch.pow, same2("pos", "randn"), kinds=PW),
    OpCase("pow_scalar_base", lambda a: 2.5 ** a, unary(), sizes=UNARY_SHAPES, kinds=PW),
    # -- comparisons, where, logical, masked_fill
    OpCase("where_cmp", lambda a, b: torch.where(a > b, a, b * 2.0), same2(), kinds=PW),
    OpCase("where_scalar", lambda a: torch.where(a < 0, 0.0, a), unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("eq", torch.eq, same2("ties", "ties"), kinds=PW),
    OpCase("ne", torch.ne, same2("ties", "ties"), kinds=PW),
    OpCase("lt", torch.lt, bcast_last("ties", "ties"), kinds=PW),
    OpCase("le", torch.le, same2("ties", "ties"), kinds=PW),
    OpCase("gt", torch.gt, same2("ties", "ties"), kinds=PW),
    OpCase("ge", torch.ge, same2("ties", "ties"), kinds=PW),
    OpCase("gt_scalar", lambda a: a > 0.5, unary("ties"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("eq_scalar", lambda a: a == 1.0, unary("ties"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("logical_not_float", torch.logical_not, unary("ties"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("logical_and_float", torch.logical_and, same2("ties", "ties"), kinds=PW),
    OpCase("cmp_chain", lambda a, b: ((a > 0) & (b < 0)) | (a == b), same2("ties", "ties"), kinds=PW),
    OpCase("masked_fill", lambda a, m: a.masked_fill(m, -3.5), with_mask(), kinds=PW),
    OpCase("masked_fill_ninf", lambda a, m: a.masked_fill(m, float("-inf")), with_mask(), kinds=PW),
    # -- dtype casts
    OpCase("cast_bf16_roundtrip", lambda a: a.to(torch.bfloat16).float() * 3.0, unary(), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("cast_to_int32", lambda a: (a * 4).to(torch.int32), unary("wide"), sizes=UNARY_SHAPES, kinds=PW),
    OpCase("cast_int64_to_float", lambda a, i: i.to(a.dtype) * 0.25 + a, with_int(), kinds=PW),
    OpCase("cast_bool_to_float", lambda a, m: m.to(a.dtype) * a - 1.0, with_mask(), kinds=PW),
    # -- integer- and bool-only entries (exact)
    OpCase("int_arith", lambda a, b: a * 3 + b - 7, int2(), sizes=INT_SHAPES, dtypes=INT, kinds=PW),
    OpCase("int_neg_abs", lambda a: torch.abs(-a), lambda s, dt: (gen("int", s, dt),), sizes=INT_SHAPES, dtypes=INT,
           kinds=PW),
    OpCase("int_maximum", torch.maximum, int2(), sizes=INT_SHAPES, dtypes=INT, kinds=PW),
    OpCase("int_cmp", lambda a, b: a <= b, int2(), sizes=INT_SHAPES, dtypes=INT, kinds=PW),
    OpCase("int_where", lambda a, b: torch.where(a > 0, a, b), int2(), sizes=INT_SHAPES, dtypes=INT, kinds=PW),
    OpCase("int64_to_float32", lambda a: a.to(torch.float32), lambda s, dt: (gen("int", s, dt),), sizes=INT_SHAPES,
           dtypes=INT, kinds=PW),
    OpCase("int64_to_int32", lambda a: (a * 1000003).to(torch.int32), lambda s, dt: (gen("int", s, dt),),
           sizes=INT_SHAPES, dtypes=INT, kinds=PW),
    OpCase("int_true_div", lambda a, b: a / b, lambda s, dt: (gen("int", s, dt), gen("smallint", s, dt)),
           sizes=INT_SHAPES, dtypes=INT, kinds=PW),
    OpCase("int_sum", lambda a: a.sum(-1), lambda s, dt: (gen("int", s, dt),), sizes=INT_SHAPES, dtypes=INT, kinds=RED),
    OpCase("logical_not", torch.logical_not, lambda s, dt: (gen("bool", s, dt),), sizes=INT_SHAPES, dtypes=BOOL,
           kinds=PW),
    OpCase("logical_and", torch.logical_and, bool2(), sizes=INT_SHAPES, dtypes=BOOL, kinds=PW),
    OpCase("logical_or", torch.logical_or, bool2(), sizes=INT_SHAPES, dtypes=BOOL, kinds=PW),
    OpCase("bool_to_float", lambda m: m.to(torch.float32) * 2.0, lambda s, dt: (gen("bool", s, dt),), sizes=INT_SHAPES,
           dtypes=BOOL, kinds=PW),
]

# -- reductions: sum/mean/amax/amin over each dim, with and without keepdim, and over all dims
_RED_OPS = {
    "sum": lambda x, d, k: x.sum(d, keepdim=k),
    "mean": lambda x, d, k: x.mean(d, keepdim=k),
    "amax": lambda x, d, k: x.amax(d, keepdim=k),
    "amin": lambda x, d, k: x.amin(d, keepdim=k),
}
_RED_ALL = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}


def _red(op, d, k):
    f = _RED_OPS[op]
    return lambda x: f(x, d, k)


for _op in _RED_OPS:
    for _d in (0, 1, 2, -1):
        for _k in (False, True):
            TABLE.append(OpCase(f"{_op}_d{_d}{'_keep' if _k else ''}", _red(_op, _d, _k), unary(),
                                sizes=RED_KEEP_SHAPES if _k else RED_SHAPES,
                                kinds=RED, accum=True))
    TABLE.append(OpCase(f"{_op}_all", _RED_ALL[_op], unary(), sizes=RED_SHAPES, kinds=RED, accum=True))
    TABLE.append(OpCase(f"{_op}_all_keep", _red(_op, (0, 1, 2), True), unary(), sizes=RED_KEEP_SHAPES, kinds=RED,
                        accum=True))

TABLE += [
    OpCase("sum_d02", lambda x: x.sum((0, 2)), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("mean_d12_keep", lambda x: x.mean((1, 2), keepdim=True), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    # Longer than max_persistent_rblock (4096): recorded fallback, but must still be right.
    OpCase("sum_long", lambda x: x.sum(-1), unary(), sizes=((3, 5000),), expect_kernel=False, accum=True),
    # -- variance / std
    OpCase("var_last_c0", lambda x: torch.var(x, -1, correction=0), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("var_last_c1", lambda x: torch.var(x, -1, correction=1), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("var_d0_c1_keep", lambda x: torch.var(x, 0, correction=1, keepdim=True), unary(), sizes=RED_SHAPES,
           kinds=RED, accum=True),
    OpCase("var_d1_c0", lambda x: torch.var(x, 1, correction=0), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("var_all_c1", lambda x: torch.var(x, correction=1), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("std_last_c1", lambda x: torch.std(x, -1, correction=1), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("std_d1_c0_keep", lambda x: torch.std(x, 1, correction=0, keepdim=True), unary(), sizes=RED_SHAPES,
           kinds=RED, accum=True),
    OpCase("std_all_c0", lambda x: torch.std(x, correction=0), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("var_mean_last", lambda x: torch.var_mean(x, -1, correction=1), unary(), sizes=RED_SHAPES, kinds=RED,
           accum=True),
    # -- softmax / norms
    OpCase("softmax_last", lambda x: torch.softmax(x * 3, -1), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("softmax_first", lambda x: torch.softmax(x * 3, 0), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("log_softmax_last", lambda x: torch.log_softmax(x * 3, -1), unary(), sizes=RED_SHAPES, kinds=RED,
           accum=True),
    OpCase("log_softmax_first", lambda x: torch.log_softmax(x * 3, 0), unary(), sizes=RED_SHAPES, kinds=RED,
           accum=True),
    # attention-style masking: -inf entries; a row that is masked everywhere gives NaN in eager too
    OpCase("masked_softmax", lambda x, m: torch.softmax(x.masked_fill(m, float("-inf")), -1), with_mask(),
           sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("layer_norm", lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5), norm_inputs(), sizes=RED_SHAPES,
           kinds=RED, accum=True),
    OpCase("layer_norm_noaffine", lambda x: F.layer_norm(x, x.shape[-1:]), norm_inputs(False), sizes=RED_SHAPES,
           kinds=RED, accum=True),
    OpCase("rmsnorm", lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, rms_inputs,
           sizes=RED_SHAPES, kinds=RED, accum=True),
    OpCase("sum_of_transposed", lambda x: x.transpose(0, 2).sum(-1), unary(), sizes=RED_SHAPES, kinds=RED, accum=True),
    # -- views + pointwise
    OpCase("transpose_add", lambda x, y: x.transpose(0, 1) + y, transpose_inputs, sizes=VIEW_SHAPES, kinds=PW),
    OpCase("permute_mul", lambda x, y: x.permute(2, 0, 1) * y, permute_inputs, sizes=VIEW_SHAPES, kinds=PW),
    OpCase("expand_add", lambda x: x[:, :1, :].expand(x.shape) + x, unary(), sizes=VIEW_SHAPES, kinds=PW),
    OpCase("unsqueeze_expand_mul", lambda x: x.unsqueeze(-1).expand(*x.shape, 4) * 2.0, unary(), sizes=VIEW_SHAPES,
           kinds=PW),
    OpCase("slice_step", lambda x: x[:, ::2, 1::3] * 3.0 - 1.0, unary(), sizes=VIEW_SHAPES, kinds=PW),
    OpCase("t_contiguous", lambda x: x.reshape(x.shape[0] * x.shape[1], -1).t().contiguous(), unary(),
           sizes=VIEW_SHAPES, kinds=PW),
    # (not (3, 1, 5): transposing a size-1 dim leaves a tensor that is already contiguous, no copy)
    OpCase("transpose_contiguous", lambda x: x.transpose(1, 2).contiguous(), unary(), sizes=((2, 7, 33), (1, 1000, 3)),
           kinds=PW),
    # -- matmuls (size = (M, K, N))
    OpCase("mm", torch.mm, mm_inputs, sizes=MM_SIZES, kinds=MMK, accum=True),
    OpCase("mm_transposed_a", lambda a, b: torch.mm(a.t(), b), mm_ta_inputs, sizes=MM_SIZES, kinds=MMK, accum=True),
    OpCase("linear_bias_3d", F.linear, linear_inputs(True), sizes=MM_SIZES, kinds=MMK, accum=True),
    OpCase("linear_nobias_3d", F.linear, linear_inputs(False), sizes=MM_SIZES, kinds=MMK, accum=True),
    OpCase("bmm", torch.bmm, bmm_inputs, sizes=MM_SIZES, kinds=MMK, accum=True),
    OpCase("addmm_alpha_beta", lambda c, a, b: torch.addmm(c, a, b, beta=2.0, alpha=0.5), addmm_inputs(),
           sizes=MM_SIZES, kinds=MMK, accum=True),
    OpCase("addmm_bias2d", lambda c, a, b: torch.addmm(c, a, b), addmm_inputs(True), sizes=MM_SIZES, kinds=MMK,
           accum=True),
    OpCase("linear_gelu_residual", lambda x, w, b, r: r + F.gelu(F.linear(x, w, b)),
           linear_inputs(True, residual=True), sizes=MM_SIZES, kinds=MMK, accum=True),
]

BY_NAME = {e.name: e for e in TABLE}
assert len(BY_NAME) == len(TABLE), "duplicate entry names"

# Representative entries also compiled through torch.compile (float32, one size each: jit_size).
JIT_SUBSET = ["add_bcast", "mul_scalar", "exp", "gelu_tanh", "silu", "where_cmp", "gt", "masked_fill_ninf",
              "cast_to_int32", "sum_d-1", "amax_d0_keep", "var_last_c1", "softmax_last", "layer_norm", "rmsnorm",
              "t_contiguous", "bmm", "linear_gelu_residual"]


# ---- harness --------------------------------------------------------------------------------------
class Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def size_id(size) -> str:
    return "(" + ",".join(str(s) for s in size) + ")"


def case_id(e: OpCase, dtype, size) -> str:
    return f"{e.name}-{DTYPE_NAME[dtype]}-{size_id(size)}"


def make_inputs(e: OpCase, dtype, size):
    torch.manual_seed(zlib.crc32(case_id(e, dtype, size).encode()))
    return tuple(e.build(size, dtype))


def as_list(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def to_f64(x):
    return x.double() if x.is_floating_point() else x


def check_outputs(e: OpCase, dtype, inputs, outs) -> None:
    """Compare compiled ``outs`` with eager and the float64 reference; raise AssertionError."""
    with torch.no_grad():
        eager = as_list(e.fn(*inputs))
        ref = as_list(e.fn(*[to_f64(x) for x in inputs]))
    outs = as_list(outs)
    assert len(outs) == len(eager), f"{len(outs)} outputs, eager has {len(eager)}"
    for i, (o, g, r) in enumerate(zip(outs, eager, ref)):
        assert isinstance(o, torch.Tensor), f"output {i} is {type(o).__name__}"
        assert o.shape == g.shape, f"output {i}: shape {tuple(o.shape)} != eager {tuple(g.shape)}"
        assert o.dtype == g.dtype, f"output {i}: dtype {o.dtype} != eager {g.dtype}"
        if not g.is_floating_point():
            if not torch.equal(o, g):
                bad = (o != g).nonzero()[:5].tolist()
                raise AssertionError(f"output {i} ({g.dtype}) differs from eager at {bad}: "
                                     f"got {[o[tuple(b)].item() for b in bad]}, want {[g[tuple(b)].item() for b in bad]}")
            continue
        if e.ref_in_out_dtype:
            r = r.to(g.dtype).double()
        err = rel_err(o, r)
        if g.dtype == torch.bfloat16 or dtype == torch.bfloat16:
            t = TOL[torch.bfloat16]
            eager_err = rel_err(g, r)
            if eager_err == float("inf"):  # eager bf16 itself differs from float64 in a NaN/Inf: match eager
                r, eager_err = g.double(), 0.0
                err = rel_err(o, r)
            bound = t["eager_factor"] * eager_err + t["floor"]
            assert err <= bound, (f"output {i}: rel err {err:.3g} > {bound:.3g} "
                                  f"(= {t['eager_factor']} x eager bf16 err {eager_err:.3g} + {t['floor']:g})")
        else:
            tol = TOL[torch.float32]["accum" if e.accum else "pointwise"]
            assert err <= tol, f"output {i}: rel err {err:.3g} > {tol:g} (eager fp32 err {rel_err(g, r):.3g})"


def check_report(e: OpCase, report) -> None:
    if not e.expect_kernel:
        return
    assert not report.fallbacks, f"unexpected fallbacks: {report.fallbacks}\n{report}"
    assert report.num_kernels >= 1, f"no kernel was generated\n{report}"
    kinds = report.kernel_kinds()
    for k in e.kinds:
        assert k in kinds, f"expected a {k} kernel, got {kinds}\n{report}"


def sizes_for(e: OpCase, dtype) -> tuple:
    return BF16_SIZES.get(e.sizes, e.sizes) if dtype == torch.bfloat16 else e.sizes


AOT_CASES = [pytest.param(e, dt, sz, id=case_id(e, dt, sz)) for e in TABLE for dt in e.dtypes for sz in sizes_for(e, dt)]


@pytest.mark.parametrize("entry,dtype,size", AOT_CASES)
def test_aot(entry: OpCase, dtype, size):
    inputs = make_inputs(entry, dtype, size)
    compiled = fxforge.compile(Wrap(entry.fn), inputs)
    outs = compiled(*inputs)
    check_outputs(entry, dtype, inputs, outs)
    check_report(entry, compiled.report)


def jit_size(e: OpCase):
    """One size per JIT entry: the first multi-dim size, else the largest 1-D one."""
    multi = [s for s in e.sizes if len(s) > 1]
    return multi[0] if multi else e.sizes[-1]


JIT_CASES = [pytest.param(BY_NAME[n], torch.float32, jit_size(BY_NAME[n]),
                          id=case_id(BY_NAME[n], torch.float32, jit_size(BY_NAME[n]))) for n in JIT_SUBSET]


@pytest.mark.parametrize("entry,dtype,size", JIT_CASES)
def test_jit(entry: OpCase, dtype, size):
    inputs = make_inputs(entry, dtype, size)
    torch._dynamo.reset()
    n_before = len(fxforge.backend.reports)
    compiled = torch.compile(Wrap(entry.fn), backend="fxforge")
    with torch.no_grad():
        outs = compiled(*inputs)
    check_outputs(entry, dtype, inputs, outs)
    reports = fxforge.backend.reports[n_before:]
    assert reports, "the fxforge backend compiled no graph"
    for r in reports:
        check_report(entry, r)


def test_table_covers_enough_ops():
    assert len(TABLE) >= 45
    assert len(JIT_SUBSET) >= 15
