"""Emit a Triton matmul (mm / addmm / bmm) with its pointwise epilogue fused.

Bytes/FLOPs model: 2·B·M·N·K FLOPs; bytes = (B·M·K + B·K·N)·elt + epilogue inputs + outputs.
The K loop accumulates in fp32 (``tl.dot``; IEEE precision for fp32 inputs, matching eager's
default of no TF32). The epilogue (bias, activation, residual add, casts, views that re-split the
rows) runs on the fp32 accumulator tile before the single store, so the matmul output never
round-trips through memory. Configs are chosen by runtime/autotune.py.

GEMV mode (M ≤ 4, decode): no tensor cores; a [BLOCK_M, BLOCK_N, BLOCK_K] fp32 accumulator of
products, reduced over K once. Bytes ≈ N·K·elt (the weight, read once); at 3.0 TB/s a 2048×11264
bf16 weight takes 15.4 µs. Measured on the H100 (benchmarks/results/probe_gemv.md): 2.2–2.9 TB/s
for weights ≥ 11 MB, 10–20% faster than cuBLAS's GEMV.

TMA twin: for 2-D mm/addmm the same source also defines ``<name>_tma`` (codegen/emit_matmul_tma.py),
a persistent Hopper kernel with TMA loads and these same epilogue lines; autotuning offers it on
sm_90+. Operands indexed by columns only (a bias) or rows only are loaded as [1, BLOCK_N] /
[BLOCK_M, 1] tiles and broadcast in registers, not once per tile element.

Epilogue members have a last dim N and prod(leading dims) = B·M, so every member is addressed from
the tile's global row (``b·M + m``) and column.
"""
from __future__ import annotations

import sympy
import torch
from fxforge.runtime.kernels import GEMV_MAX_M
from fxforge.runtime.program import KernelStep
from torch import fx

from .emit_common import (
    OperandTable,
    Source,
    cast_to,
    decompose,
    header,
    is_static_one,
    load_cast,
    out_val,
    size_str,
    store_dtype,
    tensor_sig,
)
from .emit_matmul_tma import emit_tma_function
from .fusion import Group, shape_of
from .ops import POINTWISE, RESHAPES, ExprBuilder, val

aten = torch.ops.aten


def _direct_call(g: Group, outputs: list[fx.Node]) -> dict | None:
    """When the group is the matmul alone (plus views), cuBLAS can write the output directly:
    {"op": "mm"|"addmm"|"bmm", "beta", "alpha"}; else None (an epilogue must run after it)."""
    if len(outputs) != 1 or any(n is not g.anchor and n.target not in RESHAPES for n in g.nodes):
        return None
    op = str(g.anchor.target).split(".")[-2]
    return {"op": op, "beta": g.anchor.kwargs.get("beta", 1), "alpha": g.anchor.kwargs.get("alpha", 1)}


def emit_matmul_group(g: Group, name: str, outputs: list[fx.Node]) -> tuple[str, KernelStep]:
    anchor = g.anchor
    bmm = anchor.target is aten.bmm.default
    a_node, b_node = (anchor.args[1], anchor.args[2]) if anchor.target is aten.addmm.default else (anchor.args[0], anchor.args[1])
    ops = OperandTable()
    a_ptr, _ = ops.load(a_node, [0, 1, 2] if bmm else [1, 2], [0, 1, 2] if bmm else [0, 1])
    b_ptr, _ = ops.load(b_node, [0, 1, 2] if bmm else [1, 2], [0, 1, 2] if bmm else [0, 1])
    fp32 = val(a_node).dtype == torch.float32 and val(b_node).dtype == torch.float32

    # Leading ("row") shapes of the epilogue members; each gets its own row decomposition.
    row_shapes: list[tuple] = []
    sizes: list = []
    idx_names: dict = {}  # (shape_id, d) -> index var ; "col" -> rn

    def row_shape_id(shape: tuple) -> int:
        lead = tuple(shape[:-1])
        for j, s in enumerate(row_shapes):
            if len(s) == len(lead) and all(x == y for x, y in zip(s, lead)):
                return j
        row_shapes.append(lead)
        return len(row_shapes) - 1

    index_lines = Source()
    index_lines.indent = 1

    def operand_dims(x_shape: tuple, consumer_shape: tuple) -> tuple[list, list, list]:
        """Index vars, kernel-dim ids and tensor dims of an operand right-aligned into consumer_shape."""
        j = row_shape_id(consumer_shape)
        lead = row_shapes[j]
        off = len(consumer_shape) - len(x_shape)
        vars_, kd, td = [], [], []
        for i, s in enumerate(x_shape):
            if is_static_one(s):
                continue
            cd = i + off
            if cd == len(consumer_shape) - 1:
                v = "col"
            else:
                v = f"r{j}_{cd}"
                if v not in idx_names.values():
                    names = [f"m{j}_{d}" for d in range(len(lead))]
                    for dv, expr in decompose("row", names, f"r{j}_"):
                        if dv == v:
                            index_lines(f"{v} = {expr}")
                    idx_names[(j, cd)] = v
            vars_.append(v)
            kd.append(100 * (j + 1) + cd if v != "col" else 0)
            td.append(i)
        return vars_, kd, td

    body = Source()
    values: dict[fx.Node, str] = {}
    tile_loads: list[tuple[str, str, str]] = []  # (plain load line, descriptor load line, pointer name)

    def load_ext(x: fx.Node, consumer_shape: tuple) -> str:
        vars_, kd, td = operand_dims(shape_of(x), consumer_shape)
        ptr, fresh = ops.load(x, kd, td)
        var = f"l{ptr[2:]}"
        if fresh:
            off = " + ".join(f"{v} * {ptr}_s{k}" for v, k in zip(vars_, kd)) or "row * 0 + col * 0"
            # A bias-like operand (columns only) or a per-row one is loaded as a [1, BLOCK_N] or
            # [BLOCK_M, 1] tile and broadcast in registers, not re-loaded for every element of the tile.
            mask = "tile_mask" if not vars_ else "col < N" if all(v == "col" for v in vars_) else \
                "tile_mask" if "col" in vars_ else "rm[:, None] < M"
            line = f"{var} = tl.load({ptr} + ({off}), mask={mask}, other=0){load_cast(x)}"
            if mask == "tile_mask" and "col" in vars_ and len(vars_) > 1:
                # a full-tile operand (a residual, SiLU*up's up): the TMA twin may load it through a descriptor
                tile_loads.append((line, f"{var} = t{len(tile_loads)}_desc.load([m0, cn]){load_cast(x)}", ptr))
            body(line)
        return var

    for i, n in enumerate(g.nodes):
        var = f"v{i}"
        if n is anchor:
            expr = "acc"
            if anchor.target is aten.addmm.default:
                beta, alpha = anchor.kwargs.get("beta", 1), anchor.kwargs.get("alpha", 1)
                bias = load_ext(anchor.args[0], shape_of(anchor))
                expr = f"({'acc' if alpha == 1 else f'acc * {alpha!r}'} + {bias if beta == 1 else f'{bias} * {beta!r}'})"
            body(f"{var} = {expr}")
        elif n.target in RESHAPES:
            body(f"{var} = {values[n.args[0]]}")
        else:
            s = shape_of(n)

            def get(x, s=s):
                return values[x] if x in values else load_ext(x, s)
            body(f"{var} = {POINTWISE[n.target](ExprBuilder(get, '[BLOCK_M, BLOCK_N]'), n)}")
        values[n] = var

    first_store = None
    for n in outputs:
        vars_, kd, td = operand_dims(shape_of(n), shape_of(n))
        ptr = ops.store(n, kd, td)
        off = " + ".join(f"{v} * {ptr}_s{k}" for v, k in zip(vars_, kd)) or "0"
        # a store's pointer must have the full tile shape: add zero terms for axes it does not use
        if "col" not in vars_:
            off += " + col * 0"
        if all(v == "col" for v in vars_):
            off += " + row * 0"
        line = f"tl.store({ptr} + ({off}), {cast_to(values[n], store_dtype(n))}, mask=tile_mask)"
        if first_store is None:  # the TMA twin may store the first output through a TMA descriptor
            first_store = (line, cast_to(values[n], store_dtype(n)))
        body(line)

    for j, lead in enumerate(row_shapes):
        sizes += [(f"m{j}_{d}", s) for d, s in enumerate(lead)]
    # The A/B loads are addressed by the K loop itself, not through epilogue index vars.
    a_op, b_op = ops.loads[0][1], ops.loads[1][1]
    a_st = [f"{a_ptr}_s{k}" for k in a_op.kdims]
    b_st = [f"{b_ptr}_s{k}" for k in b_op.kdims]
    a_b, a_m, a_k = (a_st if bmm else ["0"] + a_st)
    b_b, b_k, b_n = (b_st if bmm else ["0"] + b_st)
    src = Source()
    src("pid = tl.program_id(0)")
    src("bid = tl.program_id(1)")
    src("num_pid_m = tl.cdiv(M, BLOCK_M)")
    src("num_pid_n = tl.cdiv(N, BLOCK_N)")
    src("# grouped ordering: GROUP_M row-blocks share B tiles in L2")
    src("group = pid // (GROUP_M * num_pid_n)")
    src("first_m = group * GROUP_M")
    src("group_m = tl.minimum(num_pid_m - first_m, GROUP_M)")
    src("pid_m = first_m + (pid % group_m)")
    src("pid_n = (pid % (GROUP_M * num_pid_n)) // group_m")
    src("rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)")
    src("rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)")
    src("row = bid * M + rm[:, None]")
    src("col = rn[None, :]")
    src("tile_mask = (rm[:, None] < M) & (rn[None, :] < N)")
    src("if EXTERNAL_ACC:")
    src("    # cuBLAS already computed A @ B into acc_in; this launch is the fused epilogue alone")
    src("    acc = tl.load(acc_in + bid * acc_sb + rm[:, None] * acc_sm + rn[None, :] * acc_sn, mask=tile_mask, other=0.0).to(tl.float32)")
    src("elif GEMV:")
    src("    # M <= BLOCK_M <= 4 (decode): CUDA-core dot products. Bandwidth-bound: each program streams")
    src("    # BLOCK_N rows of B^T along K (contiguous for a linear's weight) and reduces once at the end.")
    src("    rk = tl.arange(0, BLOCK_K)")
    src(f"    a_ptrs = {a_ptr} + bid * {a_b} + rm[:, None] * {a_m} + rk[None, :] * {a_k}")
    src(f"    w_ptrs = {b_ptr} + bid * {b_b} + rn[:, None] * {b_n} + rk[None, :] * {b_k}")
    src("    acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)")
    src("    for kb in range(0, tl.cdiv(K, BLOCK_K)):")
    src("        if EVEN_K:")
    src("            a = tl.load(a_ptrs, mask=rm[:, None] < M, other=0.0)")
    src("            w = tl.load(w_ptrs, mask=rn[:, None] < N, other=0.0)")
    src("        else:")
    src("            k_ok = rk < K - kb * BLOCK_K")
    src("            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)")
    src("            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & k_ok[None, :], other=0.0)")
    src("        acc3 += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]")
    src(f"        a_ptrs += BLOCK_K * {a_k}")
    src(f"        w_ptrs += BLOCK_K * {b_k}")
    src("    acc = tl.sum(acc3, 2)")
    src("else:")
    src("    rk = tl.arange(0, BLOCK_K)")
    src(f"    a_ptrs = {a_ptr} + bid * {a_b} + rm[:, None] * {a_m} + rk[None, :] * {a_k}")
    src(f"    b_ptrs = {b_ptr} + bid * {b_b} + rk[:, None] * {b_k} + rn[None, :] * {b_n}")
    src("    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)")
    src("    for kb in range(0, tl.cdiv(K, BLOCK_K)):")
    src("        k_ok = rk < K - kb * BLOCK_K")
    src("        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)")
    src("        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)")
    src("        if INTERPRETED:  # the CPU interpreter's low-precision dot is unreliable; upcast there")
    src("            a = a.to(tl.float32)")
    src("            b = b.to(tl.float32)")
    prec = ', input_precision="ieee"' if fp32 else ""
    src(f"        acc = tl.dot(a, b, acc{prec})")
    src(f"        a_ptrs += BLOCK_K * {a_k}")
    src(f"        b_ptrs += BLOCK_K * {b_k}")
    src("# epilogue on the fp32 tile")
    stride_args = ops.stride_args()
    params = ops.pointer_args() + ["M", "N", "K"] + [s for s, _ in sizes] + stride_args + ["acc_in", "acc_sb", "acc_sm", "acc_sn"] + [
        "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr", "GROUP_M: tl.constexpr", "EXTERNAL_ACC: tl.constexpr", "GEMV: tl.constexpr", "EVEN_K: tl.constexpr",
        "INTERPRETED: tl.constexpr"]
    code = f"def {name}({', '.join(params)}):\n{src.text()}\n{index_lines.text()}\n{body.text()}\n"
    # The Hopper TMA twin (same epilogue lines) for 2-D matmuls; bmm and decode-sized (M <= 4,
    # GEMV) matmuls keep the regular kernel alone.
    a_shape, b_shape = shape_of(a_node), shape_of(b_node)
    tma = not bmm and not (sympy.sympify(a_shape[-2]).is_Integer and int(a_shape[-2]) <= GEMV_MAX_M)
    if tma:
        runtime_params = ops.pointer_args() + ["M", "N", "K"] + [s for s, _ in sizes] + stride_args
        code += "\n\n@triton.jit\n" + emit_tma_function(name, runtime_params, index_lines.text(), body.text(), fp32, first_store,
                                                             [(plain, tma) for plain, tma, _ in tile_loads])
    text = header(name, "matmul", g.nodes, code) + code
    launch = {"M": size_str(a_shape[-2]), "N": size_str(b_shape[-1]), "K": size_str(a_shape[-1]),
              "batch": size_str(a_shape[0]) if bmm else 1, "op": str(anchor.target).split(".")[-2],
              "direct": _direct_call(g, outputs), "tma": tma,
              # pointer-argument indices of the full-tile epilogue operands (the TMA twin's t<j>_desc)
              "tma_tile_loads": [ops.pointer_args().index(ptr) for _, _, ptr in tile_loads] if tma else []}
    step = KernelStep(
        kernel=name, kind="matmul",
        loads=[op for _, op, _ in ops.loads], stores=[op for _, op, _ in ops.stores],
        outputs={n.name: tensor_sig(out_val(n)) for n in outputs},
        sizes=[size_str(s) for _, s in sizes], launch=launch, nodes=[n.name for n in g.nodes],
    )
    return text, step
