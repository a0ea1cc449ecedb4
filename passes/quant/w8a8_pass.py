"""The ``quantize_w8a8`` pass: linear layers with constant weights -> ``fxforge::w8a8_linear`` (issue 4).

W8A8 as a graph rewrite (the module-swapping form is ``smoothquant.swap_linears_w8a8``; both produce
the same op with the same tensors, bit for bit): int8 weights per output channel, activations quantized
per token at run time, an int8 tensor-core GEMM with a per-token x per-channel rescale epilogue
(runtime/w8a8.py). SmoothQuant factors come from ``calibrate_smoothquant`` (a per-layer alpha search on
calibration batches), keyed by the module path of each ``nn.Linear``::

    smoothing = calibrate_smoothquant(model, batches)            # {"layers.0.q_proj": (alpha, s), ...}
    compiled = fxforge.compile(model, inputs, passes=w8a8_passes(smoothing))

Graph rewrite (the forms capture produces for ``nn.Linear``)::

    before: %w  = get_attr[c_layers_0_q_proj_weight]              # [N, K] float
            %wt = aten.permute(%w, [1, 0])
            %y  = aten.addmm(%b, %x, %wt)                         # or aten.mm(%x, %wt)
    after:  %c  = get_attr[c_layers_0_q_proj_weight_w8a8codes]    # int8 [N, K] (W * s quantized per row)
            %ws = get_attr[c_layers_0_q_proj_weight_w8a8scale]    # fp32 [N]
            %s  = get_attr[c_layers_0_q_proj_weight_w8a8smooth]   # fp32 [K] SmoothQuant s (x / s on the fly)
            %y  = fxforge.w8a8_linear(%x, %c, %ws, %s | None, %b | None)

Order: SmoothQuant factors belong to single ``nn.Linear`` layers, so with ``smoothing`` the pass must run
before ``merge_linears`` (which concatenates q|k|v and gate|up weights); ``w8a8_passes`` places it there and
``requires`` refuses a graph that already holds merged weights. Without smoothing either order works.

Options: ``smoothing`` ({name: (alpha, s [K])} or None), ``filter`` ((name, weight) -> bool; default: the
``quantize`` pass's ``default_filter``: every 2-D weight with K >= 64 but ``lm_head`` / ``embed``). Layers
with a name missing from ``smoothing`` are quantized unsmoothed (their record says ``alpha: None``).
Records go to ``gm.meta["fxforge_quant"]`` and ``self.layers`` like the weight-only pass.
"""
from __future__ import annotations

import torch
from fxforge.errors import ConfigError, PassError
from fxforge.pipeline import Pass
from fxforge.registry import registry
from torch import fx

from .quantize_pass import (
    check_options,
    linear_candidates,
    register_constants,
    replace_linear,
)
from .smoothquant import w8a8_quantize_linear

OPTIONS = ("smoothing", "filter")
MERGED_PREFIX = "merged_weight"  # attribute names merge_linears gives concatenated weights


@registry.register_pass
class QuantizeW8A8(Pass):
    """W8A8 (SmoothQuant) quantization of linear layers (module docstring: options and the graphs)."""

    name = "quantize_w8a8"

    def __init__(self, **options):
        super().__init__(**options)
        self.filter = check_options("quantize_w8a8", options, OPTIONS)
        self.smoothing = options.get("smoothing") or {}
        if not isinstance(self.smoothing, dict):
            raise ConfigError(f"quantize_w8a8: smoothing must be a dict name -> (alpha, s), got "
                              f"{type(self.smoothing).__name__}")
        for name, entry in self.smoothing.items():
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], torch.Tensor)
                    and entry[1].dim() == 1):
                raise ConfigError(f"quantize_w8a8: smoothing[{name!r}] must be (alpha, s [K] tensor), as "
                                  f"calibrate_smoothquant returns")
        self.layers: list[dict] = []

    def cache_id(self) -> str:
        # The factors are tensors: hash their values, not their repr.
        import hashlib

        h = hashlib.sha256(super().cache_id().encode())
        for name in sorted(self.smoothing):
            alpha, s = self.smoothing[name]
            h.update(f"{name}:{alpha}".encode())
            h.update(s.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def requires(self, gm: fx.GraphModule) -> None:
        if self.smoothing and any(n.op == "get_attr" and str(n.target).startswith(MERGED_PREFIX)
                                  for n in gm.graph.nodes):
            raise PassError("quantize_w8a8: the graph holds weights merge_linears concatenated; SmoothQuant "
                            "factors are per nn.Linear, so run this pass before merge_linears (w8a8_passes does)")

    def call(self, gm: fx.GraphModule) -> bool:
        done: dict[str, list] = {}  # weight attr -> attrs of its packed tensors (tied weights share them)
        self.layers = []
        records = gm.meta.setdefault("fxforge_quant", [])
        for n, x, w_node, bias, weight, name in linear_candidates(gm, self.filter):
            alpha, s = self.smoothing.get(name, (None, None))
            N, K = weight.shape
            if s is not None and tuple(s.shape) != (K,):
                raise ConfigError(f"quantize_w8a8: smoothing[{name!r}] has {s.numel()} factors, the layer's K is {K}")
            key = f"{w_node.target}:{name}"
            if key not in done:
                codes, w_scale, smooth, _ = w8a8_quantize_linear(weight, None, s)
                parts = (("_w8a8codes", codes), ("_w8a8scale", w_scale), ("_w8a8smooth", smooth))
                done[key] = register_constants(gm, w_node.target, parts, weight.device)

            def build(x=x, attrs=done[key], bias=bias):
                args = [gm.graph.get_attr(a) if a is not None else None for a in attrs]
                return gm.graph.call_function(torch.ops.fxforge.w8a8_linear.default, (x, *args, bias))
            new = replace_linear(gm, n, build)
            info = {"name": name, "node": new.name, "weight": str(w_node.target), "format": "w8a8", "N": int(N),
                    "K": int(K), "bytes_before": weight.numel() * weight.element_size(), "bytes_after": int(N * K + 4 * N
                    + (4 * K if s is not None else 0)), "alpha": alpha, "input": x.name, "bias": bias is not None}
            records.append(info)
            self.layers.append(info)
        return bool(self.layers)


def w8a8_passes(smoothing: dict | None = None, filter=None) -> list:
    """The default pipeline with ``quantize_w8a8`` placed just before ``merge_linears``."""
    from fxforge.config import DEFAULT_PASSES

    options = {"smoothing": smoothing}
    if filter is not None:
        options["filter"] = filter
    passes: list = list(DEFAULT_PASSES)
    passes.insert(passes.index("merge_linears"), QuantizeW8A8(**options))
    return passes
