"""Launching the attention template: block layouts (FlexAttention-style BlockMask lists) and
launch configs. ``attention(...)`` is also the direct Python entry point used by benchmarks and by
passes that build sparse layouts (sink + window, static per-head patterns).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from .kernels import next_pow2, template_kernels

TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "attention.py"


def template_source() -> str:
    return TEMPLATE.read_text()


def block_layout(lq: int, lk: int, block_m: int, block_n: int, causal: bool, sink: int = 0, window: int = 0,
                 device="cpu"):
    """Per query block, the key blocks that are FULL (every element visible, in bounds) and PARTIAL
    (some visible); others are skipped. Visibility: k < lk, k <= q if causal, and if ``window`` > 0
    also (q - k < window or k < sink). Returns (full_cnt, full_idx, part_cnt, part_idx, max_blocks)."""
    # Built on the CPU (a few hundred thousand block pairs at 32K: sub-millisecond), then moved.
    nq, nk = -(-lq // block_m), -(-lk // block_n)
    qlo = torch.arange(nq)[:, None] * block_m
    qhi = torch.clamp(qlo + block_m, max=lq) - 1
    klo = torch.arange(nk)[None, :] * block_n
    khi_raw = klo + block_n - 1
    khi = torch.clamp(khi_raw, max=lk - 1)
    any_vis = torch.ones(nq, nk, dtype=torch.bool)
    all_vis = (khi_raw < lk).expand(nq, nk).clone()
    if causal:
        any_vis &= klo <= qhi
        all_vis &= khi <= qlo
    if window > 0:
        near = (qlo - khi) < window  # closest (q, k) pair with k <= q lies within the window
        any_vis &= near | (klo < sink)
        all_vis &= ((qhi - klo) < window) | (khi < sink)
    full = any_vis & all_vis
    part = any_vis & ~all_vis

    def lists(sel):
        cnt = sel.sum(1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return cnt, order
    fc, fi = lists(full)
    pc, pi = lists(part)
    maxb = max(int(fc.max()) if nq else 0, int(pc.max()) if nq else 0, 1)
    return tuple(t.contiguous().to(device) for t in (fc, fi[:, :maxb], pc, pi[:, :maxb])) + (maxb,)


def _mask_strides(mask: torch.Tensor | None) -> tuple:
    if mask is None:
        return (0, 0, 0, 0)
    shp, st = list(mask.shape), list(mask.stride())
    shp, st = [1] * (4 - len(shp)) + shp, [0] * (4 - len(st)) + st
    return tuple(0 if s == 1 else x for s, x in zip(shp, st))


def choose_blocks(lq: int, d: int, interpreted: bool, elt: int = 2) -> dict:
    return block_configs(lq, d, interpreted, elt)[0]


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


# GPU launch configs for long queries, best guess first (the executor tries only the first unless
# autotune="max"; bench_attention times them all). (BLOCK_M, BLOCK_N, warps, stages, TMA, LPT, WS,
# PIPE). From the H100 probes (benchmarks/results/probe_attention.md): 128x128 with host descriptors
# won both lengths, in a different order: heads interleaved, heavy-first (LPT=1) at 8K causal (545
# TFLOP/s, 0.94x SDPA), head-major heavy-first (LPT=2) at 32K (562, 0.94x) and sink+window (2.40 ms,
# 1.07x flex). At 32K one head's K/V is 16 MB, so programs of different heads evict each other from
# L2 unless co-resident programs share a head; at 8K (4 MB per head) balance across heads matters more.
LONG_CONFIGS = [
    (128, 128, 8, 3, 2, 1, False, False), (128, 128, 8, 3, 2, 2, False, False),
    (128, 64, 8, 3, 1, 1, False, False), (128, 64, 8, 3, 1, 2, False, False),
    (64, 64, 4, 3, 2, 2, False, False),
]
HEAD_MAJOR_FROM = 16384  # query length from which the head-major order (LPT=2) is the default


SMEM_LIMIT = 232448  # H100 shared memory per block (bytes): Triton raises OutOfResources above it
# Small tiles for inputs the long-sequence list cannot hold in shared memory (fp32, head dim 256).
SMALL_CONFIGS = [(64, 64, 4, 2, 0, 1, False, False), (64, 32, 4, 2, 0, 1, False, False), (32, 32, 4, 1, 0, 1, False, False)]


def smem_bytes(bm: int, bn: int, stages: int, head: int, elt: int) -> int:
    """Shared memory of a config: ``stages`` K and V tiles plus the Q tile (+1 KB of barriers). Matches
    what the H100 reported for 128x128 s3 bf16 head 128 (230,400 bytes, probe_attention.md)."""
    return stages * bn * head * 2 * elt + bm * head * elt + 1024


def block_configs(lq: int, d: int, interpreted: bool, elt: int = 2) -> list[dict]:
    """Launch configs to try (the first is the default): tiles, warps, stages and the template's
    TMA / LPT / WS options (codegen/templates/attention.py header). ``elt``: bytes per element of q/k/v;
    configs whose tiles exceed the shared memory (fp32 with the bf16 list) are dropped, down to
    SMALL_CONFIGS."""
    head = max(16, next_pow2(d))
    if interpreted:
        return [{"BLOCK_M": 32 if lq > 16 else 16, "BLOCK_N": 32, "HEAD_DIM": head}]
    if lq <= 64:
        bm = max(16, next_pow2(lq))
        return [{"BLOCK_M": bm, "BLOCK_N": 64, "HEAD_DIM": head, "num_warps": 4, "num_stages": 3}]
    hopper = _hopper()
    out = []
    order = sorted(LONG_CONFIGS, key=lambda c: c[5] != 2) if lq >= HEAD_MAJOR_FROM else LONG_CONFIGS
    def fit(cands):
        return [c for c in cands if smem_bytes(c[0], c[1], c[3], head, elt) <= SMEM_LIMIT and not (head >= 256 and c[1] > 64)]
    for bm, bn, w, s, tma, lpt, ws, pipe in fit(order) or fit(SMALL_CONFIGS) or SMALL_CONFIGS[-1:]:
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": head, "num_warps": w, "num_stages": s,
                    "TMA": tma if hopper else 0, "LPT": lpt, "WS": ws and hopper, "PIPE": pipe})
    return out


def _rows_view(t: torch.Tensor, head: int):
    """Row count of ``t`` [B, H, L, D] seen as a 2-D [rows, D] matrix with row stride t.stride(2),
    or None where a tensor descriptor cannot address it (see the template header)."""
    B, H, L, D = t.shape
    sb, sh, sm, sd = t.stride()
    esz = t.element_size()
    if D != head or (sd != 1 and D > 1) or sm <= 0 or (sm * esz) % 16 or sb % sm or sh % sm or t.data_ptr() % 16:
        return None
    return ((B - 1) * sb + (H - 1) * sh) // sm + L


_DUMMIES: dict = {}


def _dummy(device):
    """Placeholder for unused pointer/descriptor arguments (cached: no allocation + fill per launch)."""
    if device not in _DUMMIES:
        _DUMMIES[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _DUMMIES[device]


_ALLOCATOR_SET = False
STRICT = False  # True (the probe): a TMA/WS config that fails to compile raises instead of falling back
_FAILED: set = set()  # launch keys whose TMA/WS compile failed in this process
LAST_COMPILED = None  # the last launch's compiled kernel (registers / spills / shared memory, for probes)


def _device_descriptor_allocator():
    """In-kernel descriptors (TMA=1) need scratch memory from a Triton allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        import triton

        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def launch(kern, q, k, v, mask, out, scale: float, causal: bool, sink: int = 0, window: int = 0, layout=None,
           blocks: dict | None = None):
    """Run the attention kernel: q [B,H,Lq,D], k/v [B,Hkv,Lk,D], optional mask broadcastable to
    [B,H,Lq,Lk] (bool: keep where True; float: added to the scores)."""
    interpreted = q.device.type == "cpu"
    B, H, LQ, D = q.shape
    HKV, LK = k.shape[1], k.shape[2]
    if H % HKV:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({HKV})")
    cfg = dict(blocks or choose_blocks(LQ, D, interpreted, q.element_size()))
    bm, bn, head = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["HEAD_DIM"]
    tma, lpt, ws = int(cfg.pop("TMA", 0)), int(cfg.pop("LPT", 0)), bool(cfg.pop("WS", False))
    pipe = bool(cfg.pop("PIPE", False))
    if window > 0 and layout is None:
        layout = block_layout(LQ, LK, bm, bn, causal, sink, window, q.device)
    use_layout = layout is not None
    dummy = _dummy(q.device)
    fc, fi, pc, pi, maxb = layout if use_layout else (dummy, dummy, dummy, dummy, 1)
    if interpreted:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    if LQ == 0 or B * H == 0:
        return out
    key = (tuple(sorted(cfg.items())), tma, ws, pipe, use_layout, causal, mask is not None, q.dtype, D)
    if key in _FAILED:
        tma, ws = 0, False
    nq = -(-LQ // bm)
    if lpt == 1 and nq > 65535:  # grid axis 1 limit
        lpt = 0
    grid = (B * H, nq) if lpt == 1 else (nq, B * H)

    def run(tma: int, ws: bool):
        rows = [_rows_view(t, head) for t in (q, k, v)] if tma else [None]
        if any(r is None for r in rows):  # layout a descriptor cannot address: pointer loads
            tma, rows = 0, [0, 0, 0]
        descs = (dummy, dummy, dummy)
        if tma == 2:
            from triton.tools.tensor_descriptor import TensorDescriptor

            descs = tuple(TensorDescriptor(t, [r, head], [t.stride(2), 1], [b_, head])
                          for t, r, b_ in zip((q, k, v), rows, (bm, bn, bn)))
        elif tma == 1 and not interpreted:
            _device_descriptor_allocator()
        global LAST_COMPILED
        LAST_COMPILED = kern[grid](q, k, v, mask if mask is not None else q, out, *descs, scale,
                   *q.stride(), *k.stride(), *v.stride(), *_mask_strides(mask), *out.stride(),
                   H, HKV, LQ, LK, D, sink, window, *(rows if tma == 1 else (0, 0, 0)), fc, fi, pc, pi, maxb,
                   CAUSAL=causal, HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
                   USE_LAYOUT=use_layout, OUT_BF16=out.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
                   D_CONST=D, TMA=tma, LPT=lpt, WS=ws, PIPE=pipe, SCALE_POS=scale > 0, INTERPRETED=interpreted, **cfg)

    if not (tma or ws) or STRICT:
        run(tma, ws)
        return out
    try:
        run(tma, ws)
    except Exception as e:  # noqa: BLE001 — a Triton without TMA / warp specialization for this kernel
        _FAILED.add(key)
        warnings.warn(f"attention TMA={tma} WS={ws} failed ({type(e).__name__}: {str(e)[:200]}); "
                      "using pointer loads", stacklevel=2)
        run(0, False)
    return out


def _kernel(device_type: str, cache_dir: str | None = None):
    from fxforge.config import cache_dir as env_cache_dir

    return template_kernels(str(TEMPLATE), ("fxf_attention",), device_type, cache_dir or env_cache_dir(), "fxf_attention")[0]


def attention(q, k, v, mask=None, *, causal: bool = False, scale: float | None = None, sink: int = 0, window: int = 0,
              layout=None, blocks: dict | None = None):
    """Direct call of the attention template (same semantics as SDPA with top-left causal
    alignment, plus an optional sink + sliding-window restriction)."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return launch(_kernel(q.device.type), q, k, v, mask, out, scale, causal, sink, window, layout, blocks)
