"""The ``quantize`` pass: linear layers with constant weights -> weight-only quantized ``fxforge::quant_linear``.

Configured like torchao's ``quantize_(model, config, filter_fn)``: a format (a name of
``passes/quant/formats.FORMATS``) and a filter deciding which layers to quantize::

    from fxforge.config import DEFAULT_PASSES
    from fxforge.passes.quant.quantize_pass import Quantize

    q = Quantize(format="w4a16_g128")                        # default filter (below)
    compiled = fxforge.compile(model, inputs, passes=[*DEFAULT_PASSES, q])
    q.layers                                                  # what it did: name, format, N, K, bytes

Graph rewrite (the forms capture produces for ``nn.Linear``)::

    before: %w  = get_attr[c_layers_0_up_proj_weight]              # [N, K] float
            %wt = aten.permute(%w, [1, 0])
            %y  = aten.mm(%x, %wt)                                 # or aten.addmm(%b, %x, %wt)
    after:  %c  = get_attr[c_layers_0_up_proj_weight_qcodes]      # packed codes (uint8 / int8)
            %s  = get_attr[c_layers_0_up_proj_weight_qscales]     # block / channel scales
            %z  = get_attr[c_layers_0_up_proj_weight_qzeros]      # zero points (w4a16 only)
            %y  = fxforge.quant_linear(%x, %c, %s, %z, None, %b | None, "w4a16_g128", K)

with ``hadamard=32`` the activation is rotated first and the weight is quantized after ``w @ R``
(passes/quant/hadamard.py; ``R = blockdiag(D H_32, ...)``, exact: ``(x R)(w R)^T = x w^T``)::

            %r  = get_attr[hadamard_32_float32]                    # D H_32 [32, 32], x's dtype
            %xr = aten.reshape(aten.mm(aten.reshape(%x, [-1, 32]), %r), [-1, K])
            %y  = fxforge.quant_linear(%xr, ...)

Options
-------
``format``         a FORMATS name (default ``"w8a16"``: int8 per channel, near-lossless per the literature).
``filter``         ``(name, weight) -> bool``; ``name`` is the module path (``"layers.0.q_proj"``) from the
                   node's ``nn_module_stack`` where capture recorded it, else the weight's attribute name
                   (``"c_lm_head_weight"``; ``"merged_weight_0"`` for a group merge_linears formed).
                   Default :func:`default_filter`: every 2-D weight with K >= 64 whose name contains neither
                   ``"lm_head"`` nor ``"embed"`` (output heads and tied embeddings are the most sensitive
                   layers and are usually kept in high precision).
``hadamard``       ``None`` (default), a power-of-two block (e.g. 32) or ``"full"`` (one K x K rotation).
                   Applied only where it is exact: the block divides K (``"full"``: K a power of two);
                   other layers are quantized unrotated (their record says ``hadamard: None``).
``hadamard_seed``  ``None``: plain Sylvester Hadamard; an int: random signs ``D`` from that seed.

Never touched: weights the graph mutates (``gm.meta["fxforge_mutations"]``), non-constant weights, layers
whose activation is not fp16 / bf16 / fp32. Per-layer records (name, node, weight, format, N, K, bytes
before / after, hadamard) go to ``gm.meta["fxforge_quant"]`` (JSON-friendly) and ``self.layers``; the
original float weights (references, no copies) to ``gm.meta["fxforge_quant_float"]`` for
``report.layer_sqnr``. The float weight's get_attr / permute nodes are removed when nothing else uses them.
"""
from __future__ import annotations

import torch
from fxforge.errors import ConfigError
from fxforge.pipeline import Pass
from fxforge.registry import registry
from fxforge.runtime import quant_linear as _quant_linear  # noqa: F401  (registers fxforge::quant_linear)
from torch import fx

from ..patterns import constant as _const
from ..patterns import linear_parts as _linear_parts
from .formats import FORMATS, QuantFormat, quantize
from .hadamard import random_signs, rotate_weight, rotation_matrix

aten = torch.ops.aten
OPTIONS = ("format", "filter", "hadamard", "hadamard_seed")
DEFAULT_MIN_K = 64
DEFAULT_EXCLUDE = ("lm_head", "embed")
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def default_filter(name: str, weight: torch.Tensor) -> bool:
    """Quantize every 2-D weight with K >= 64 except those whose name contains "lm_head" or "embed"."""
    return weight.dim() == 2 and weight.shape[1] >= DEFAULT_MIN_K and not any(s in name for s in DEFAULT_EXCLUDE)


def _layer_name(n: fx.Node, w_node: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return str(w_node.target)


def _fresh(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def check_options(pass_name: str, options: dict, allowed: tuple):
    """Refuse unknown options; return the ``filter`` option (default :func:`default_filter`), checked."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{pass_name}: unknown option(s) {unknown}; options: {list(allowed)}")
    filt = options.get("filter", default_filter)
    if not callable(filt):
        raise ConfigError(f"{pass_name}: filter must be a callable (name, weight) -> bool, got {filt!r}")
    return filt


def linear_candidates(gm: fx.GraphModule, filt):
    """``(node, x, weight node, bias node | None, weight, layer name)`` for every linear over a constant
    (never mutated) float weight whose input is fp16 / bf16 / fp32 and that ``filt(name, weight)`` accepts,
    over a snapshot of the graph's nodes (the caller may replace each one as it goes)."""
    for n in list(gm.graph.nodes):
        parts = _linear_parts(gm, n)
        if parts is None:
            continue
        x, w_node, bias = parts
        weight = getattr(gm, w_node.target)
        xval = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(xval, torch.Tensor) or xval.dtype not in _ACT_DTYPES or not weight.is_floating_point():
            continue
        name = _layer_name(n, w_node)
        if filt(name, weight):
            yield n, x, w_node, bias, weight, name


def register_constants(gm: fx.GraphModule, base: str, parts, device) -> list:
    """Register each ``(suffix, tensor | None)`` as a fresh buffer ``<base><suffix>``; their names (None kept)."""
    attrs = []
    for suffix, t in parts:
        if t is None:
            attrs.append(None)
            continue
        attr = _fresh(gm, f"{base}{suffix}")
        gm.register_buffer(attr, t.to(device))
        attrs.append(attr)
    return attrs


def replace_linear(gm: fx.GraphModule, n: fx.Node, build) -> fx.Node:
    """Replace the linear ``n`` by the node ``build()`` creates (inserted before ``n``; same output value),
    then drop the float weight's permute / get_attr / buffer if nothing else reads them."""
    with gm.graph.inserting_before(n):
        new = build()
    new.meta = dict(n.meta)  # same output value ([M, N], x's dtype)
    wt = n.args[2] if n.target is aten.addmm.default else n.args[1]
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)
    _drop_if_dead(gm, wt)
    return new


def _drop_if_dead(gm: fx.GraphModule, wt: fx.Node) -> None:
    """Remove the float weight's permute and get_attr (and the attribute itself) once nothing uses them."""
    if wt.users:
        return
    w_node = wt.args[0]
    gm.graph.erase_node(wt)
    if w_node.users:
        return
    target = w_node.target
    gm.graph.erase_node(w_node)
    if not any(m.op == "get_attr" and m.target == target for m in gm.graph.nodes) and target in gm._buffers:
        del gm._buffers[target]


def _resolve_format(fmt) -> QuantFormat:
    if isinstance(fmt, QuantFormat):
        if FORMATS.get(fmt.name) != fmt:
            raise ConfigError(f"quantize: format {fmt.name!r} is not one of the registered FORMATS (the kernels "
                              f"run those): {', '.join(FORMATS)}")
        return fmt
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ConfigError(f"quantize: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


@registry.register_pass
class Quantize(Pass):
    """Weight-only quantization of linear layers (module docstring: options and the graphs)."""

    name = "quantize"

    def __init__(self, **options):
        super().__init__(**options)
        self.filter = check_options("quantize", options, OPTIONS)
        self.format = _resolve_format(options.get("format", "w8a16"))
        self.hadamard = options.get("hadamard")
        h = self.hadamard
        if h is not None and h != "full" and not (isinstance(h, int) and not isinstance(h, bool) and h >= 2
                                                  and h & (h - 1) == 0):
            raise ConfigError(f"quantize: hadamard must be None, 'full' or a power-of-two block >= 2, got {h!r}")
        self.seed = options.get("hadamard_seed")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"quantize: hadamard_seed must be None or an int, got {self.seed!r}")
        self.layers: list[dict] = []

    def __repr__(self) -> str:
        return f"Quantize(format={self.format.name}, hadamard={self.hadamard}, hadamard_seed={self.seed})"

    def _rotation_block(self, k: int) -> int | None:
        """The Hadamard block for reduction dim ``k`` where the rotation is exact, else None."""
        if self.hadamard is None:
            return None
        b = k if self.hadamard == "full" else self.hadamard
        return b if b >= 2 and b & (b - 1) == 0 and k % b == 0 else None

    def _signs(self, b: int) -> torch.Tensor | None:
        return None if self.seed is None else random_signs(b, self.seed)

    def call(self, gm: fx.GraphModule) -> bool:
        fmt = self.format
        packed: dict[tuple, tuple] = {}  # (weight attr, rotation block) -> packed get_attr targets (tied weights)
        rotations: dict[tuple, str] = {}  # (block, dtype) -> attr of the [b, b] rotation
        rotated: dict[tuple, fx.Node] = {}  # (x node, block) -> rotated x (q/k/v share one rotation)
        self.layers = []
        records = gm.meta.setdefault("fxforge_quant", [])
        floats = gm.meta.setdefault("fxforge_quant_float", {})
        for n, x, w_node, bias, weight, name in linear_candidates(gm, self.filter):
            N, K = weight.shape
            block = self._rotation_block(K)
            key = (w_node.target, block)
            if key not in packed:
                w64 = weight.detach().double()
                if block is not None:
                    w64 = rotate_weight(w64, block, self._signs(block))
                qt = quantize(w64, fmt)
                parts = [(f"_q{part}", getattr(qt, part)) for part in ("codes", "scales", "zeros", "tensor_scale")]
                packed[key] = (register_constants(gm, w_node.target, parts, weight.device), qt.nbytes())
            attrs, nbytes = packed[key]

            def build(x=x, attrs=attrs, bias=bias, block=block, K=K):
                x_in = x if block is None else self._rotate(gm, x, K, block, x.meta["val"].dtype, rotations, rotated)
                args = [gm.graph.get_attr(a) if a is not None else None for a in attrs]
                return gm.graph.call_function(torch.ops.fxforge.quant_linear.default, (x_in, *args, bias, fmt.name, int(K)))
            new = replace_linear(gm, n, build)
            info = {"name": name, "node": new.name, "weight": str(w_node.target), "format": fmt.name, "N": int(N),
                    "K": int(K), "bytes_before": weight.numel() * weight.element_size(), "bytes_after": int(nbytes),
                    "hadamard": block, "hadamard_seed": self.seed if block is not None else None,
                    "input": x.name, "bias": bias is not None}
            records.append(info)
            self.layers.append(info)
            floats[new.name] = (weight, _const(gm, bias) if bias is not None else None)
        return bool(self.layers)

    def _rotate(self, gm, x: fx.Node, k: int, block: int, dtype, rotations: dict, rotated: dict) -> fx.Node:
        """x @ blockdiag(D H_b, ...) as reshape -> mm with the [b, b] block -> reshape (inserted at the cursor)."""
        if (x, block) in rotated:
            return rotated[(x, block)]
        if (block, dtype) not in rotations:
            attr = _fresh(gm, f"hadamard_{block}_{str(dtype).split('.')[-1]}")
            r = rotation_matrix(block, block, self._signs(block)).to(dtype=dtype, device=x.meta["val"].device)
            gm.register_buffer(attr, r)
            rotations[(block, dtype)] = attr
        g = gm.graph
        rows = g.call_function(aten.reshape.default, (x, [-1, block]))
        mixed = g.call_function(aten.mm.default, (rows, g.get_attr(rotations[(block, dtype)])))
        out = g.call_function(aten.reshape.default, (mixed, [-1, k]))
        rotated[(x, block)] = out
        return out
