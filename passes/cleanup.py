"""Cleanup passes: no-op removal, dead-code elimination, CSE, constant folding of weights-only subgraphs."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from fxforge.pipeline import Pass
from fxforge.registry import registry

aten = torch.ops.aten

_IMPURE_TAGS = (torch.Tag.nondeterministic_seeded,)


def is_impure(node: fx.Node) -> bool:
    if node.op != "call_function":
        return node.op in ("placeholder", "output")
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        if any(tag in t.tags for tag in _IMPURE_TAGS):
            return True
        return t._schema.is_mutable
    return node.is_impure()


def _same_meta(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and va.shape == vb.shape


@registry.register_pass
class RemoveNoops(Pass):
    """Remove ops that return their input unchanged (clone, alias, same-dtype casts, detach).

    before: %a = clone(%x); %b = _to_copy(%a, dtype=f32)   # x is f32
            %c = mul(%b, 2)
    after:  %c = mul(%x, 2)
    A clone of a graph output's input is kept only where removing it would alias two outputs.
    """

    name = "remove_noops"
    _NOOPS = {aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}

    def call(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            noop = node.target in self._NOOPS and not node.kwargs.get("memory_format")
            if node.target is aten._to_copy.default:
                keys = set(node.kwargs) - {"dtype", "layout", "device"}
                noop = not keys and _same_meta(node, src) and node.meta["val"].device == src.meta["val"].device
            if node.target in (aten.view.default, aten.reshape.default, aten.expand.default):
                noop = _same_meta(node, src) and src.meta["val"].is_contiguous()
            if node.target is aten.slice.Tensor:  # a full-range slice (x[:b] with b == len)
                noop = _same_meta(node, src) and node.meta["val"].stride() == src.meta["val"].stride()
            if noop and _same_meta(node, src) and not any(u.op == "output" for u in node.users):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                modified = True
        return modified


@registry.register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose values nobody uses (never random or mutating ops).

    before: %a = mul(%x, 2); %b = exp(%x); return %b
    after:  %b = exp(%x); return %b
    """

    name = "dce"

    def call(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("call_function", "get_attr") and not node.users and not is_impure(node):
                gm.graph.erase_node(node)
                modified = True
        return modified


def _key(x):
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_key(i) for i in x))
    if isinstance(x, dict):
        return tuple(sorted((k, _key(v)) for k, v in x.items()))
    if isinstance(x, fx.Node):
        return ("node", x.name)
    if isinstance(x, float) and x != x:
        return ("nan",)
    return (type(x).__name__, x if isinstance(x, (int, float, bool, str, type(None))) else str(x))


@registry.register_pass
class CSE(Pass):
    """Common-subexpression elimination of pure call_function nodes with identical target and args.

    before: %a = mul(%x, 2); %b = mul(%x, 2); %c = add(%a, %b)
    after:  %a = mul(%x, 2); %c = add(%a, %a)
    """

    name = "cse"

    def call(self, gm: fx.GraphModule) -> bool:
        seen: dict = {}
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or is_impure(node):
                continue
            k = (str(node.target), _key(node.args), _key(node.kwargs))
            if k in seen:
                node.replace_all_uses_with(seen[k])
                gm.graph.erase_node(node)
                modified = True
            else:
                seen[k] = node
        return modified


@registry.register_pass
class ConstantFold(Pass):
    """Evaluate subgraphs that depend only on weights/constants once, at compile time.

    before: %w = get_attr[fc.weight]; %t = permute(%w, [1, 0]); %s = mul(%scale_const, 2)
            %y = addmm(%b, %x, %t)
    after:  %s_folded = get_attr[_folded_0]    # permute of a weight stays: it is a free view
            %y = addmm(%b, %x, %t)
    Views and expands of constants are not folded (they cost nothing at run time and folding an
    expand would materialize a larger tensor); nor are random ops, or results larger than
    ``max_bytes`` (default 256 MiB).
    """

    name = "constant_fold"
    _SKIP = {aten.view.default, aten.permute.default, aten.t.default, aten.expand.default,
             aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor,
             aten.select.int, aten.transpose.int, aten._unsafe_view.default, aten.reshape.default}

    def call(self, gm: fx.GraphModule) -> bool:
        # Backends are called while the tracer's fake mode may still be active: fold on real tensors.
        with torch.no_grad(), unset_fake_temporarily():
            return self._fold(gm)

    def _fold(self, gm: fx.GraphModule) -> bool:
        max_bytes = self.options.get("max_bytes", 256 << 20)
        env: dict[fx.Node, object] = {}
        modified = False
        mutable = set(gm.meta.get("fxforge_mutations", ()))  # state (a KV cache) is not a constant
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                value = getattr(gm, node.target) if isinstance(node.target, str) else None
                env[node] = None if isinstance(value, FakeTensor) or node.target in mutable else value
                continue
            if node.op != "call_function" or is_impure(node):
                continue
            inputs = node.all_input_nodes
            if not all(i in env and isinstance(env[i], torch.Tensor) for i in inputs):
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            try:
                value = node.target(*args, **kwargs)
            except Exception:
                continue
            if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor):
                continue
            env[node] = value  # later folds read it, also when this node itself stays (a view)
            if node.target in self._SKIP or value.numel() * value.element_size() > max_bytes:
                continue
            i = 0
            while hasattr(gm, f"_folded_{i}"):
                i += 1
            attr = f"_folded_{i}"
            gm.register_buffer(attr, value.detach().contiguous())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(attr)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            env[new] = getattr(gm, attr)
            modified = True
        return modified
