"""Calibration runs and reports for the ``quantize`` pass: per-layer SQNR against the float layer, model size.

    from fxforge.passes.quant.report import layer_sqnr
    report = layer_sqnr(model, (x,), format="w4a16_g128")          # or quantize=Quantize(...), or a quantized gm
    print(report.render()); json.dump(report.to_json(), f)

``layer_sqnr`` captures the model (torch.export, as ``fxforge.compile`` does, without the other passes, so
layers keep their module names), runs the quantize pass, then runs the quantized graph on the sample
batches with an ``fx.Interpreter`` and, for every quantized layer, compares its output with the float
layer applied to the *same* input activation (``x @ W^T + b`` in float64 with the original weight), so each
layer's number is its own quantization error, not the error accumulated upstream. SQNR =
``10 log10(sum ||ref||^2 / sum ||ref - out||^2)`` over all batches (metrics.sqnr_db for one batch). The
output is in the activation dtype, so bf16 activations cap the SQNR near 50 dB.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree
from fxforge.errors import ConfigError
from torch import fx

from .quantize_pass import Quantize


@dataclass
class QuantReport:
    """What quantization did to a model: per-layer records (name, format, N, K, bytes before / after, hadamard,
    sqnr_db when measured) and the size of all graph constants before and after."""
    format: str
    layers: list = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    batches: int = 0  # calibration batches behind sqnr_db (0: not measured)

    @property
    def weight_bytes_before(self) -> int:
        return sum(r["bytes_before"] for r in _unique_weights(self.layers))

    @property
    def weight_bytes_after(self) -> int:
        return sum(r["bytes_after"] for r in _unique_weights(self.layers))

    def min_sqnr_db(self) -> float | None:
        vals = [r["sqnr_db"] for r in self.layers if r.get("sqnr_db") is not None]
        return min(vals) if vals else None

    def to_json(self) -> dict:
        """A JSON-safe dict (an exact layer, SQNR = inf, is written as null)."""
        out = asdict(self)
        out["layers"] = [{k: v for k, v in r.items() if k not in ("input",)} for r in self.layers]
        for r in out["layers"]:
            s = r.get("sqnr_db")
            r["sqnr_db"] = None if s is None or not math.isfinite(s) else round(s, 3)
        out.update(weight_bytes_before=self.weight_bytes_before, weight_bytes_after=self.weight_bytes_after,
                   min_sqnr_db=self.min_sqnr_db())
        return out

    def render(self) -> str:
        wb, wa = self.weight_bytes_before, self.weight_bytes_after
        lines = [f"quantization: {self.format}, {len(self.layers)} layers"
                 + (f", SQNR over {self.batches} batch(es)" if self.batches else ""),
                 f"model constants: {_mb(self.model_bytes_before)} -> {_mb(self.model_bytes_after)}"
                 f"   quantized weights: {_mb(wb)} -> {_mb(wa)} ({wa / wb:.3f}x)" if wb else "no layer quantized"]
        if self.layers:
            lines.append(f"  {'layer':<28} {'format':<11} {'N x K':>12} {'bytes before':>13} {'after':>10} "
                         f"{'hadamard':>8} {'SQNR dB':>8}")
        for r in self.layers:
            s = r.get("sqnr_db")
            sq = "-" if s is None else "inf" if math.isinf(s) else f"{s:.2f}"
            lines.append(f"  {r['name'][:28]:<28} {r['format']:<11} {str(r['N']) + 'x' + str(r['K']):>12} "
                         f"{r['bytes_before']:>13} {r['bytes_after']:>10} {r['hadamard'] or '-'!s:>8} {sq:>8}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    @classmethod
    def from_graph(cls, gm: fx.GraphModule) -> QuantReport:
        """The report of a graph the quantize pass has run on (no SQNR)."""
        layers = [dict(r) for r in gm.meta.get("fxforge_quant", [])]
        after = _constant_bytes(gm)
        before = after + sum(r["bytes_before"] - r["bytes_after"] for r in _unique_weights(layers))
        fmts = sorted({r["format"] for r in layers})
        return cls(format=fmts[0] if len(fmts) == 1 else "mixed" if fmts else "none", layers=layers,
                   model_bytes_before=before, model_bytes_after=after)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def _unique_weights(layers: list) -> list:
    """One record per packed weight (tied weights quantized once)."""
    seen, out = set(), []
    for r in layers:
        key = (r["weight"], r["hadamard"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _constant_bytes(gm: fx.GraphModule) -> int:
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    total = 0
    for t in targets:
        v = getattr(gm, t, None)
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


class _Recorder(fx.Interpreter):
    """Runs the graph, keeping the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set):
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach() if isinstance(out, torch.Tensor) else out
        return out


def _as_batches(inputs) -> list[tuple]:
    """``inputs``: one batch (a tuple of model inputs) or a list of such tuples."""
    if isinstance(inputs, list) and inputs and all(isinstance(b, (tuple, list)) for b in inputs):
        return [tuple(b) for b in inputs]
    return [tuple(inputs)]


def quantized_graph(model_or_gm, example_inputs: tuple, quantize: Quantize | None = None, **options) -> fx.GraphModule:
    """A graph with quantized layers: ``model_or_gm`` as is when the quantize pass already ran on it (its
    float weights must be in ``gm.meta["fxforge_quant_float"]``); else captured (nn.Module) and quantized
    with ``quantize`` or ``Quantize(**options)``. A GraphModule given unquantized is quantized in place."""
    if isinstance(model_or_gm, fx.GraphModule) and model_or_gm.meta.get("fxforge_quant"):
        if quantize is not None or options:
            raise ConfigError("layer_sqnr: the graph is already quantized; pass no quantize options")
        return model_or_gm
    if quantize is not None and options:
        raise ConfigError("layer_sqnr: pass either quantize=Quantize(...) or its options, not both")
    qpass = quantize if quantize is not None else Quantize(**options)
    if isinstance(model_or_gm, fx.GraphModule):
        gm = model_or_gm
    elif isinstance(model_or_gm, torch.nn.Module):
        from fxforge.capture import export_graph

        gm = export_graph(model_or_gm.eval(), example_inputs).gm
    else:
        raise TypeError(f"layer_sqnr expects an nn.Module or fx.GraphModule, got {type(model_or_gm).__name__}")
    qpass.call(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def layer_sqnr(model_or_gm, inputs, *, quantize: Quantize | None = None, **options) -> QuantReport:
    """Per-layer SQNR (dB) of every quantized linear against its float layer on sample ``inputs`` (one batch
    tuple or a list of them), plus sizes: a :class:`QuantReport`. See the module docstring."""
    batches = _as_batches(inputs)
    gm = quantized_graph(model_or_gm, batches[0], quantize, **options)
    records = gm.meta["fxforge_quant"]
    floats = gm.meta.get("fxforge_quant_float", {})
    missing = [r["node"] for r in records if r["node"] not in floats]
    if missing:
        raise ConfigError(f"layer_sqnr: no float weights recorded for {missing[:3]}; quantize the float model here")
    watch = {r["node"] for r in records} | {r["input"] for r in records}
    energy = {r["node"]: [0.0, 0.0] for r in records}
    for batch in batches:
        flat = [x for x in pytree.tree_leaves(batch) if isinstance(x, (torch.Tensor, int, float, bool))]
        rec = _Recorder(gm, watch)
        with torch.no_grad():
            rec.run(*flat)
        for r in records:
            weight, bias = floats[r["node"]]
            x, out = rec.values[r["input"]], rec.values[r["node"]]
            ref = x.double() @ weight.detach().double().to(x.device).T
            if bias is not None:
                ref = ref + bias.detach().double().to(x.device)
            e = energy[r["node"]]
            e[0] += float((ref * ref).sum())
            e[1] += float(((ref - out.double()) ** 2).sum())
    report = QuantReport.from_graph(gm)
    report.batches = len(batches)
    for r in report.layers:
        sig, err = energy[r["node"]]
        r["sqnr_db"] = math.inf if err == 0 else -math.inf if sig == 0 else 10.0 * math.log10(sig / err)
    return report
