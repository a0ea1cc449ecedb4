"""Lower an FX graph (after the pass pipeline) to a Program: fused kernels + eager ATen steps.

Flow: classify every node (codegen.ops) → fuse into kernel groups (codegen.fusion) → order the
groups and the remaining nodes topologically (networkx) → emit Triton per group → plan memory.
Nodes with no lowering become ``fallback`` steps with a typed reason; views become metadata-only
``view`` steps; symbolic-size arithmetic becomes sympy expressions evaluated at call time.
"""
from __future__ import annotations

import hashlib
import operator
import re

import networkx as nx
import sympy
import torch
import torch.fx as fx

from fxforge.runtime.attention import template_source
from fxforge.runtime.memory import buffer_refs, plan_memory, step_reads
from fxforge.runtime.program import AtenStep, Program

from .emit_attention import emit_attention_group
from .emit_matmul import emit_matmul_group
from .emit_common import tensor_sig
from .emit_pointwise import emit_pointwise_group
from .fusion import Group, fuse_graph, shape_of
from .ops import classify, reduction_info, val


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")




def _sym_value(node: fx.Node):
    v = node.meta.get("val")
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        e = v.node.expr
        return int(e) if e.is_Integer else {"sym": str(e)}
    return v


def arg_template(x):
    """An FX argument as JSON-able data (see Program)."""
    if isinstance(x, fx.Node):
        if isinstance(x.meta.get("val"), torch.Tensor) or isinstance(x.meta.get("val"), (tuple, list)):
            return {"buf": x.name}
        return _sym_value(x)
    if isinstance(x, (list, tuple)):
        return [arg_template(i) for i in x]
    if isinstance(x, torch.dtype):
        return {"dtype": dtype_name(x)}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    if isinstance(x, torch.layout):
        return {"layout": str(x).replace("torch.", "")}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).replace("torch.", "")}
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        e = x.node.expr
        return int(e) if e.is_Integer else {"sym": str(e)}
    if isinstance(x, dict):
        return {"dict": {k: arg_template(v) for k, v in x.items()}}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot serialize argument {x!r} of type {type(x).__name__}")


def op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    if target is operator.getitem:
        return "getitem"
    raise TypeError(f"not an ATen op: {target}")


_PLACEHOLDER = "FXFORGE_KERNEL_NAME"


def _named_kernel(g: Group, text: str) -> tuple[str, str]:
    """Name a kernel by a hash of its code (not its provenance comment), so identical layers share
    one kernel and Triton compiles it once."""
    code = text[text.index("import triton"):]  # the code, not the provenance comment
    digest = hashlib.sha256(code.encode()).hexdigest()[:10]
    hint = re.sub(r"[^0-9a-zA-Z_]", "_", g.name_hint)[:40]
    name = f"fxf_{g.kind}_{hint}_{digest}"
    return name, text.replace(_PLACEHOLDER, name)


def bind_symbols(placeholders: list[fx.Node]) -> dict:
    symbols: dict[str, list] = {}
    for i, p in enumerate(placeholders):
        v = p.meta.get("val")
        if isinstance(v, torch.Tensor):
            for d, s in enumerate(v.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    symbols.setdefault(str(s.node.expr), [i, d])
        elif isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
            symbols.setdefault(str(v.node.expr), [i, -1])
    return symbols


def lower_graph(gm: fx.GraphModule, config, user_inputs: list[str] | None = None) -> tuple[Program, dict, list]:
    """Returns (program, constants, fallbacks). ``user_inputs`` orders placeholders (all by default)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if user_inputs is not None:
        by_name = {p.name: p for p in placeholders}
        placeholders = [by_name[n] for n in user_inputs]
    for n in graph.nodes:
        if n.op == "call_function":
            c = classify(n)
            if c.kind == "reduction":
                info = reduction_info(n)
                F = shape_of(n.args[0])
                r = sympy.Integer(1)
                for d in info.dims:
                    r *= F[d]
                if r.is_Integer and int(r) > config.max_persistent_rblock:
                    n.meta["fxforge_extern"] = f"reduction_too_long: {int(r)} > max_persistent_rblock={config.max_persistent_rblock}"
    on_cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in (n.meta.get("val") for n in graph.nodes if n.op == "placeholder")) \
        or any(isinstance(getattr(gm, n.target, None), torch.Tensor) and getattr(gm, n.target).is_cuda for n in graph.nodes if n.op == "get_attr")
    # Epilogue policy (codegen/fusion.py): "auto" on CUDA defers only what a following reduction
    # (norm) absorbs and fuses the rest into the matmul; on the CPU everything fuses.
    defer = {"defer": True, "fuse": False}.get(config.matmul_epilogue, "norm" if on_cuda else False)
    groups, group_of = fuse_graph(gm, fuse=config.fuse, matmul=config.matmul, defer_epilogues=defer)

    # Units: a kernel group, or one node that is not in a group. Order them topologically.
    unit_of = {}
    for g in groups:
        for n in g.nodes:
            unit_of[n] = ("g", g.id)
    dag = nx.DiGraph()
    order = {n: i for i, n in enumerate(graph.nodes)}
    first: dict = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        u = unit_of.setdefault(n, ("n", n.name))
        dag.add_node(u)
        first[u] = min(first.get(u, order[n]), order[n])
        for a in n.all_input_nodes:
            ua = unit_of.get(a)
            if ua is not None and ua != u:
                dag.add_edge(ua, u)
    by_group = {g.id: g for g in groups}
    by_name = {n.name: n for n in graph.nodes}

    output_node = next(n for n in graph.nodes if n.op == "output")
    out_nodes = set(output_node.all_input_nodes)
    steps, kernels, fallbacks = [], {}, []
    constants = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            t = getattr(gm, n.target)
            if isinstance(t, torch.Tensor):
                constants[n.name] = t
    # Buffers the graph updates, by constant name (the get_attr node's, or the attribute's own when
    # no node reads the old value): the runtime writes the first outputs back into them.
    const_of = {n.target: n.name for n in graph.nodes if n.op == "get_attr"}
    mutations = []
    for attr in gm.meta.get("fxforge_mutations", ()):
        name = const_of.get(attr, attr)
        constants[name] = getattr(gm, attr)
        mutations.append(name)
    for u in nx.lexicographical_topological_sort(dag, key=lambda u: first[u]):
        if u[0] == "g":
            g = by_group[u[1]]
            members = set(g.nodes)
            outs = [n for n in g.nodes if n in out_nodes or any(us not in members for us in n.users)]
            if g.kind == "attention":
                text, step = emit_attention_group(g, _PLACEHOLDER, outs, template_source())
            else:
                emit = emit_matmul_group if g.kind == "matmul" else emit_pointwise_group
                text, step = emit(g, _PLACEHOLDER, outs)
            name, text = _named_kernel(g, text)
            step.kernel = name
            kernels.setdefault(name, {"source": text, "entry": name, "kind": g.kind, "nodes": step.nodes})
            steps.append(step)
            continue
        n = by_name[u[1]]
        c = classify(n)
        reason = n.meta.get("fxforge_extern") or c.reason
        if c.kind == "sym":
            continue
        if c.kind in ("pointwise", "reduction", "matmul", "attention") and not n.meta.get("fxforge_extern"):
            reason = "not_fused: config disabled it" if not config.matmul else "not_fused"
        role = {"view": "view", "getitem": "getitem", "library": "library"}.get(c.kind, "fallback")
        step = AtenStep(op=op_name(n.target), args=arg_template(list(n.args)), kwargs=arg_template(dict(n.kwargs)) or {},
                        outputs=[n.name], role=role, reason=reason if role == "fallback" else None, node=n.name)
        if isinstance(step.kwargs, dict) and "dict" in step.kwargs:
            step.kwargs = step.kwargs["dict"]
        steps.append(step)
        if role == "fallback":
            fallbacks.append({"node": n.name, "op": step.op, "reason": reason})

    inputs = []
    for p in placeholders:
        v = p.meta.get("val")
        if isinstance(v, torch.Tensor):
            inputs.append({"name": p.name, "kind": "tensor", "sig": tensor_sig(v), "expr": None})
        else:
            inputs.append({"name": p.name, "kind": "sym", "sig": None, "expr": str(v.node.expr) if isinstance(v, torch.SymInt) else repr(v)})
    outputs = arg_template(list(output_node.args[0]) if isinstance(output_node.args[0], (list, tuple)) else [output_node.args[0]])
    devices = {str(val(p).device) for p in placeholders if val(p) is not None} | {str(t.device) for t in constants.values()}
    device = sorted(devices - {"cpu"})[0] if devices - {"cpu"} else "cpu"
    program = Program(inputs=inputs, symbols=bind_symbols(placeholders),
                      constants={k: tensor_sig(t) for k, t in constants.items()},
                      steps=steps, outputs=outputs, kernels=kernels, device=device, mutations=mutations)
    if config.memory_plan:
        program.memory = plan_memory(program)
    used = {r for st in steps for r in step_reads(st)} | set(buffer_refs(outputs)) | set(mutations)
    constants = {k: t for k, t in constants.items() if k in used}
    program.constants = {k: v for k, v in program.constants.items() if k in constants}
    return program, constants, fallbacks

