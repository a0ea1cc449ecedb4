"""The ``merge_linears`` pass: linear layers that read the same input (q/k/v projections, SwiGLU's
gate and up) become one matmul over their weights concatenated at compile time.

    before: %q = mm(%h, permute(get_attr[wq], [1, 0]))     # [M, 2048]
            %k = mm(%h, permute(get_attr[wk], [1, 0]))     # [M, 512]
            %v = mm(%h, permute(get_attr[wv], [1, 0]))     # [M, 512]
    after:  %qkv = mm(%h, permute(get_attr[wq|wk|wv], [1, 0]))   # [M, 3072]
            %q = slice(%qkv, 1, 0, 2048); %k = slice(%qkv, 1, 2048, 2560); %v = slice(...)

Exact: each output column is the same dot product as before. It pays where the matmuls are
launch- or bandwidth-bound (decode: one GEMV that streams all three weights instead of three short
ones), so matmuls of at most ``max_rows`` (default 256) static rows are merged; with more rows only
groups in which some member is too small to fill the GPU (fewer 128x128 output tiles than SMs, e.g.
prefill's k and v projections) are merged. Only weights held as constants (AOT path) are merged, never
mutated buffers; ``addmm`` merges when every member has a constant 1-D bias and unit alpha/beta.
A group is skipped when a view of a member's output would not be a valid view of the slice.
"""
from __future__ import annotations

import torch
from fxforge.pipeline import Pass
from fxforge.registry import registry
from torch import fx

from .patterns import fresh_attr
from .patterns import linear_parts as _linear_parts

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


# Merge bandwidth-bound matmuls (few rows: decode, small batches). With many rows they are
# compute-bound and cuBLAS tiles each shape well on its own: on the H100 the merged 2048x2048x11264
# gate|up GEMM took 132 us against 2 x 62.7 us unmerged (benchmarks/results/profile_prefill.md).
MAX_ROWS = 256
# ... and compute-bound groups with a member too small to fill one wave of 128x128 output tiles on
# the GPU (132 SMs on the H100): prefill's k and v projections (2048 x 512: 64 tiles) leave half the
# SMs idle, and q|k|v as one 2048 x 3072 GEMM ran 39 us against 28 + 14 + 14 us separately
# (benchmarks/results/probe_gemm_tma.md, profile_prefill.md).
WAVE_TILES = 132
TILE = 128


def _underfills(rows: int, n: int) -> bool:
    return -(-rows // TILE) * -(-n // TILE) < WAVE_TILES


def _views_ok(val, users, n_total: int, start: int) -> bool:
    """Every chain of views from this member's output must stay valid on a column slice."""
    if any(isinstance(s, torch.SymInt) for s in val.shape):
        return False
    sliced = torch.empty(val.shape[0], n_total, device="meta", dtype=val.dtype)[:, start:start + val.shape[1]]

    def check(t, users) -> bool:
        for u in users:
            if u.target in _VIEWS:
                try:
                    nt = t.view(u.args[1])
                except RuntimeError:
                    return False
                if not check(nt, u.users):
                    return False
        return True
    return check(sliced, users)


@registry.register_pass
class MergeLinears(Pass):
    """Linears sharing an input become one matmul plus column slices (module docstring: the graphs)."""

    name = "merge_linears"

    def call(self, gm: fx.GraphModule) -> bool:
        groups: dict = {}
        for n in gm.graph.nodes:
            parts = _linear_parts(gm, n)
            if parts is None:
                continue
            x, w, bias = parts
            wt = getattr(gm, w.target)
            key = (x, bias is None, wt.dtype, wt.device, wt.shape[1])
            groups.setdefault(key, []).append((n, w, bias))
        modified = False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        max_rows = self.options.get("max_rows", MAX_ROWS)
        for (x, no_bias, *_), members in groups.items():
            if len(members) < 2:
                continue
            rows = x.meta["val"].shape[0]
            if isinstance(rows, torch.SymInt):
                continue
            weights = [getattr(gm, w.target) for _, w, _ in members]
            if rows > max_rows and not any(_underfills(rows, w.shape[0]) for w in weights):
                continue
            n_total = sum(w.shape[0] for w in weights)
            starts = [sum(w.shape[0] for w in weights[:i]) for i in range(len(weights))]
            if not all(_views_ok(m.meta["val"], m.users, n_total, s) for (m, _, _), s in zip(members, starts)):
                continue
            first = min((m for m, _, _ in members), key=order.__getitem__)
            attr = fresh_attr(gm, "merged_weight")
            gm.register_buffer(attr, torch.cat(weights, 0).contiguous())
            with gm.graph.inserting_before(first):
                w_node = gm.graph.get_attr(attr)
                wt = gm.graph.call_function(aten.permute.default, (w_node, [1, 0]))
                if no_bias:
                    merged = gm.graph.call_function(aten.mm.default, (x, wt))
                else:
                    battr = fresh_attr(gm, "merged_bias")
                    gm.register_buffer(battr, torch.cat([getattr(gm, b.target) for _, _, b in members], 0).contiguous())
                    merged = gm.graph.call_function(aten.addmm.default, (gm.graph.get_attr(battr), x, wt))
                for (m, w, _), s in zip(members, starts):
                    piece = gm.graph.call_function(aten.slice.Tensor, (merged, 1, s, s + getattr(gm, w.target).shape[0]))
                    m.replace_all_uses_with(piece)
            for m, _, _ in members:
                gm.graph.erase_node(m)
            modified = True
        return modified  # the old weights' get_attr/permute nodes are dead now; dce removes them
