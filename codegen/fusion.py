"""Group graph nodes into kernels.

Three kernel kinds, each an iteration space that every member node maps into:
- pointwise: one shape F; every member has shape F.
- reduction: one shape F plus reduced dims R; members are *full* (shape F, a [XBLOCK, RBLOCK] tile)
  or *reduced* (F with R squeezed or kept as 1, a [XBLOCK, 1] tile). Persistent: a whole reduced
  row stays in registers, so softmax / layer norm / RMS norm are one kernel with one read.
- matmul: an mm/addmm/bmm anchor and a pointwise epilogue on its [rows, N] tile; members have a
  last dim N and rows = prod(leading dims) (a view that only splits rows joins the epilogue).

The grouping is greedy in topological order: a node joins a producer's group when its shape fits
that group's iteration space and joining does not create a cycle between groups (a path leaving
the group and re-entering it). Sibling groups feeding the same node merge when compatible.
Views never join pointwise/reduction groups: the runtime runs them as free metadata ops, and the
kernels read any strided layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from .ops import RESHAPES, classify, reduction_info, val

aten = torch.ops.aten


def _cats_read_outside(nodes: set) -> bool:
    """A cat loads its inputs at shifted indices, so they must come from memory, not registers."""
    return all(not (n.target is aten.cat.default and any(a in nodes for a in n.all_input_nodes)) for n in nodes)


def sym_shape(t: torch.Tensor) -> tuple:
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d)) for d in t.shape)


def shape_of(n: fx.Node) -> tuple:
    return sym_shape(val(n))


def same(a, b) -> bool:
    return sympy.expand(a - b) == 0


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def prod(xs) -> sympy.Expr:
    p = sympy.Integer(1)
    for x in xs:
        p = p * x
    return p


def is_one(x) -> bool:
    return x == 1


@dataclass
class Group:
    id: int
    kind: str  # pointwise | reduction | matmul
    F: tuple  # iteration shape (pointwise/reduction); for matmul, the anchor's output shape
    rdims: tuple = ()
    nodes: list = field(default_factory=list)
    # node -> F dim of each node dim (pointwise/reduction); node -> "row" shape for matmul members
    dims: dict = field(default_factory=dict)
    reduced: set = field(default_factory=set)  # members that are [XBLOCK, 1] tiles
    anchor: fx.Node | None = None

    @property
    def name_hint(self) -> str:
        ops = []
        for n in self.nodes:
            t = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            if t not in ops:
                ops.append(t)
        return "_".join(ops[:4])


# Matmul epilogue policy (``defer_epilogues``):
#   False / "fuse": every pointwise consumer that fits joins the matmul kernel as its epilogue.
#   True / "defer": none does; the matmul stays bare (cuBLAS writes it directly) and the chain
#       fuses forward into the next kernel.
#   "norm" (matmul_epilogue="auto" on CUDA): defer exactly the epilogue nodes that feed, through
#       pointwise ops and views only, a reduction (a layer/RMS norm, softmax): that reduction kernel
#       absorbs them as its prologue, so deferring costs no extra launch or round trip and lets
#       cuBLAS write the matmul directly (the residual add -> next LayerNorm; measured faster).
#       Every other epilogue (bias+GELU before fc2, SiLU*up before the down projection) would become
#       a pointwise kernel of its own if deferred, re-reading the whole matmul output: deferring buys
#       nothing there, so it stays in the group and autotuning compares "TMA Triton matmul with the
#       epilogue fused" against "cuBLAS + the epilogue as one launch" (EXTERNAL_ACC).
_FEEDS_REDUCTION_LIMIT = 64  # nodes visited per query: epilogue chains are short


class Fuser:
    def __init__(self, gm: fx.GraphModule, fuse: bool = True, matmul: bool = True, defer_epilogues: bool | str = False):
        self.gm = gm
        self.defer_epilogues = {"fuse": False, "defer": True}.get(defer_epilogues, defer_epilogues)
        self._feeds: dict = {}
        self.fuse = fuse
        self.use_matmul = matmul
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.group_of: dict[fx.Node, Group] = {}
        self.groups: list[Group] = []
        self.kinds = {n: classify(n) for n in gm.graph.nodes if n.op == "call_function"}

    # ---- cycle check ---------------------------------------------------------------------------
    def _reaches_via_outside(self, srcs: set, dsts: set) -> bool:
        """Is some node of ``dsts`` fed (transitively) by ``srcs`` through a node outside both?"""
        lo = min(self.order[n] for n in srcs)
        inside = srcs | dsts
        stack = [i for d in dsts for i in d.all_input_nodes if i not in inside and self.order[i] > lo]
        seen = set(stack)
        while stack:
            x = stack.pop()
            for i in x.all_input_nodes:
                if i in srcs:
                    return True
                if i not in inside and i not in seen and self.order[i] > lo:
                    seen.add(i)
                    stack.append(i)
        return False

    def _cycle_free(self, a: set, b: set) -> bool:
        return not self._reaches_via_outside(a, b) and not self._reaches_via_outside(b, a)

    # ---- epilogue policy -----------------------------------------------------------------------
    def _feeds_reduction(self, n: fx.Node) -> bool:
        """Does n reach a reduction through pointwise ops and views only?"""
        if n not in self._feeds:
            stack, seen, hit = [n], {n}, False
            while stack and not hit and len(seen) < _FEEDS_REDUCTION_LIMIT:
                for u in stack.pop().users:
                    kind = getattr(self.kinds.get(u), "kind", None)
                    if kind == "reduction":
                        hit = True
                        break
                    if u not in seen and (kind == "pointwise" or (kind == "view" and u.target in RESHAPES)):
                        seen.add(u)
                        stack.append(u)
            self._feeds[n] = hit
        return self._feeds[n]

    def _defer(self, nodes) -> bool:
        """Keep ``nodes`` out of a matmul group's epilogue? (see the policy above)"""
        if self.defer_epilogues == "norm":
            return any(self._feeds_reduction(m) for m in nodes)
        return bool(self.defer_epilogues)

    # ---- membership rules ----------------------------------------------------------------------
    def _new(self, kind, F, n, rdims=(), dims=None, anchor=None) -> Group:
        g = Group(len(self.groups), kind, F, rdims, anchor=anchor)
        self.groups.append(g)
        self._add(g, n, dims if dims is not None else tuple(range(len(F))))
        return g

    def _add(self, g: Group, n: fx.Node, dims, reduced: bool = False):
        g.nodes.append(n)
        g.dims[n] = dims
        if reduced:
            g.reduced.add(n)
        self.group_of[n] = g

    def _operand_dims_ok(self, g: Group, n: fx.Node, n_dims) -> bool:
        """Each in-group operand, broadcast (right-aligned) into n's shape, must index the same F dims
        as it does itself; otherwise its register tile would not line up with n's."""
        n_shape = shape_of(n)
        for a in n.all_input_nodes:
            if self.group_of.get(a) is not g:
                continue
            a_shape, a_dims = shape_of(a), g.dims[a]
            off = len(n_shape) - len(a_shape)
            if off < 0:
                return False
            for i, size in enumerate(a_shape):
                if is_one(size):
                    continue
                if n_dims[i + off] != a_dims[i] or not same(size, n_shape[i + off]):
                    return False
        return True

    def _fit_pointwise(self, g: Group, n: fx.Node):
        """How n would sit in g: (dims, reduced?) or None."""
        s = shape_of(n)
        if g.kind == "matmul":
            if self._defer([n]):
                return None
            ins = [a for a in n.all_input_nodes if self.group_of.get(a) is g]
            if len(s) and same(s[-1], g.F[-1]) and same(prod(s[:-1]), prod(g.F[:-1])) and all(same_shape(shape_of(a), s) for a in ins):
                return s, False
            return None
        if same_shape(s, g.F):
            dims = tuple(range(len(g.F)))
            return (dims, False) if self._operand_dims_ok(g, n, dims) else None
        if g.kind != "reduction":
            return None
        ins = [a for a in n.all_input_nodes if self.group_of.get(a) is g]
        if not all(a in g.reduced for a in ins):
            return None
        keep_shape = tuple(sympy.Integer(1) if d in g.rdims else x for d, x in enumerate(g.F))
        kept = tuple(d for d in range(len(g.F)) if d not in g.rdims)
        if same_shape(s, keep_shape):
            dims = tuple(range(len(g.F)))
        elif same_shape(s, tuple(g.F[d] for d in kept)):
            dims = kept
        else:
            return None
        return (dims, True) if self._operand_dims_ok(g, n, dims) else None

    def _fit_reduction(self, g: Group, n: fx.Node):
        info = reduction_info(n)
        src = n.args[0]
        if g.kind == "matmul" or self.group_of.get(src) is not g or src in g.reduced:
            return None
        F = shape_of(src)
        if not same_shape(F, g.F) or (g.kind == "reduction" and tuple(info.dims) != tuple(g.rdims)):
            return None
        dims = tuple(range(len(F))) if info.keepdim else tuple(d for d in range(len(F)) if d not in info.dims)
        return dims, True

    def _try_join(self, g: Group, n: fx.Node, kind: str) -> bool:
        if g.kind == "attention":
            return False
        fit = self._fit_pointwise(g, n) if kind == "pointwise" else self._fit_reduction(g, n)
        if fit is None or not self._cycle_free(set(g.nodes), {n}):
            return False
        dims, reduced = fit
        if kind == "reduction" and g.kind == "pointwise":
            g.kind, g.rdims = "reduction", reduction_info(n).dims
        self._add(g, n, dims, reduced)
        return True

    def _try_merge(self, g: Group, h: Group) -> bool:
        """Merge sibling group h into g when their iteration spaces agree."""
        if g is h or h.kind in ("matmul", "attention") or g.kind == "attention":
            return False
        if not _cats_read_outside(set(g.nodes) | set(h.nodes)) or (g.kind == "matmul" and any(m.target is aten.cat.default for m in h.nodes)):
            return False
        if g.kind == "matmul":
            if h.kind != "pointwise" or self._defer(h.nodes) or not (same(h.F[-1] if h.F else 0, g.F[-1]) and same(prod(h.F[:-1]), prod(g.F[:-1]))):
                return False
            if not all(same_shape(shape_of(m), h.F) for m in h.nodes):
                return False
        elif not same_shape(g.F, h.F):
            return False
        elif h.kind == "reduction" and g.kind == "reduction" and tuple(h.rdims) != tuple(g.rdims):
            return False
        if not self._cycle_free(set(g.nodes), set(h.nodes)):
            return False
        if g.kind == "pointwise" and h.kind == "reduction":
            g.kind, g.rdims = "reduction", h.rdims
        for m in h.nodes:
            self._add(g, m, shape_of(m) if g.kind == "matmul" else h.dims[m], m in h.reduced)
        h.nodes = []
        return True

    def _join_view(self, g: Group, n: fx.Node) -> bool:
        """A contiguous view that only re-splits the rows of a matmul tile joins its epilogue."""
        src = n.args[0]
        s, a = shape_of(n), shape_of(src)
        if not (len(s) and len(a) and same(s[-1], a[-1]) and same(prod(s), prod(a))):
            return False
        if not self._cycle_free(set(g.nodes), {n}):
            return False
        self._add(g, n, s)
        return True

    # ---- driver --------------------------------------------------------------------------------
    def run(self) -> list[Group]:
        for n in self.gm.graph.nodes:
            c = self.kinds.get(n)
            if c is None:
                continue
            if c.kind == "matmul" and self.use_matmul:
                self._new("matmul", shape_of(n), n, dims=shape_of(n), anchor=n)
                continue
            if c.kind == "view" and self.fuse and n.target in RESHAPES:
                g = self.group_of.get(n.args[0])
                if g is not None and g.kind == "matmul" and self._join_view(g, n):
                    continue
            if c.kind == "attention":
                self._new("attention", (), n, dims=(), anchor=n)
                continue
            if c.kind == "getitem":
                g = self.group_of.get(n.args[0])
                if g is not None and g.kind == "attention":  # the output of a tuple-returning SDPA variant
                    self._add(g, n, ())
                    continue
                if g is not None and g.kind == "reduction":  # var_mean's (var, mean) stay in registers
                    self._add(g, n, g.dims[n.args[0]], reduced=True)
                continue
            if c.kind not in ("pointwise", "reduction"):
                continue
            producers = []
            if n.target is aten.cat.default:  # its own group: consumers may join it, producers may not
                self._new("pointwise", shape_of(n), n)
                continue
            if self.fuse:
                for a in n.all_input_nodes:
                    g = self.group_of.get(a)
                    if g is not None and g not in producers and g.nodes:
                        producers.append(g)
                producers.sort(key=lambda g: (g.kind == "pointwise", -len(g.nodes)))
            home = None
            for g in producers:
                if self._try_join(g, n, c.kind):
                    home = g
                    break
            if home is None:
                if c.kind == "pointwise":
                    home = self._new("pointwise", shape_of(n), n)
                else:
                    info = reduction_info(n)
                    F = shape_of(n.args[0])
                    dims = tuple(range(len(F))) if info.keepdim else tuple(d for d in range(len(F)) if d not in info.dims)
                    home = self._new("reduction", F, n, rdims=info.dims, dims=dims)
                    home.reduced.add(n)
            for g in producers:
                if g is not home and g.nodes:
                    self._try_merge(home, g)
        groups = [g for g in self.groups if g.nodes]
        for g in groups:
            g.nodes.sort(key=self.order.__getitem__)
        return groups


def fuse_graph(gm: fx.GraphModule, fuse: bool = True, matmul: bool = True, defer_epilogues: bool | str = False) -> tuple[list[Group], dict]:
    f = Fuser(gm, fuse=fuse, matmul=matmul, defer_epilogues=defer_epilogues)
    groups = f.run()
    return groups, f.group_of
