"""Emit a Triton kernel for a pointwise or (persistent) reduction group.

Bytes/FLOPs model: each input is read once and each output written once; intermediates live in
registers. A pointwise kernel is bandwidth-bound, expected time = bytes / HBM bandwidth. A
reduction kernel keeps a [XBLOCK, RBLOCK] tile (RBLOCK = next_pow2(reduced length)) in registers,
so softmax / layer norm read their input once instead of two or three times.

Kernel dims are the group's iteration dims (statically-1 dims dropped): for a reduction the kept
dims come first (indexed from ``xindex``), then the reduced dims (from ``rindex``). Every operand
is addressed through runtime strides, so any strided or broadcast layout works without copies.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxforge.runtime.program import KernelStep

from .emit_common import (OperandTable, Source, cast_to, decompose, header, is_static_one, load_cast, offset, out_val, size_str,
                          store_dtype, tensor_sig)
from .fusion import Group, prod, shape_of
from .ops import POINTWISE, ExprBuilder, cat_dim, compute_dtype, reduction_info, val

aten = torch.ops.aten


def _identity(kind: str, dtype: str) -> str:
    if kind in ("sum", "mean", "var", "var_mean"):
        return "0"
    big = {"tl.float32": 'float("inf")', "tl.float64": 'float("inf")', "tl.int1": "1",
           "tl.int8": "127", "tl.uint8": "255", "tl.int16": "32767", "tl.int32": "2147483647",
           "tl.int64": "9223372036854775807"}[dtype]
    if kind == "amin":
        return big
    return {"tl.int1": "0", "tl.uint8": "0"}.get(dtype, f"-{big}" if "inf" not in big else 'float("-inf")')


def emit_pointwise_group(g: Group, name: str, outputs: list[fx.Node]) -> tuple[str, KernelStep]:
    red = g.kind == "reduction"
    korder = [d for d in range(len(g.F)) if not is_static_one(g.F[d])]
    if red:
        korder = [d for d in korder if d not in g.rdims] + [d for d in korder if d in g.rdims]
    nx_ = sum(1 for d in korder if d not in g.rdims)
    kpos = {f: k for k, f in enumerate(korder)}
    sizes = [f"n{k}" for k in range(len(korder))]
    ops = OperandTable()
    body = Source()
    used_idx: set[int] = set()
    values: dict[fx.Node, str] = {}
    tile: dict[str, bool] = {}  # var -> varies along the reduction axis ([X, R] rather than [X, 1])

    def is_r(k: int) -> bool:
        return red and k >= nx_

    def operand_for(x: fx.Node, consumer: fx.Node) -> tuple[list[int], list[int]]:
        """Kernel dims of external tensor ``x`` read by ``consumer``, right-aligned broadcasting."""
        # a reduction reads its input over the whole iteration space, whatever its own (reduced) dims
        xs = shape_of(x)
        cs = tuple(range(len(g.F))) if reduction_info(consumer) is not None else g.dims[consumer]
        off = len(cs) - len(xs)
        pairs = []
        for i, s in enumerate(xs):
            if is_static_one(s):
                continue
            f = cs[i + off]
            if f in kpos:
                pairs.append((kpos[f], i))
        pairs.sort()
        return [k for k, _ in pairs], [i for _, i in pairs]

    def mask_for(r: bool) -> str:
        return "xmask & rmask" if r else "xmask"

    loads_src = Source()

    def value_of(consumer: fx.Node, used: list):
        def get(x: fx.Node) -> str:
            if x in values:
                used.append(values[x])
                return values[x]
            kd, td = operand_for(x, consumer)
            ptr, fresh = ops.load(x, kd, td)
            var = f"l{ptr[2:]}"
            if fresh:
                used_idx.update(kd)
                r = any(is_r(k) for k in kd)
                off = offset(ptr, ops.loads[-1][1], lambda k: f"i{k}") or "xindex * 0"
                loads_src(f"{var} = tl.load({ptr} + ({off}), mask={mask_for(r)}, other=0){load_cast(x)}")
                tile[var] = r
            used.append(var)
            return var
        return get

    def emit_cat(n: fx.Node, var: str) -> bool:
        """out[..., i, ...] = input j at i - start_j along the cat axis, where start_j <= i < end_j:
        one masked load per input (masked-off lanes read nothing), selected with tl.where."""
        d = cat_dim(n)
        k = kpos[g.dims[n][d]]
        used_idx.add(k)
        parts, start = [], 0
        r_any = is_r(k)
        for j, x in enumerate(n.args[0]):
            size = int(val(x).shape[d])
            if size == 0:
                continue
            kd, td = operand_for(x, n)
            ptr, _ = ops.load(x, kd, td, tag=(n.name, j))
            used_idx.update(kd)
            r_any = r_any or any(is_r(q) for q in kd)
            off = offset(ptr, ops.loads[-1][1], lambda q: f"(i{q} - {start})" if q == k else f"i{q}") or "xindex * 0"
            lv = f"l{ptr[2:]}"
            loads_src(f"{lv} = tl.load({ptr} + ({off}), mask={mask_for(r_any)} & (i{k} >= {start}) & (i{k} < {start + size}), other=0)"
                      f"{load_cast(x)}")
            parts.append((lv, start + size))
            start += size
        expr = parts[-1][0]
        for lv, end in reversed(parts[:-1]):
            expr = f"tl.where(i{k} < {end}, {lv}, {expr})"
        body(f"{var} = {expr}")
        return red and r_any

    full_shape = "[XBLOCK, RBLOCK]" if red else "[XBLOCK]"
    for i, n in enumerate(g.nodes):
        var = f"v{i}"
        reduced = n in g.reduced
        if n.target is operator.getitem:
            src = values[n.args[0]]
            values[n] = f"{src}_{n.args[1]}"
            tile[values[n]] = False
            continue
        if n.target is aten.cat.default:
            values[n] = var
            tile[var] = emit_cat(n, var)
            continue
        if n.target in POINTWISE:
            shape = "[XBLOCK, 1]" if (red and reduced) else full_shape
            used: list[str] = []
            expr = POINTWISE[n.target](ExprBuilder(value_of(n, used), shape), n)
            body(f"{var} = {expr}")
            tile[var] = red and not reduced and ("tl.full" in expr or any(tile.get(u, False) for u in used))
            values[n] = var
            continue
        # reduction
        info = reduction_info(n)
        x = n.args[0]
        src = value_of(n, [])(x)
        out = n.meta["val"][0] if isinstance(n.meta["val"], (tuple, list)) else n.meta["val"]
        cd = compute_dtype(out.dtype)
        if not tile.get(src, False):
            src = f"tl.broadcast_to({src}, [XBLOCK, RBLOCK])"
        src_c = f"{src}.to({cd})" if info.kind not in ("amax", "amin") else src
        m = "xmask & rmask"
        if info.kind in ("sum", "mean", "var", "var_mean"):
            body(f"{var}_sum = tl.sum(tl.where({m}, {src_c}, 0), 1)[:, None]")
            if info.kind == "sum":
                body(f"{var} = {var}_sum")
            else:
                body(f"{var}_mean = {var}_sum / rnumel")
                if info.kind == "mean":
                    body(f"{var} = {var}_mean")
                else:
                    body(f"{var}_dev = tl.where({m}, {src_c} - {var}_mean, 0)")
                    body(f"{var}_var = tl.sum({var}_dev * {var}_dev, 1)[:, None] / (rnumel - {float(info.correction)!r})")
                    if info.kind == "var":
                        body(f"{var} = {var}_var")
                    else:
                        body(f"{var}_0 = {var}_var")
                        body(f"{var}_1 = {var}_mean")
        else:
            fn = "tl.max" if info.kind == "amax" else "tl.min"
            body(f"{var} = {fn}(tl.where({m}, {src_c}, {_identity(info.kind, cd)}), 1)[:, None]")
            if cd.startswith("tl.float"):  # torch's amax/amin propagate NaN; tl.max/min drop it
                body(f"{var}_nan = tl.max(tl.where({m} & ({src_c} != {src_c}), 1, 0), 1)[:, None]")
                body(f"{var} = tl.where({var}_nan > 0, float(\"nan\"), {var})")
        values[n] = var
        tile[var] = False

    store_src = Source()
    for n in outputs:
        shape = shape_of(n)
        pairs = sorted((kpos[g.dims[n][i]], i) for i, s in enumerate(shape) if not is_static_one(s) and g.dims[n][i] in kpos)
        kd, td = [k for k, _ in pairs], [i for _, i in pairs]
        ptr = ops.store(n, kd, td)
        used_idx.update(kd)
        v = values[n]
        r = red and n not in g.reduced
        if r and not tile.get(v, False):
            v = f"tl.broadcast_to({v}, [XBLOCK, RBLOCK])"
        elif not red and not kd:
            v = f"tl.broadcast_to({v}, [XBLOCK])"
        off = offset(ptr, ops.stores[-1][1], lambda k: f"i{k}") or "xindex * 0"
        # a store's pointer must have the value's tile shape: add zero terms for axes it does not use
        if red and not any(k < nx_ for k in kd):
            off += " + xindex * 0"
        if r and not any(is_r(k) for k in kd):
            off += " + rindex * 0"
        store_src(f"tl.store({ptr} + ({off}), {cast_to(v, store_dtype(n))}, mask={mask_for(r)})")

    # ---- assemble ----
    src = Source()
    # PDL_SIGNAL (runtime: sm_90+): a kernel launched after this one with programmatic dependent launch (a quantized
    # GEMV) may be scheduled now; it fetches its weights and waits for this grid in griddepcontrol.wait
    src("if PDL_SIGNAL:")
    src("    tl.extra.cuda.gdc_launch_dependents()")
    if red:
        src("pid = tl.program_id(0).to(tl.int64) if INDEX64 else tl.program_id(0)  # 64-bit offsets past 2**31")
        src("xindex = pid * XBLOCK + tl.arange(0, XBLOCK)[:, None]")
        src("xmask = xindex < xnumel")
        src("rindex = tl.arange(0, RBLOCK)[None, :]")
        src("rmask = rindex < rnumel")
        idx = decompose("xindex", sizes[:nx_], "i") + [(f"i{nx_ + k}", e) for k, (_, e) in enumerate(decompose("rindex", sizes[nx_:], "r"))]
    else:
        src("pid = tl.program_id(0).to(tl.int64) if INDEX64 else tl.program_id(0)  # 64-bit offsets past 2**31")
        src("xindex = pid * XBLOCK + tl.arange(0, XBLOCK)")
        src("xmask = xindex < xnumel")
        idx = decompose("xindex", sizes, "i")
    for k, (v, e) in enumerate(idx):
        if k in used_idx:
            src(f"{v} = {e}")
    params = ops.pointer_args() + sizes + ["xnumel"] + (["rnumel"] if red else []) + ops.stride_args() + ["XBLOCK: tl.constexpr"] + (["RBLOCK: tl.constexpr"] if red else []) + ["INDEX64: tl.constexpr", "INTERPRETED: tl.constexpr", "PDL_SIGNAL: tl.constexpr = False"]
    code = f"def {name}({', '.join(params)}):\n" + "\n".join(
        [src.text(), loads_src.text(), body.text(), store_src.text()]).replace("\n\n", "\n") + "\n"
    text = header(name, g.kind, g.nodes, code) + code
    F = [g.F[d] for d in korder]
    xn = [F[k] for k in range(nx_)] if red else F
    launch = {"xnumel": size_str(prod(xn))}
    if red:
        launch["rnumel"] = size_str(prod(F[nx_:]))
    step = KernelStep(
        kernel=name, kind=g.kind,
        loads=[op for _, op, _ in ops.loads], stores=[op for _, op, _ in ops.stores],
        outputs={n.name: tensor_sig(out_val(n)) for n in outputs},
        sizes=[size_str(s) for s in F], launch=launch, nodes=[n.name for n in g.nodes],
    )
    return text, step
