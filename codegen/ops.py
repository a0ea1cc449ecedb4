"""What each ATen op is to codegen: a pointwise expression, a reduction, a matmul anchor, a view
(run at run time as a metadata-only ATen call), or something we have no Triton lowering for (run as
an eager ATen call, recorded with a typed reason).

Pointwise lowerings are small functions ``(e: ExprBuilder, node) -> str`` that return a Triton
expression over already-emitted operand values. They compute in the node's *compute dtype*
(fp32 for fp16/bf16/fp32, as Inductor does), so a fused chain rounds once at the store; explicit
dtype casts in the graph round explicitly.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from fxforge.registry import registry

aten = torch.ops.aten
prims = torch.ops.prims

TL_STORAGE = {
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.int16: "tl.int16",
    torch.int32: "tl.int32", torch.int64: "tl.int64", torch.bool: "tl.int1",
}
SUPPORTED_DTYPES = frozenset(TL_STORAGE)


def compute_dtype(dt: torch.dtype) -> str:
    """Registers hold fp16/bf16 as fp32; everything else as itself."""
    if dt in (torch.float16, torch.bfloat16, torch.float32):
        return "tl.float32"
    return TL_STORAGE[dt]


def cast_to(expr: str, tl_dtype: str) -> str:
    """``expr`` rounded to storage dtype ``tl_dtype``; bf16 goes through the kernel-module helper
    ``to_bf16`` (emit_common), which rounds to nearest-even also under the CPU interpreter."""
    return f"to_bf16({expr}, INTERPRETED)" if tl_dtype == "tl.bfloat16" else f"{expr}.to({tl_dtype})"


def literal(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        if math.isnan(v):
            return 'float("nan")'
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        return repr(v)
    raise TypeError(f"not a scalar literal: {v!r}")


def val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


class ExprBuilder:
    """What a lowering sees: operand expressions, cast to a requested compute dtype."""

    def __init__(self, value_of: Callable[[fx.Node], str], full_shape: str):
        self.value_of = value_of  # node -> expression (already in its compute dtype)
        self.full_shape = full_shape  # e.g. "[XBLOCK]" — shape of a constant block in this kernel

    def arg(self, x, dtype: str | None = None) -> str:
        if isinstance(x, fx.Node):
            v = val(x)
            expr = self.value_of(x)
            if dtype is not None and v is not None and compute_dtype(v.dtype) != dtype:
                return f"{expr}.to({dtype})"
            return expr
        if isinstance(x, (int, float, bool)):
            if dtype == "tl.int1":
                return literal(bool(x))
            if dtype is not None and dtype.startswith("tl.float") and isinstance(x, (int, bool)):
                return literal(float(x))
            return literal(x)
        raise TypeError(f"unsupported operand {x!r}")

    def out(self, node) -> str:
        return compute_dtype(val(node).dtype)

    def promoted(self, *xs) -> str:
        """Compute dtype of torch's type promotion of the operands (for comparisons)."""
        items = [val(x) if isinstance(x, fx.Node) else x for x in xs]
        items = [torch.empty((), dtype=i.dtype) if isinstance(i, torch.Tensor) else i for i in items]
        dt = items[0] if len(items) == 1 and isinstance(items[0], torch.Tensor) else torch.result_type(*items[:2])
        return compute_dtype(dt.dtype if isinstance(dt, torch.Tensor) else dt)


Lower = Callable[[ExprBuilder, fx.Node], str]
POINTWISE: dict = {}


def pointwise(*ops):
    def deco(fn: Lower):
        for op in ops:
            POINTWISE[op] = fn
            registry.register_lowering(op, fn)
        return fn
    return deco


def _binary(fmt: str):
    def lower(e: ExprBuilder, n: fx.Node) -> str:
        d = e.out(n)
        a, b = e.arg(n.args[0], d), e.arg(n.args[1], d)
        alpha = n.kwargs.get("alpha", 1)
        if alpha != 1:
            b = f"({b} * {e.arg(alpha, d)})"
        return fmt.format(a=a, b=b)
    return lower


def _unary(fmt: str):
    def lower(e: ExprBuilder, n: fx.Node) -> str:
        return fmt.format(a=e.arg(n.args[0], e.out(n)))
    return lower


def _compare(sym: str):
    def lower(e: ExprBuilder, n: fx.Node) -> str:
        d = e.promoted(n.args[0], n.args[1])
        return f"({e.arg(n.args[0], d)} {sym} {e.arg(n.args[1], d)})"
    return lower


pointwise(aten.add.Tensor, aten.add.Scalar)(_binary("({a} + {b})"))
pointwise(aten.sub.Tensor, aten.sub.Scalar)(_binary("({a} - {b})"))
pointwise(aten.mul.Tensor, aten.mul.Scalar)(_binary("({a} * {b})"))
pointwise(aten.div.Tensor, aten.div.Scalar)(_binary("({a} / {b})"))
def nan_max(a: str, b: str, d: str) -> str:
    """max/min that propagate NaN like torch (Triton's default drops it) for float compute dtypes."""
    return f"tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)" if d.startswith("tl.float") else f"tl.maximum({a}, {b})"


def nan_min(a: str, b: str, d: str) -> str:
    return f"tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)" if d.startswith("tl.float") else f"tl.minimum({a}, {b})"


@pointwise(aten.maximum.default)
def _maximum(e, n):
    d = e.out(n)
    return nan_max(e.arg(n.args[0], d), e.arg(n.args[1], d), d)


@pointwise(aten.minimum.default)
def _minimum(e, n):
    d = e.out(n)
    return nan_min(e.arg(n.args[0], d), e.arg(n.args[1], d), d)
pointwise(aten.bitwise_and.Tensor, aten.logical_and.default)(_binary("({a} & {b})"))
pointwise(aten.bitwise_or.Tensor, aten.logical_or.default)(_binary("({a} | {b})"))
pointwise(aten.bitwise_xor.Tensor, aten.logical_xor.default)(_binary("({a} ^ {b})"))
pointwise(aten.eq.Tensor, aten.eq.Scalar)(_compare("=="))
pointwise(aten.ne.Tensor, aten.ne.Scalar)(_compare("!="))
pointwise(aten.lt.Tensor, aten.lt.Scalar)(_compare("<"))
pointwise(aten.le.Tensor, aten.le.Scalar)(_compare("<="))
pointwise(aten.gt.Tensor, aten.gt.Scalar)(_compare(">"))
pointwise(aten.ge.Tensor, aten.ge.Scalar)(_compare(">="))
pointwise(aten.neg.default)(_unary("(-{a})"))
pointwise(aten.abs.default)(_unary("tl.abs({a})"))
pointwise(aten.exp.default)(_unary("tl.exp({a})"))
pointwise(aten.exp2.default)(_unary("tl.exp2({a})"))
# Kahan's tricks keep expm1/log1p accurate for tiny |x| without libdevice (absent in the interpreter).
pointwise(aten.expm1.default)(_unary(
    "tl.where(tl.exp({a}) == 1.0, {a}, tl.where(tl.exp({a}) - 1.0 == -1.0, -1.0, (tl.exp({a}) - 1.0) * {a} / tl.log(tl.exp({a}))))"))
pointwise(aten.log.default)(_unary("tl.log({a})"))
pointwise(aten.log2.default)(_unary("tl.log2({a})"))
pointwise(aten.log1p.default)(_unary("tl.where(1.0 + {a} == 1.0, {a}, tl.log(1.0 + {a}) * {a} / ((1.0 + {a}) - 1.0))"))
pointwise(aten.sqrt.default)(_unary("tl.sqrt({a})"))
pointwise(aten.rsqrt.default)(_unary("tl.rsqrt({a})"))
pointwise(aten.reciprocal.default)(_unary("(1.0 / {a})"))
pointwise(aten.sigmoid.default)(_unary("tl.sigmoid({a})"))
# tanh through sigmoid: libdevice is not available in the Triton CPU interpreter.
# near 0, 2·sigmoid(2x) − 1 cancels: use the odd Taylor series there (error < 1e-10 for |x| < 0.1).
pointwise(aten.tanh.default)(_unary(
    "tl.where(tl.abs({a}) < 0.1, {a} * (1.0 + {a} * {a} * (-0.3333333333333333 + {a} * {a} * (0.13333333333333333"
    " - 0.05396825396825397 * {a} * {a}))), 2.0 * tl.sigmoid(2.0 * {a}) - 1.0)"))
pointwise(aten.erf.default)(_unary("tl.erf({a})"))
pointwise(aten.sin.default)(_unary("tl.sin({a})"))
pointwise(aten.cos.default)(_unary("tl.cos({a})"))
pointwise(aten.floor.default)(_unary("tl.floor({a})"))
pointwise(aten.ceil.default)(_unary("tl.ceil({a})"))
pointwise(aten.trunc.default)(_unary("tl.where({a} < 0, tl.ceil({a}), tl.floor({a}))"))
pointwise(aten.bitwise_not.default)(_unary("(~{a})"))
# A clone that survives remove_noops changes layout: the kernel writes the output's own strides.
pointwise(aten.clone.default)(_unary("{a}"))


@pointwise(aten.relu.default)
def _relu(e, n):
    d = e.out(n)
    return nan_max(e.arg(n.args[0], d), "0", d)


@pointwise(aten.logical_not.default)
def _logical_not(e, n):
    return f"({e.arg(n.args[0], e.promoted(n.args[0]))} == 0)"


@pointwise(aten.isnan.default)
def _isnan(e, n):
    a = e.arg(n.args[0])
    return f"({a} != {a})"


@pointwise(aten.isinf.default)
def _isinf(e, n):
    a = e.arg(n.args[0])
    return f"(tl.abs({a}) == float(\"inf\"))"


@pointwise(aten.sign.default)
def _sign(e, n):
    d = e.out(n)
    a = e.arg(n.args[0], d)
    return f"(({a} > 0).to({d}) - ({a} < 0).to({d}))"


@pointwise(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(e, n):
    d = e.out(n)
    b = e.arg(n.args[1], d)
    alpha = n.kwargs.get("alpha", 1)
    a = e.arg(n.args[0], d) if alpha == 1 else f"({e.arg(n.args[0], d)} * {e.arg(alpha, d)})"
    return f"({b} - {a})"


@pointwise(aten.div.Tensor_mode)
def _div_mode(e, n):
    mode = n.kwargs.get("rounding_mode")
    d = e.out(n)
    q = f"({e.arg(n.args[0], d)} / {e.arg(n.args[1], d)})"
    if mode == "floor":
        return f"tl.floor({q})"
    if mode == "trunc":
        return f"tl.where({q} < 0, tl.ceil({q}), tl.floor({q}))"
    return q


def _int_pow(a: str, k: int) -> str:
    if k == 0:
        return f"({a} * 0 + 1)"
    return "(" + " * ".join([a] * k) + ")"


@pointwise(aten.pow.Tensor_Scalar)
def _pow_scalar(e, n):
    d = e.out(n)
    a, k = e.arg(n.args[0], d), n.args[1]
    if isinstance(k, (int, float)) and float(k).is_integer() and abs(k) <= 8:
        k = int(k)
        return _int_pow(a, k) if k >= 0 else f"(1.0 / {_int_pow(a, -k)})"
    if k == 0.5:
        return f"tl.sqrt({a})"
    if k == -0.5:
        return f"tl.rsqrt({a})"
    # Non-integer exponent: x**k = exp2(k*log2 x) for x>=0; NaN for x<0, as torch.
    return f"tl.where({a} < 0, float(\"nan\"), tl.exp2({literal(float(k))} * tl.log2({a})))"


@pointwise(aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow_tensor(e, n):
    d = e.out(n)
    a, b = e.arg(n.args[0], d), e.arg(n.args[1], d)
    # Negative bases: |a|**b with the sign of a when b is an odd integer, NaN when b is not integral.
    mag = f"tl.exp2({b} * tl.log2(tl.abs({a})))"
    is_int = f"({b} == tl.floor({b}))"
    odd = f"((tl.floor({b}) - 2.0 * tl.floor({b} * 0.5)) == 1.0)"
    neg = f"tl.where({is_int}, tl.where({odd}, -{mag}, {mag}), float(\"nan\"))"
    return f"tl.where({a} < 0, {neg}, tl.where(({a} == 0) & ({b} == 0), 1.0, {mag}))"


@pointwise(aten.clamp.default, aten.clamp.Tensor)
def _clamp(e, n):
    d = e.out(n)
    x = e.arg(n.args[0], d)
    lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
    hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
    if lo is not None:
        x = nan_max(x, e.arg(lo, d), d)
    if hi is not None:
        x = nan_min(x, e.arg(hi, d), d)
    return x


@pointwise(aten.clamp_min.default, aten.clamp_min.Tensor)
def _clamp_min(e, n):
    d = e.out(n)
    return nan_max(e.arg(n.args[0], d), e.arg(n.args[1], d), d)


@pointwise(aten.clamp_max.default, aten.clamp_max.Tensor)
def _clamp_max(e, n):
    d = e.out(n)
    return nan_min(e.arg(n.args[0], d), e.arg(n.args[1], d), d)


@pointwise(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(e, n):
    d = e.out(n)
    return f"tl.where({e.arg(n.args[0], 'tl.int1')}, {e.arg(n.args[1], d)}, {e.arg(n.args[2], d)})"


@pointwise(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(e, n):
    d = e.out(n)
    return f"tl.where({e.arg(n.args[1], 'tl.int1')}, {e.arg(n.args[2], d)}, {e.arg(n.args[0], d)})"


@pointwise(aten.leaky_relu.default)
def _leaky_relu(e, n):
    d = e.out(n)
    a = e.arg(n.args[0], d)
    slope = n.args[1] if len(n.args) > 1 else 0.01
    return f"tl.where({a} > 0, {a}, {a} * {literal(float(slope))})"


@pointwise(aten.hardtanh.default)
def _hardtanh(e, n):
    d = e.out(n)
    lo = n.args[1] if len(n.args) > 1 else -1.0
    hi = n.args[2] if len(n.args) > 2 else 1.0
    return nan_min(nan_max(e.arg(n.args[0], d), literal(float(lo)), d), literal(float(hi)), d)


def _cast(e: ExprBuilder, n: fx.Node) -> str:
    """An explicit cast rounds to the target dtype, then returns to its compute dtype."""
    out_dt = val(n).dtype
    src = val(n.args[0]).dtype
    x = e.arg(n.args[0])
    if out_dt == torch.bool:
        return f"({x} != 0)"
    store, comp = TL_STORAGE[out_dt], compute_dtype(out_dt)
    if src.is_floating_point and not out_dt.is_floating_point:
        # float -> int truncates toward zero, as torch
        x = f"tl.where({x} < 0, tl.ceil({x}), tl.floor({x}))"
    return f"{cast_to(x, store)}.to({comp})" if store != comp else f"{x}.to({store})"


pointwise(aten._to_copy.default, prims.convert_element_type.default)(_cast)


@pointwise(aten.copy.default)
def _copy(e, n):  # copy(dst, src): src broadcast into dst's shape and dtype
    return f"{cast_to(e.arg(n.args[1]), TL_STORAGE[val(n).dtype])}.to({e.out(n)})"


@pointwise(aten.full.default, aten.full_like.default, aten.scalar_tensor.default)
def _full(e, n):
    value = n.args[1] if n.target is not aten.scalar_tensor.default else n.args[0]
    d = e.out(n)
    return f"tl.full({e.full_shape}, {e.arg(value, d)}, {d})"


@pointwise(aten.zeros_like.default, aten.ones_like.default)
def _zeros_ones_like(e, n):
    d = e.out(n)
    return f"tl.full({e.full_shape}, {1 if n.target is aten.ones_like.default else 0}, {d})"


# ---- reductions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReductionInfo:
    kind: str  # "sum" | "mean" | "amax" | "amin" | "var" | "var_mean"
    dims: tuple[int, ...]  # normalized, sorted
    keepdim: bool
    correction: float = 0.0


def reduction_info(n: fx.Node) -> ReductionInfo | None:
    t = n.target
    x = val(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
    if x is None:
        return None
    rank = x.dim()

    def norm(dims):
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return tuple(range(rank))
        dims = [dims] if isinstance(dims, int) else dims
        return tuple(sorted({d % rank if rank else 0 for d in dims}))

    if n.kwargs.get("dtype") is not None:
        return None
    if t is aten.sum.dim_IntList:
        return ReductionInfo("sum", norm(n.args[1]), bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)))
    if t is aten.sum.default:
        return ReductionInfo("sum", norm(None), False)
    if t is aten.mean.dim:
        return ReductionInfo("mean", norm(n.args[1]), bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)))
    if t is aten.mean.default:
        return ReductionInfo("mean", norm(None), False)
    if t in (aten.amax.default, aten.amin.default):
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", [])
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        return ReductionInfo("amax" if t is aten.amax.default else "amin", norm(dims), bool(keep))
    if t in (aten.var.correction, aten.var_mean.correction):
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        corr = n.kwargs.get("correction")
        corr = 1.0 if corr is None else float(corr)
        return ReductionInfo("var" if t is aten.var.correction else "var_mean", norm(dims), bool(n.kwargs.get("keepdim", False)), corr)
    return None


REDUCTIONS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
              aten.amin.default, aten.var.correction, aten.var_mean.correction}
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default}
# Views that only re-split a contiguous buffer's dims: a matmul epilogue can follow them.
RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.t.default,
         aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
         aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default, aten.as_strided.default,
         aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.diagonal.default,
         aten.view_as_real.default, aten.view_as_complex.default, aten.unfold.default, aten.chunk.default,
         aten.narrow.default, aten.detach.default}


ATTENTION = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_cudnn_attention.default}


@dataclass(frozen=True)
class Classified:
    kind: str  # pointwise | reduction | matmul | attention | library | view | getitem | extern | sym
    reason: str | None = None  # for extern: why it is not lowered


MAX_CAT_INPUTS = 8


def cat_dim(n: fx.Node) -> int:
    d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return d % val(n).dim()


def cat_unsupported_reason(n: fx.Node) -> str | None:
    """``cat`` lowers into a pointwise kernel (each input read through a shifted, masked load) when
    its inputs are tensors of the output's rank with static sizes along the cat axis."""
    out = val(n)
    xs = n.args[0]
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or not all(isinstance(x, fx.Node) for x in xs):
        return "cat: non-tensor inputs"
    if len(xs) > MAX_CAT_INPUTS:
        return f"cat: more than {MAX_CAT_INPUTS} inputs"
    d = cat_dim(n)
    vals = [val(x) for x in xs]
    if any(v is None or v.dim() != out.dim() or v.dtype != out.dtype for v in vals):
        return "cat: inputs of another rank or dtype (legacy 1-D empty inputs or type promotion)"
    if any(isinstance(v.shape[d], torch.SymInt) for v in vals):
        return "cat: dynamic size along the cat axis"
    return None


def classify(n: fx.Node) -> Classified:
    v = n.meta.get("val")
    if n.meta.get("fxforge_extern"):
        return Classified("extern", n.meta["fxforge_extern"])
    if n.target is operator.getitem:
        return Classified("getitem")
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and not isinstance(v, torch.Tensor):
        return Classified("sym")
    t = n.target
    if t in VIEWS:
        return Classified("view")
    if isinstance(v, torch.Tensor):
        tensors = [val(a) for a in n.all_input_nodes] + [v]
        bad = [x.dtype for x in tensors if x is not None and x.dtype not in SUPPORTED_DTYPES]
        if bad:
            return Classified("extern", f"unsupported_dtype: {bad[0]}")
        if v.device.type not in ("cpu", "cuda"):
            return Classified("extern", f"unsupported_device: {v.device.type}")
    if any(not isinstance(a.meta.get("val"), torch.Tensor) for a in n.all_input_nodes) and t in POINTWISE:
        return Classified("extern", "symbolic_scalar_operand: a SymInt/SymFloat feeds this op")
    if t in MATMULS:
        if v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return Classified("extern", f"matmul_dtype: {v.dtype}")
        return Classified("matmul")
    if t in REDUCTIONS:
        info = reduction_info(n)
        if info is None:
            return Classified("extern", "reduction_variant: unsupported arguments")
        return Classified("reduction")
    if t in POINTWISE:
        return Classified("pointwise")
    if t is aten.index_put_.default:  # a state update made in place: runtime/scatter.py's kernel
        return Classified("library")
    if t is aten.cat.default:
        why = cat_unsupported_reason(n)
        return Classified("extern", why) if why else Classified("pointwise")
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "fxforge":
        return Classified("library")  # fxforge's own kernels behind a custom op (e.g. Winograd conv)
    if t in ATTENTION:
        from .emit_attention import unsupported_reason

        why = unsupported_reason(n)
        return Classified("extern", why) if why else Classified("attention")
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
        return Classified("extern", f"random_op: {t}")
    name = str(t)
    return Classified("extern", f"no_lowering: {name}")
