"""The ``fuse_attention`` pass: explicit ``softmax(q @ kᵀ · s + mask) @ v`` → one SDPA node, which
codegen lowers onto the attention template (or autotuned eager SDPA).

    before: %qk  = bmm(view(expand(%q)), view(expand(permute(%k, [0, 1, 3, 2]))))
            %s   = add(mul(view(%qk, [B, H, L, S]), 0.125), %mask)
            %p   = div(exp(sub(%s, amax(%s, [-1]))), sum(exp(...), [-1]))      # softmax, maybe in fp32
            %out = view(bmm(view(expand(%p)), view(expand(%v))), [B, H, L, D])
    after:  %out = scaled_dot_product_attention(%q, %k, %v, %mask, scale=0.125)

The matcher is strict: every view must map [B, H, ·, ·] ↔ [B·H, ·, ·] exactly, the softmax must be
over the key axis, the scale a Python number, the mask a tensor of q's dtype (or bool) that
broadcasts to the scores, and the result must have the old output's shape and dtype. Anything else
is left as it is. Opt-in for now (``passes=[..., "fuse_attention", "dce"]``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.codegen.ops import RESHAPES
from fxforge.pipeline import Pass
from fxforge.registry import registry

aten = torch.ops.aten


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _skip_copies(n):
    """Through clones (layout copies, eval-mode dropout) and dtype casts (HF computes the softmax
    in fp32 and casts back): they change no value the attention kernel computes."""
    while (_is(n, aten.clone.default)
           or (_is(n, aten._to_copy.default, torch.ops.prims.convert_element_type.default) and set(n.kwargs) <= {"dtype"})):
        n = n.args[0]
    return n


def _skip_clones(n):
    while _is(n, aten.clone.default):
        n = n.args[0]
    return n


def _from_3d(n, shape4):
    """The 4-D tensor behind view(expand(x, shape4), [B·H, a, b]) (expand optional), or None."""
    if not _is(n, *RESHAPES):
        return None
    src = _skip_clones(n.args[0])  # not casts: q/k/v must reach SDPA with the values the bmm saw
    if _is(src, aten.expand.default):
        src = _skip_clones(src.args[0])
    v, v4 = _val(n), _val(src)
    if v is None or v4 is None or v4.dim() != 4 or tuple(v4.shape) != tuple(shape4):
        return None
    B, H, a, b = v4.shape
    return src if tuple(v.shape) == (B * H, a, b) else None


def _last_dim(dims, rank) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % rank == rank - 1


def match(out: fx.Node):
    """(q, k, v, mask, scale) when ``out`` is the last view of an explicit attention, else None."""
    if not _is(out, *RESHAPES) or not _is(out.args[0], aten.bmm.default):
        return None
    o4 = _val(out)
    if o4 is None or o4.dim() != 4:
        return None
    B, H, L, Dv = o4.shape
    pv, vv = out.args[0].args
    p_view_src = pv.args[0] if _is(pv, *RESHAPES) else None
    p = _skip_copies(p_view_src.args[0] if _is(p_view_src, aten.expand.default) else p_view_src)
    v = _from_3d(vv, (B, H, _val(vv).shape[1], Dv)) if _val(vv) is not None else None
    if p is None or v is None or not _is(p, aten.div.Tensor):
        return None
    e, ssum = p.args
    if not (_is(e, aten.exp.default) and _is(ssum, aten.sum.dim_IntList) and ssum.args[0] is e):
        return None
    sub = e.args[0]
    if not _is(sub, aten.sub.Tensor) or not _is(sub.args[1], aten.amax.default) or sub.args[1].args[0] is not sub.args[0]:
        return None
    rank = _val(sub).dim()
    if not (_last_dim(ssum.args[1], rank) and _last_dim(sub.args[1].args[1], rank)):
        return None
    s = _skip_copies(sub.args[0])
    mask = None
    if _is(s, aten.add.Tensor) and isinstance(s.args[1], fx.Node) and not s.kwargs:
        s, mask = s.args
    scale = 1.0
    if _is(s, aten.mul.Tensor, aten.div.Tensor) and isinstance(s.args[1], (int, float)):
        scale = float(s.args[1]) if s.target is aten.mul.Tensor else 1.0 / float(s.args[1])
        s = s.args[0]
    if not _is(s, *RESHAPES) or not _is(s.args[0], aten.bmm.default):
        return None
    S = _val(s).shape[-1]
    qv, kv = s.args[0].args
    q = _from_3d(qv, (B, H, L, _val(qv).shape[-1])) if _val(qv) is not None else None
    kt = _from_3d(kv, (B, H, _val(kv).shape[1], S)) if _val(kv) is not None else None
    if q is None or kt is None:
        return None
    if _is(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2]:
        k = kt.args[0]
    elif _is(kt, aten.transpose.int) and sorted(d % 4 for d in kt.args[1:3]) == [2, 3]:
        k = kt.args[0]
    else:
        return None
    qd, kd, vd = (_val(x).dtype for x in (q, k, v))
    if not (qd == kd == vd == o4.dtype):
        return None
    if mask is not None:
        mv = _val(mask)
        if mv is None or (mv.dtype != torch.bool and mv.dtype != qd):
            return None
        try:
            torch.broadcast_shapes(tuple(mv.shape), (B, H, L, S))
        except RuntimeError:
            return None
    return q, k, v, mask, scale


@registry.register_pass
class FuseAttention(Pass):
    name = "fuse_attention"

    def call(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            m = match(node)
            if m is None:
                continue
            q, k, v, mask, scale = m
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v, mask, 0.0, False),
                                             {"scale": scale})
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        return modified
