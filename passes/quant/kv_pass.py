"""The ``kivi_cache`` pass: a static KV cache (HF ``StaticCache`` style, ``fxforge.models.KVCacheLlama``) becomes a
KIVI-quantized cache that each step appends to, attended by ``fxforge::kivi_append_attention``.

    from fxforge.config import DEFAULT_PASSES
    from fxforge.passes.quant.kv_pass import KIVIKVCache

    kv = KIVIKVCache(bits=2, group=32, residual=128)
    decode = fxforge.compile(model, (ids_1, pos_1), passes=[*DEFAULT_PASSES, kv])
    prefill = fxforge.compile(model, (ids_p, pos_p), passes=[*DEFAULT_PASSES, kv])  # same KIVI state
    kv.layers, kv.skipped                                   # what it did / left alone, with reasons

Graph rewrite, per attention layer (k shown; v alike; with or without ``reinplace`` / ``gqa_attention`` before)::

    before: %kc  = get_attr[c_k_cache0]                                  # [Bc, Hkv, S, D] float, state
            %kn  = index_put_(%kc, [%rows, None, %cache_pos], %k_vals)  # cache[rows, :, pos] = k: [b, T, Hkv, D]
            %ks  = slice(%kn, 0, 0, b)  ->  repeat_kv (expand/clone/view)   (both optional)
            %m   = unsqueeze(unsqueeze(le(unsqueeze(arange(S), 0), unsqueeze(%cache_pos, 1)), 0), 1)
            %o   = scaled_dot_product_attention(%q, %ks, %vs, %m)        # key_pos <= cache_pos
            return (%kn, %vn, ..., logits)                               # %kn written back into c_k_cache0
    after:  %k   = permute(expand(%k_vals, [b, T, Hkv, D]), [0, 2, 1, 3])
            %o   = fxforge.kivi_append_attention(%q, %k, %v, %cache_pos,
                        get_attr[c_k_cache0_kivi_k_codes], ... (8 state buffers), bits, G, Gv, R, scale)
            return (get_attr[c_k_cache0_kivi_k_codes], ..., logits)     # state, updated in place by the op

The fp buffers leave the program; the 8 KIVI buffers (``runtime/kivi_cache.py``: codes, scales, mins at capacity
CAPQ = G·⌊(S - R)/G⌋ tokens and a full-precision ring of R + G tokens) are its state instead (listed in
``gm.meta["fxforge_mutations"]``, so the runtime treats them as it treated the cache: e.g. kept across a
CUDA-graph warm-up). Memory per layer and row (fp16 cache, Hkv = 8, D = 128, S = 4096, 2-bit, G = Gv = 32,
R = 128, fp16 scales): fp16 K+V 2·S·D·2·Hkv = 16.8 MB -> codes + scales CAPQ·96 B·Hkv = 3.05 MB + ring
2·160·D·2·Hkv = 0.66 MB = 3.7 MB (4.5× smaller; the records give the exact bytes of each layer).

Semantics: the op appends the step's T tokens at ``cache_pos`` (they must continue the sequence: every row holds
``cache_pos[0]`` tokens before the step) and attends over the cache *after* the append, query t seeing positions
``<= cache_pos[t]``: equal to the float model with each key/value replaced by its KIVI representation
(``kivi_dequantize(kivi_quantize(history, ...))``). One query token runs ``kivi_decode_attention(lengths=)``;
several (a prefill) run the cache's masked float32 attention.

Options: ``bits`` (2 or 4, default 2), ``group`` (G tokens per key group, default 32), ``residual`` (R, a multiple of
G, default 128), ``v_group`` (channels per value group, default G), ``scale_dtype`` (default: the cache's dtype
for fp16 / bf16 caches, else float16; or float16, bfloat16,
float32), ``caches`` (a dict, layer name -> KIVIDecodeCache: the state; default this pass's own, so every
program compiled with the same pass object shares it; KIVIDecodeCache.empty zeroes it, i.e. an empty sequence).

Left alone, each with a reason in ``self.skipped`` / ``gm.meta["fxforge_kivi_skipped"]``: attention whose keys or
values are not a state buffer updated at ``[rows, None, cache_pos]``, another mask, dropout, causal flag, a cache
value read elsewhere, a head dim the packing cannot split, or S <= R (nothing would ever be quantized).
"""
from __future__ import annotations

import torch
from fxforge.errors import ConfigError
from fxforge.pipeline import Pass
from fxforge.registry import registry
from torch import fx

from ..cleanup import DeadCodeElimination
from ..patterns import constant
from ..state import _repeated_kv


def _runtime():
    """runtime/kivi_cache.py (the cache and the op), imported when first needed: it imports passes.quant.kv, and
    fxforge's own import of it (to register the op for loaded artifacts) would otherwise come back here."""
    from fxforge.runtime import kivi_cache

    return kivi_cache

aten = torch.ops.aten
OPTIONS = ("bits", "group", "residual", "v_group", "scale_dtype", "caches")
_INDEX_PUT = (aten.index_put.default, aten.index_put_.default)
_ARANGE = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _arange_to(gm, n, end: int) -> bool:
    """n is ``arange(end)`` (start 0, step 1), as an op or as a constant (constant_fold folds it)."""
    c = constant(gm, n)
    if c is not None:
        return c.dim() == 1 and not c.is_floating_point() and torch.equal(c.cpu(), torch.arange(end))
    if not (isinstance(n, fx.Node) and n.target in _ARANGE):
        return False
    a = list(n.args) + [None] * 3
    start, stop, step = (0, a[0], 1) if n.target is aten.arange.default else (a[0], a[1], a[2] if a[2] is not None else 1)
    return start == 0 and step == 1 and stop == end


def _unsqueezed(n, dim: int):
    """x for ``unsqueeze(x, dim)`` (dim also given as its negative form), else None."""
    if isinstance(n, fx.Node) and n.target is aten.unsqueeze.default:
        v = _val(n)
        if v is not None and n.args[1] in (dim, dim - v.dim()):
            return n.args[0]
    return None


def _cache_update(n):
    """(index_put node, batch rows b) for SDPA's key/value argument ``n`` = [repeat_kv](slice(update, 0, 0, b) | update)."""
    x = _repeated_kv(n) or n
    b = None
    if isinstance(x, fx.Node) and x.target is aten.slice.Tensor and x.args[1] == 0 and (len(x.args) < 3 or x.args[2] == 0) \
            and (len(x.args) < 5 or x.args[4] == 1):
        b, x = _val(x).shape[0], x.args[0]
    if not (isinstance(x, fx.Node) and x.target in _INDEX_PUT):
        return None
    return x, (b if b is not None else _val(x).shape[0])


def _update_parts(gm, upd: fx.Node, b: int, mutations: list):
    """(buffer get_attr, cache_pos, values) of ``upd = index_put(buf, [arange(b)[:, None], None, cache_pos], values)``
    with ``buf`` a [Bc >= b, Hkv, S, D] state buffer, else a reason string."""
    buf, idx, vals = upd.args[0], upd.args[1], upd.args[2]
    if len(upd.args) > 3 and upd.args[3] or upd.kwargs.get("accumulate", False):
        return "index_put with accumulate=True"
    if not (isinstance(buf, fx.Node) and buf.op == "get_attr" and buf.target in mutations):
        return "the updated tensor is not a state buffer"
    bv = _val(buf)
    if bv is None or bv.dim() != 4 or bv.shape[0] < b:
        return f"state buffer {buf.target} is not [B, Hkv, S, D] with B >= {b}"
    if not (isinstance(idx, (list, tuple)) and len(idx) == 3 and idx[1] is None):
        return "index_put indices are not [rows, None, cache_pos]"
    rows, pos = idx[0], idx[2]
    if not _arange_to(gm, _unsqueezed(rows, 1), b):
        return "index_put rows are not arange(b)[:, None]"
    pv = _val(pos)
    if not (isinstance(pos, fx.Node) and pos.op == "placeholder" and pv is not None and pv.dim() == 1
            and not pv.is_floating_point()):
        return "cache positions are not a 1-D integer input"
    return buf, pos, vals


def _position_mask(gm, mask, pos: fx.Node, s: int) -> bool:
    """mask is ``(arange(S)[None, :] <= cache_pos[:, None])`` with leading unit dims added by unsqueeze/view."""
    while isinstance(mask, fx.Node) and mask.target in (aten.unsqueeze.default, aten.view.default, aten.reshape.default,
                                                        aten.expand.default):
        mask = mask.args[0]
    if isinstance(mask, fx.Node) and mask.target is aten.ge.Tensor:
        a, c = mask.args[1], mask.args[0]
    elif isinstance(mask, fx.Node) and mask.target is aten.le.Tensor:
        a, c = mask.args[0], mask.args[1]
    else:
        return False
    return _arange_to(gm, _unsqueezed(a, 0), s) and _unsqueezed(c, 1) is pos


def _chain(n, stop: fx.Node) -> list:
    """The nodes from SDPA's argument ``n`` back to (excluding) ``stop``, first the closest."""
    out = []
    while isinstance(n, fx.Node) and n is not stop:
        out.append(n)
        n = n.args[0]
    return out


class _Skip(Exception):
    pass


@registry.register_pass
class KIVIKVCache(Pass):
    """Static KV cache -> KIVI cache + ``fxforge::kivi_append_attention`` (module docstring: options, graphs)."""

    name = "kivi_cache"

    def __init__(self, **options):
        super().__init__(**options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"kivi_cache: unknown option(s) {unknown}; options: {list(OPTIONS)}")
        self.bits = options.get("bits", 2)
        self.group = options.get("group", 32)
        self.residual = options.get("residual", 128)
        self.v_group = options.get("v_group", self.group)
        for key in ("bits", "group", "residual", "v_group"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"kivi_cache: {key} must be an int, got {v!r}")
        sd = options.get("scale_dtype")
        self.scale_dtype = _SCALE_DTYPES.get(sd, sd) if isinstance(sd, str) else sd
        if self.scale_dtype is not None and self.scale_dtype not in _SCALE_DTYPES.values():
            raise ConfigError(f"kivi_cache: scale_dtype must be float16, bfloat16 or float32, got {sd!r}")
        try:  # the numeric constraints, checked once here with a head dim every valid v_group divides
            _runtime().KIVIDecodeCache.empty(1, 1, self.v_group, 1, bits=self.bits, group=self.group, residual=self.residual,
                                  v_group=self.v_group)
        except ValueError as e:
            raise ConfigError(f"kivi_cache: {e}") from None
        self.caches = options.get("caches", {})
        if not isinstance(self.caches, dict):
            raise ConfigError(f"kivi_cache: caches must be a dict (layer name -> KIVIDecodeCache), got {self.caches!r}")
        self.layers: list[dict] = []
        self.skipped: list[dict] = []

    def cache_id(self) -> str:  # the state dict is not an option of the generated code
        return Pass.cache_id(type(self)(**{k: v for k, v in self.options.items() if k != "caches"}))

    def __repr__(self) -> str:
        return f"KIVIKVCache(bits={self.bits}, group={self.group}, residual={self.residual}, v_group={self.v_group})"

    def call(self, gm: fx.GraphModule) -> bool:
        self.layers, self.skipped = [], []
        records = gm.meta.setdefault("fxforge_kivi", [])
        skipped = gm.meta.setdefault("fxforge_kivi_skipped", [])
        mutations = list(gm.meta.get("fxforge_mutations", ()))
        output = next(n for n in gm.graph.nodes if n.op == "output")
        outs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        state_outs, dead = [], []
        for n in list(gm.graph.nodes):
            if n.target is not aten.scaled_dot_product_attention.default:
                continue
            try:
                match = self._match(gm, n, mutations, outs)
            except _Skip as e:
                info = {"node": n.name, "reason": str(e)}
                skipped.append(info)
                self.skipped.append(info)
                continue
            state_outs += self._rewrite(gm, n, match, records)
            for upd, buf, chain in match["updates"]:
                i = outs.index(upd)
                del outs[i], mutations[i]
                dead.append((upd, buf, chain))
        if not state_outs:
            return False
        n_mut = len(mutations)
        output.args = (tuple(outs[:n_mut] + state_outs + outs[n_mut:]),)
        gm.meta["fxforge_mutations"] = mutations + [s.target for s in state_outs]
        for upd, buf, chain in dead:  # the float cache and its update leave the program
            for node in chain + [upd, buf]:
                if not node.users:
                    gm.graph.erase_node(node)
            if buf.target in gm._buffers and not any(m.op == "get_attr" and m.target == buf.target for m in gm.graph.nodes):
                del gm._buffers[buf.target]
        DeadCodeElimination().call(gm)  # the position mask
        return True

    def _match(self, gm, sdpa: fx.Node, mutations: list, outs: list) -> dict:
        args = list(sdpa.args) + [None] * (7 - len(sdpa.args))
        q, k, v = args[:3]
        mask = args[3] if args[3] is not None else sdpa.kwargs.get("attn_mask")
        if (args[4] or sdpa.kwargs.get("dropout_p", 0.0)) or args[5] or sdpa.kwargs.get("is_causal", False):
            raise _Skip("dropout or is_causal (a static cache is masked by positions)")
        found = [_cache_update(k), _cache_update(v)]
        if None in found:
            raise _Skip("keys/values are not a cache update (index_put) [+ slice] [+ repeat_kv]")
        (ku, b), (vu, bv) = found
        parts = [_update_parts(gm, ku, b, mutations), _update_parts(gm, vu, bv, mutations)]
        for p in parts:
            if isinstance(p, str):
                raise _Skip(p)
        (kbuf, pos, kvals), (vbuf, vpos, vvals) = parts
        qv, kb = _val(q), _val(kbuf)
        if vpos is not pos or b != bv or kbuf is vbuf or _val(vbuf).shape != kb.shape:
            raise _Skip("keys and values are not two equal caches updated at the same rows and positions")
        bc, hkv, s, d = kb.shape
        t = _val(pos).shape[0]
        if qv is None or qv.dim() != 4 or tuple(qv.shape) != (b, qv.shape[1], t, d) or qv.shape[1] % hkv:
            raise _Skip(f"query {tuple(qv.shape) if qv is not None else None} does not match the cache [b={b}, T={t}, D={d}]")
        if mask is None or not _position_mask(gm, mask, pos, s):
            raise _Skip("attention mask is not key_pos <= cache_pos")
        for vals in (kvals, vvals):
            vv = _val(vals)
            try:
                ok = vv is not None and torch.broadcast_shapes(tuple(vv.shape), (b, t, hkv, d)) == (b, t, hkv, d)
            except RuntimeError:
                ok = False
            if not ok:
                raise _Skip(f"cache update values {tuple(vv.shape) if vv is not None else None} are not [b, T, Hkv, D]")
        if s <= self.residual:
            raise _Skip(f"cache length {s} <= residual {self.residual}: nothing would be quantized")
        if d % self.v_group or d % (8 // self.bits):
            raise _Skip(f"head dim {d} is not a multiple of v_group {self.v_group} and of {8 // self.bits} codes per byte")
        updates = []
        for upd, buf, arg in ((ku, kbuf, k), (vu, vbuf, v)):
            chain = _chain(arg, upd)
            output = next(n for n in gm.graph.nodes if n.op == "output")
            if any(set(c.users) - {sdpa, *chain} for c in chain) or set(upd.users) - {output, sdpa, *chain} \
                    or sum(o is upd for o in outs) != 1 or set(buf.users) != {upd}:
                raise _Skip(f"the cache {buf.target} (or its updated value) is read elsewhere")
            i = outs.index(upd)
            if i >= len(mutations) or mutations[i] != buf.target:
                raise _Skip(f"the updated cache {buf.target} is not written back as state")
            updates.append((upd, buf, chain))
        return {"q": q, "pos": pos, "kvals": kvals, "vvals": vvals, "b": b, "t": t, "shape": (bc, hkv, s, d),
                "dtype": kb.dtype, "device": getattr(gm, kbuf.target).device, "updates": updates,
                "layer": kbuf.target, "scale": sdpa.kwargs.get("scale")}

    def _scale_dtype(self, cache_dtype: torch.dtype) -> torch.dtype:
        """The option, or by default the cache's own dtype for fp16 / bf16 caches (bf16 scales with a bf16
        model let the attention kernel dequantize in packed bf16: 8-9% faster on the H100) and fp16 else."""
        if self.scale_dtype is not None:
            return self.scale_dtype
        return cache_dtype if cache_dtype in (torch.float16, torch.bfloat16) else torch.float16

    def _cache_for(self, m: dict):
        bc, hkv, s, d = m["shape"]
        sdt = self._scale_dtype(m["dtype"])
        cache = self.caches.get(m["layer"])
        if cache is None:
            cache = _runtime().KIVIDecodeCache.empty(bc, hkv, d, s, bits=self.bits, group=self.group, residual=self.residual,
                                          v_group=self.v_group, dtype=m["dtype"], scale_dtype=sdt,
                                          device=m["device"])
            self.caches[m["layer"]] = cache
        want = (bc, hkv, d, self.bits, self.group, self.v_group, self.residual, m["dtype"], sdt)
        have = (cache.batch, cache.heads, cache.head_dim, cache.bits, cache.group, cache.v_group, cache.residual,
                cache.k_ring.dtype, cache.k_scale.dtype)
        if want != have or cache.max_tokens < s:
            raise ConfigError(f"kivi_cache: the shared cache of {m['layer']} {have} (max {cache.max_tokens} tokens) does not "
                              f"fit this graph's {want} with {s} positions")
        return cache

    def _rewrite(self, gm, sdpa: fx.Node, m: dict, records: list) -> list:
        cache = self._cache_for(m)
        bc, hkv, s, d = m["shape"]
        b, t, g = m["b"], m["t"], gm.graph
        names = []
        for name, tensor in cache.buffers().items():
            attr = f"{m['layer']}_kivi_{name}"
            if getattr(gm, attr, None) is not tensor:
                gm.register_buffer(attr, tensor)
            names.append(attr)
        with g.inserting_before(sdpa):
            kv = [g.call_function(aten.permute.default,
                                  (g.call_function(aten.expand.default, (vals, [b, t, hkv, d])), [0, 2, 1, 3]))
                  for vals in (m["kvals"], m["vvals"])]
            state = [g.get_attr(a) for a in names]
            op = g.call_function(torch.ops.fxforge.kivi_append_attention.default,
                                 (m["q"], *kv, m["pos"], *state, self.bits, self.group, self.v_group, self.residual,
                                  m["scale"]))
        op.meta = dict(sdpa.meta)
        sdpa.replace_all_uses_with(op)
        g.erase_node(sdpa)
        elt = torch.empty((), dtype=m["dtype"]).element_size()
        info = {"layer": m["layer"], "node": op.name, "batch": bc, "kv_heads": hkv, "max_seq": s, "head_dim": d,
                "query_tokens": t, "bits": self.bits, "group": self.group, "v_group": self.v_group,
                "residual": self.residual, "bytes_before": 2 * bc * hkv * s * d * elt, "bytes_after": cache.nbytes(),
                "state": dict(zip(_runtime().STATE, names))}
        records.append(info)
        self.layers.append(info)
        return state
