"""Passes for models with state (a static KV cache) and grouped-query attention.

``reinplace``: export functionalizes ``cache.index_copy_(2, pos, k)`` into
``new = index_put(cache, [None, None, pos], k)`` (a full copy of the cache) plus a write-back of
``new`` into the buffer after the run. When nothing else reads the old value, the update can be
made in place: one row is written and the write-back finds the buffer already updated.

``gqa_attention``: ``repeat_kv`` before SDPA (``expand`` + ``clone`` + ``view``) materializes the
keys and values once per query head; the attention kernels index the shared key/value head
themselves (``enable_gqa``), so the copies go.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.pipeline import Pass
from fxforge.registry import registry

aten = torch.ops.aten

_INPLACE = {aten.index_put.default: aten.index_put_.default, aten.index_copy.default: aten.index_copy_.default}


def _output_values(gm: fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (list, tuple)) else [out]


@registry.register_pass
class ReinplaceStateUpdates(Pass):
    """Make buffer updates in place where the old buffer value has no other reader.

    before: %kc  = get_attr[c_k_cache0]
            %new = index_put(%kc, [None, None, %pos], %k)     # copies the whole cache
            %o   = scaled_dot_product_attention(%q, %new, ...)
            return (%new, ..., %logits)                        # %new written back into c_k_cache0
    after:  %new = index_put_(%kc, [None, None, %pos], %k)    # writes one position; %new is %kc
    """

    name = "reinplace"

    def call(self, gm: fx.GraphModule) -> bool:
        modified = False
        outs = _output_values(gm)
        for attr, new in zip(gm.meta.get("fxforge_mutations", ()), outs):
            if not isinstance(new, fx.Node) or new.target not in _INPLACE:
                continue
            old = new.args[0]
            if not (isinstance(old, fx.Node) and old.op == "get_attr" and old.target == attr and set(old.users) == {new}):
                continue
            if new.kwargs.get("accumulate", False) or (len(new.args) > 3 and new.args[3]):
                continue  # accumulate=True is fine in place too, but keep the rewrite to plain stores
            new.target = _INPLACE[new.target]
            modified = True
        return modified

    def ensures(self, gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:  # an in-place update may only touch state the program writes back
            if n.target in _INPLACE.values():
                assert n.args[0].op == "get_attr" and n.args[0].target in gm.meta.get("fxforge_mutations", ()), n.format_node()


def _repeated_kv(n) -> fx.Node | None:
    """x for n = view(clone(expand(unsqueeze(x, 2), [b, h, rep, t, d])), [b, h·rep, t, d]), else None."""
    if not (isinstance(n, fx.Node) and n.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)):
        return None
    c = n.args[0]
    if isinstance(c, fx.Node) and c.target is aten.clone.default:
        c = c.args[0]
    if not (isinstance(c, fx.Node) and c.target is aten.expand.default):
        return None
    u = c.args[0]
    if not (isinstance(u, fx.Node) and u.target is aten.unsqueeze.default and u.args[1] == 2):
        return None
    x = u.args[0]
    xv, ev, nv = (m.meta.get("val") for m in (x, c, n))
    if xv is None or ev is None or nv is None or xv.dim() != 4 or ev.dim() != 5:
        return None
    b, h, rep, t, d = ev.shape
    if tuple(ev.shape) != (xv.shape[0], xv.shape[1], rep, xv.shape[2], xv.shape[3]):
        return None
    if tuple(nv.shape) != (b, h * rep, t, d):
        return None
    return x


@registry.register_pass
class GQAAttention(Pass):
    """Drop ``repeat_kv`` copies in front of SDPA: the kernel shares each key/value head itself.

    before: %k_rep = view(clone(expand(unsqueeze(%k, 2), [1, 8, 4, 2048, 64])), [1, 32, 2048, 64])
            %o = scaled_dot_product_attention(%q, %k_rep, %v_rep, %mask)
    after:  %o = scaled_dot_product_attention(%q, %k, %v, %mask, enable_gqa=True)
    Head h of the repeated tensor is head h // rep of the original, the same rule as ``enable_gqa``.
    """

    name = "gqa_attention"

    def call(self, gm: fx.GraphModule) -> bool:
        modified = False
        for n in list(gm.graph.nodes):
            if n.target is not aten.scaled_dot_product_attention.default:
                continue
            k, v = _repeated_kv(n.args[1]), _repeated_kv(n.args[2])
            if k is None or v is None or k.meta["val"].shape[1] != v.meta["val"].shape[1]:
                continue
            args = list(n.args)
            args[1], args[2] = k, v
            n.args = tuple(args)
            n.kwargs = {**n.kwargs, "enable_gqa": True}
            modified = True
        return modified  # the repeat copies are dead now; the pipeline's dce removes them
