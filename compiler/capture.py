"""Capture: turn a model into a functional ATen FX graph whose every node carries a fake value.

Two front doors share one decomposition table so passes and codegen see the same op set:
- AOT: ``torch.export`` + ``run_decompositions`` (``export_graph``); parameters, buffers and lifted
  constants become ``get_attr`` nodes so that constant folding and artifacts can see them.
- JIT: Dynamo + AOTAutograd (``fxforge.backend``) hands us the same kind of graph.

The table is core ATen plus decompositions of the composite ops our codegen fuses from primitives
(softmax, layer norm, GELU, SiLU), minus the attention ops we keep whole for an attention kernel.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._decomp import get_decompositions
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

aten = torch.ops.aten

# Composite ops whose primitive decomposition fuses into one of our reduction/pointwise kernels.
_EXTRA_DECOMPOSE = [
    aten._softmax, aten._log_softmax, aten.native_layer_norm, aten.gelu, aten.silu,
    aten.native_group_norm, aten.hardswish, aten.hardsigmoid, aten.mish, aten.softplus,
    aten.rms_norm,
]
# Kept whole: an attention kernel (or the eager fallback) handles them better than their pieces.
_KEEP = [
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
]


def _batch_norm_inference(x, weight, bias, running_mean, running_var, momentum, eps):
    """Eval-mode batch norm as per-channel pointwise math: folds into one pointwise kernel, and the
    weight-only part (scale = weight * rsqrt(var + eps)) folds to a constant at compile time."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    out = (x - running_mean.view(shape)) * scale.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    empty = x.new_zeros((0,))
    return out, empty, empty


def decomposition_table() -> dict:
    table = dict(torch.export.default_decompositions())
    table.update(get_decompositions(_EXTRA_DECOMPOSE))
    table[aten._native_batch_norm_legit_no_training.default] = _batch_norm_inference
    for op in _KEEP:
        table.pop(op, None)
    return table


@dataclass
class Captured:
    gm: fx.GraphModule
    user_inputs: list[str]  # placeholder names, in call order
    out_spec: Any  # pytree spec of the user-visible output
    in_spec: Any


def _const_attr_name(gm: fx.GraphModule, target: str) -> str:
    base = "c_" + "".join(ch if ch.isalnum() else "_" for ch in target)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _all_dims_dynamic(model: torch.nn.Module, example_inputs: tuple):
    """``Dim.AUTO`` for every dim of every tensor input, shaped like ``forward``'s signature
    (``torch.export`` wants a ``*args`` parameter's specs nested in one tuple)."""
    specs = [{d: torch.export.Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) else None
             for t in example_inputs]
    params = list(inspect.signature(model.forward).parameters.values())
    out, i = [], 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append(tuple(specs[i:]))
            i = len(specs)
        elif p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and i < len(specs):
            out.append(specs[i])
            i += 1
    return tuple(out)


def export_graph(model: torch.nn.Module, example_inputs: tuple, dynamic=False, dynamic_shapes=None) -> Captured:
    """``torch.export`` the model and decompose; weights become get_attr nodes on the graph module."""
    if not isinstance(model, torch.nn.Module):
        fn = model

        class _Wrap(torch.nn.Module):
            def forward(self, *args):
                return fn(*args)

        model = _Wrap()
    if dynamic and dynamic_shapes is None:
        dynamic_shapes = _all_dims_dynamic(model, example_inputs)
    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
        ep = ep.run_decompositions(decomposition_table())
    gm = ep.graph_module
    sig = ep.graph_signature
    if getattr(sig, "user_inputs_to_mutate", None):
        from .errors import FxforgeError

        raise FxforgeError(f"the model mutates its inputs {sorted(sig.user_inputs_to_mutate.values())[:4]} in place; "
                           "keep state such as a KV cache in module buffers (they are supported) or use "
                           "torch.compile(backend='fxforge')")
    # Buffer mutations (a static KV cache): export returns the new buffer values as the first graph
    # outputs; they stay outputs (so nothing computing them is dead) and the runtime writes them
    # back into the buffers after each call, or the reinplace pass makes the update in place.
    mutated_targets = [sig.buffers_to_mutate[n] for n in _output_names(gm)[:len(sig.buffers_to_mutate)]]
    named = {**dict(ep.named_parameters()), **dict(ep.named_buffers()), **ep.constants}
    lifted = {}
    lifted.update(sig.inputs_to_parameters)
    lifted.update(sig.inputs_to_buffers)
    lifted.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    lifted.update(getattr(sig, "inputs_to_lifted_custom_objs", {}) or {})
    user_inputs = []
    attr_of: dict[str, str] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        if node.name in lifted:
            target = lifted[node.name]
            value = named[target]
            attr = _const_attr_name(gm, target)
            attr_of[target] = attr
            gm.register_buffer(attr, value.detach()) if isinstance(value, torch.Tensor) else setattr(gm, attr, value)
            with graph.inserting_before(node):
                new = graph.get_attr(attr)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        else:
            user_inputs.append(node.name)
    gm.meta["fxforge_mutations"] = [attr_of[t] for t in mutated_targets]
    graph.lint()
    gm.recompile()
    return Captured(gm=gm, user_inputs=user_inputs, out_spec=ep.call_spec.out_spec, in_spec=ep.call_spec.in_spec)


def _output_names(gm: fx.GraphModule) -> list[str]:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return [a.name if isinstance(a, fx.Node) else "" for a in (out if isinstance(out, (list, tuple)) else [out])]


def mutated_buffers(gm: fx.GraphModule) -> list[str]:
    """Attribute names of the buffers the graph updates; their new values are its first outputs."""
    return list(gm.meta.get("fxforge_mutations", ()))


class _FakeProp(FakeTensorProp):
    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    vals = [n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta]
    mode = detect_fake_mode(vals)
    return mode or FakeTensorMode(allow_non_fake_inputs=True)


def propagate_meta(gm: fx.GraphModule) -> None:
    """Fill ``meta['val']`` on every node by fake propagation, reusing the graph's own fake mode
    (it carries the ShapeEnv with the dynamic-shape facts)."""
    mode = fake_mode_of(gm)
    args = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            args.append(n.meta["val"])
    prop = _FakeProp(gm, mode)
    with mode:
        prop.propagate_dont_convert_inputs(*args)
