"""Graph patterns several passes match (linear layers over constant weights) and a name helper for the
constants passes add."""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def fresh_attr(gm: fx.GraphModule, base: str) -> str:
    """The first free attribute name ``<base>_0``, ``<base>_1``, ... of ``gm`` (for constants a pass adds)."""
    i = 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def constant(gm: fx.GraphModule, n) -> torch.Tensor | None:
    """The real tensor behind a get_attr node that the graph never mutates, else None."""
    if isinstance(n, fx.Node) and n.op == "get_attr" and n.target not in gm.meta.get("fxforge_mutations", ()):
        t = getattr(gm, n.target, None)
        return t if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor) else None
    return None


def linear_parts(gm: fx.GraphModule, n: fx.Node) -> tuple | None:
    """(x, weight node, bias node | None) for ``mm(x, permute(W, [1, 0]))`` or
    ``addmm(b, x, permute(W, [1, 0]))`` (how capture decomposes nn.Linear) with a constant 2-D W and
    1-D b and unit alpha/beta, else None."""
    if n.target is aten.mm.default:
        bias, x, wt = None, n.args[0], n.args[1]
    elif n.target is aten.addmm.default and n.kwargs.get("beta", 1) == 1 and n.kwargs.get("alpha", 1) == 1:
        bias, x, wt = n.args
        b = constant(gm, bias)
        if b is None or b.dim() != 1:
            return None
    else:
        return None
    if not (isinstance(wt, fx.Node) and wt.target in (aten.permute.default, aten.t.default)):
        return None
    if wt.target is aten.permute.default and list(wt.args[1]) != [1, 0]:
        return None
    w = constant(gm, wt.args[0])
    if w is None or w.dim() != 2:
        return None
    return x, wt.args[0], bias
