"""Algebraic rewrites that let more of a graph fuse into one kernel."""
from __future__ import annotations

import torch
from fxforge.pipeline import Pass
from fxforge.registry import registry
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .patterns import fresh_attr

aten = torch.ops.aten


@registry.register_pass
class CatSign(Pass):
    """Pull negations out of ``cat``: the cat kernel reads its inputs from memory at shifted
    indices, so a negated input would otherwise be its own kernel and a round trip through memory.
    Exact (multiplying by ±1 only flips the sign bit). RoPE's ``rotate_half`` is the case in point.

    before: %n = neg(%x2); %c = cat([%n, %x1], -1)
    after:  %c0 = cat([%x2, %x1], -1); %c = mul(%c0, get_attr[cat_sign_0])   # [-1]*h + [1]*h
    """

    name = "cat_sign"

    def call(self, gm: fx.GraphModule) -> bool:
        modified = False
        for n in list(gm.graph.nodes):
            if n.target is not aten.cat.default or not any(_is_neg(x) for x in n.args[0]):
                continue
            out = n.meta.get("val")
            if not isinstance(out, torch.Tensor) or not (out.dtype.is_floating_point or out.dtype.is_complex):
                continue
            d = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % out.dim()
            sizes = [x.meta["val"].shape[d] for x in n.args[0]]
            if any(isinstance(s, torch.SymInt) for s in sizes):
                continue
            with unset_fake_temporarily():
                sign = torch.cat([torch.full((int(s),), -1.0 if _is_neg(x) else 1.0) for x, s in zip(n.args[0], sizes)])
                sign = sign.to(device=out.device, dtype=out.dtype).reshape([-1] + [1] * (out.dim() - 1 - d))
            attr = fresh_attr(gm, "cat_sign")
            gm.register_buffer(attr, sign)
            with gm.graph.inserting_before(n):
                s_node = gm.graph.get_attr(attr)
            with gm.graph.inserting_after(n):
                mul = gm.graph.call_function(aten.mul.Tensor, (n, s_node))
            n.replace_all_uses_with(mul, delete_user_cb=lambda u, mul=mul: u is not mul)
            n.args = ([x.args[0] if _is_neg(x) else x for x in n.args[0]],) + tuple(n.args[1:])
            modified = True
        return modified  # negations no one reads any more are removed by the next dce


def _is_neg(x) -> bool:
    return isinstance(x, fx.Node) and x.target is aten.neg.default

