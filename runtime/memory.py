"""Static memory plan: liveness-based reuse of kernel output buffers.

Every kernel output that is not a program output (nor viewed by one) gets a slot; a slot is
reused once every buffer that lives in it (and every view of it) is dead. Slots are sized in
bytes; with symbolic shapes a slot is reused only for an identical size expression.
"""
from __future__ import annotations

import sympy

from .program import AtenStep, KernelStep, MemoryPlan, Program

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1, "int16": 2,
             "int32": 4, "int64": 8, "bool": 1}


def nbytes(sig) -> sympy.Expr:
    """Bytes the buffer spans in storage (its strides may be a permutation, never overlapping)."""
    n = sympy.Integer(_ITEMSIZE[sig.dtype])
    for s in sig.shape:
        n = n * sympy.sympify(s)
    return sympy.expand(n)


def buffer_refs(template) -> list[str]:
    out = []
    if isinstance(template, dict):
        if "buf" in template:
            out.append(template["buf"])
        else:
            for v in template.values():
                out += buffer_refs(v)
    elif isinstance(template, (list, tuple)):
        for v in template:
            out += buffer_refs(v)
    return out


def step_reads(step) -> list[str]:
    if isinstance(step, KernelStep):
        return [o.buf for o in step.loads]
    return buffer_refs(step.args) + buffer_refs(step.kwargs)


def step_writes(step) -> list[str]:
    return list(step.outputs) if isinstance(step, KernelStep) else list(step.outputs)


def plan_memory(program: Program) -> MemoryPlan:
    root: dict[str, str] = {}
    for st in program.steps:
        for b in step_writes(st):
            reads = step_reads(st)
            # views and getitems alias their source; fallbacks allocate fresh tensors
            root[b] = root.get(reads[0], reads[0]) if isinstance(st, AtenStep) and st.role in ("view", "getitem") and reads else b
    last_use: dict[str, int] = {}
    for i, st in enumerate(program.steps):
        for b in step_reads(st) + step_writes(st):
            r = root.get(b, b)
            last_use[r] = max(last_use.get(r, -1), i)
    pinned = {root.get(b, b) for b in buffer_refs(program.outputs)}
    free: list[tuple[sympy.Expr, int]] = []
    plan = MemoryPlan()
    total = sympy.Integer(0)
    slots: list[sympy.Expr] = []
    dying: dict[int, list[str]] = {}
    for i, st in enumerate(program.steps):
        if isinstance(st, KernelStep):
            for b, sig in st.outputs.items():
                size = nbytes(sig)
                total += size
                if b in pinned:
                    continue
                pick = next((k for k, (sz, _) in enumerate(free) if sympy.expand(sz - size) == 0 or (sz.is_Integer and size.is_Integer and sz >= size)), None)
                if pick is None:
                    slots.append(size)
                    slot = len(slots) - 1
                else:
                    slot = free.pop(pick)[1]
                plan.assignment[b] = slot
                dying.setdefault(last_use.get(b, i), []).append(b)
        for b in dying.pop(i, []):
            free.append((slots[plan.assignment[b]], plan.assignment[b]))
    plan.slots = [int(s) if s.is_Integer else str(s) for s in slots]
    plan.bytes_unplanned = int(total) if total.is_Integer else str(total)
    ps = sum(slots, sympy.Integer(0)) + sum((nbytes(sig) for st in program.steps if isinstance(st, KernelStep)
                                             for b, sig in st.outputs.items() if b in pinned), sympy.Integer(0))
    plan.bytes_planned = int(ps) if ps.is_Integer else str(ps)
    return plan
