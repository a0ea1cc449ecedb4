"""Split-KV decode attention over a KIVI-quantized KV cache (``passes/quant/kv.py``), decoding the 2/4-bit
codes in registers: ``kivi_decode_attention(q, cache)`` is the direct entry point, ``launch(...)`` the
lower-level call (kernels, launch config and workspace chosen by the caller).

Semantics: ``F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)`` (not causal, no
mask) with ``k, v = kivi_dequantize(cache)``; the quantized tokens are dequantized in float32 exactly as
``kivi_dequantize`` does (code·scale + min), the residual window is read as stored. The kernel design
and the bytes model are in ``codegen/templates/kivi_attention.py``; the combine kernel and the split
planner are shared with ``runtime/decode_attention.py``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..passes.quant.kv import KIVICache, kivi_bytes_per_token
from . import decode_attention as da
from .kernels import first_that_fits, next_pow2, template_kernels

TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "kivi_attention.py"
NAME = "fxf_kivi_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["check_inputs", "kivi_configs", "kivi_decode_attention", "kivi_traffic_bytes", "launch"]


# (q dtype, bits, Tq, Hq, Hkv, D, group, device index) -> {"index": config used, "failed": cfg, "error": str}
FALLBACKS: dict = {}


def _kernels(device_type: str, cache_dir: str | None = None):
    """(split kernel, combine kernel) for ``device_type``; the combine kernel is decode_attention's."""
    from fxforge.config import current

    cache = cache_dir or current().cache_dir
    return template_kernels(str(TEMPLATE), (f"{NAME}_split",), device_type, cache, NAME)[0], da._kernels(device_type, cache)[1]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kivi_configs(tq: int, hq: int, hkv: int, d: int, group: int, interpreted: bool) -> list[dict]:
    """Launch configs to try (the first is the default): BLOCK_M, BLOCK_N, HEAD_DIM, FOLD_K and, on CUDA,
    num_warps / num_stages. BLOCK_N is a multiple of the key group when that is a power of two (then
    key scales are loaded once per group), ≥ 16 for ``tl.dot``. FOLD_K (BLOCK_N == group): key scales
    folded into q, key mins into one per-row term (the K tile is only decoded codes). The first H100 run
    (BLOCK_N 128, 16 splits: one 4-warp program per SM) was ALU/latency-bound at 0.09-0.16 of HBM, so
    the CUDA list starts with one-group tiles and ``auto_splits`` gives several programs per SM."""
    head = max(16, next_pow2(d))
    bm = da.block_m(tq, hq, hkv)
    g = group if _pow2(group) else 1
    fold = _pow2(group) and group >= 16
    if interpreted:  # tiny blocks: the interpreter's cost is per element; small tests still see several blocks
        return [{"BLOCK_M": bm, "BLOCK_N": max(16, g), "HEAD_DIM": head, "FOLD_K": fold}]
    if head >= 256:  # keep the fp32 accumulator and the decoded [HEAD_DIM, BLOCK_N] K tile within registers
        bm = min(bm, 64)
    out = []
    # Compiled for sm_90 on the CPU (Triton 3.9 + its ptxas; the H100 runs 3.6, so indicative only), head
    # dim 128, bf16: every 4-warp config spills (255 registers + 184-992 B of stack), 8 warps with one-group
    # tiles do not; fp32 q (IEEE FMA dots) with BLOCK_N 128 needs 272 KB of shared memory (> the H100's
    # 227 KB: a candidate cause of the fp32 S=4099 GPU test failure), BLOCK_N 32 needs 74 KB
    # H100 run (benchmarks/results/probe_quant.md, 32K, bf16): 64-token tiles, no folding, 8 warps won
    # (74 us KIVI-2 / 76 us KIVI-4 at 32 splits); one-group folded tiles were 2x slower with 8 warps
    # second H100 probe (32K, 2-bit / 4-bit): 64-token tiles at 4 warps 71.7 / 70.8 us, at 8 warps 74.7 / 76.5
    cands = [(64, 4, 3, False), (64, 8, 3, False), (g, 4, 3, True), (128, 4, 3, False)]
    for bn, w, st, fk in cands:
        bn = max(min(bn, 64) if head >= 256 else bn, g, 16)
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": head, "FOLD_K": fk and fold and bn == group,
               "num_warps": w, "num_stages": st}
        if cfg not in out:
            out.append(cfg)
    return out


PROGRAMS_PER_SM = 2  # H100: 32 splits (B=1, Hkv=8) beat 64 (auto at 4 per SM) and 128 by 5-15%
MIN_SPLIT_TOKENS = 256


def auto_splits(n_quant: int, programs: int, block_n: int, device) -> int:
    """Splits of the quantized tokens on CUDA: about PROGRAMS_PER_SM programs per SM, each split at least
    MIN_SPLIT_TOKENS tokens (B=1, Hkv=8, 32K: 64 splits of 512 tokens)."""
    sms = da.sm_count(device)
    want = -(-PROGRAMS_PER_SM * sms // max(programs, 1))
    cap = max(1, n_quant // max(MIN_SPLIT_TOKENS, block_n))
    ns = max(1, min(want, cap))
    return 1 << (ns.bit_length() - 1) if ns > 1 else 1  # a power of two: equal chunks of a power-of-two cache


def kivi_traffic_bytes(cache: KIVICache, hq: int, tq: int, q_elt: int = 2, splits: int = 1) -> int:
    """HBM bytes one call moves by the template's bytes model: codes + scales/mins + residual window
    + q and out + the split workspace (written and read once)."""
    b, hkv, s, d = cache.shape
    sb = cache.k_scale.element_size()
    quant = b * hkv * cache.n_quant * kivi_bytes_per_token(cache.bits, d, cache.group, cache.v_group, sb)
    resid = 2 * b * hkv * (s - cache.n_quant) * d * cache.k_residual.element_size()
    ws = 2 * da.workspace_numel(b, hq, tq, d, splits) * 4
    return int(quant + resid + 2 * b * hq * tq * d * q_elt + ws)


def _expect(name: str, t, shape: tuple, dtypes: tuple, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"kivi_decode_attention: cache.{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"kivi_decode_attention: cache.{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"kivi_decode_attention: cache.{name} dtype {t.dtype} not supported ({dtypes})")
    if t.device != device:
        raise ValueError(f"kivi_decode_attention: cache.{name} on {t.device}, q on {device}")


def check_inputs(q, cache, out=None) -> None:
    """ValueError with a clear message for anything the kernels cannot run."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"kivi_decode_attention: q must be 4-D [B, Hq, Tq, D], got {getattr(q, 'shape', q)!r}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"kivi_decode_attention: q dtype {q.dtype} not supported (float16, bfloat16, float32)")
    if not isinstance(cache, KIVICache):
        raise ValueError(f"kivi_decode_attention: cache must be a KIVICache, got {type(cache).__name__}")
    if cache.bits not in (2, 4):
        raise ValueError(f"kivi_decode_attention: cache.bits must be 2 or 4, got {cache.bits}")
    B, H, _, D = q.shape
    if cache.k_residual.dim() != 4:
        raise ValueError("kivi_decode_attention: cache.k_residual must be 4-D [B, Hkv, S - n_quant, D]")
    b, hkv, s, d = cache.shape
    if b != B:
        raise ValueError(f"kivi_decode_attention: batch of q ({B}) and the cache ({b}) differ")
    if d != D:
        raise ValueError(f"kivi_decode_attention: head dim of q ({D}) and the cache ({d}) differ")
    if D < 1 or D > 256:
        raise ValueError(f"kivi_decode_attention: head dim {D} not supported (1..256)")
    if hkv < 1 or H % hkv:
        raise ValueError(f"kivi_decode_attention: query heads ({H}) must be a multiple of key/value heads ({hkv})")
    per, g, gv, nq = 8 // cache.bits, cache.group, cache.v_group, cache.n_quant
    if g <= 0 or g % per or gv <= 0 or gv % per or D % gv:
        raise ValueError(f"kivi_decode_attention: group ({g}) and v_group ({gv}) must be positive multiples of "
                         f"{per}, v_group dividing head dim {D}")
    if nq < 0 or nq % g or nq > s:
        raise ValueError(f"kivi_decode_attention: n_quant ({nq}) must be a multiple of group ({g}) within seq_len ({s})")
    dev = q.device
    _expect("k_codes", cache.k_codes, (b, hkv, d, nq // per), (torch.uint8,), dev)
    _expect("v_codes", cache.v_codes, (b, hkv, nq, d // per), (torch.uint8,), dev)
    for name in ("k_scale", "k_min"):
        _expect(name, getattr(cache, name), (b, hkv, d, nq // g), _SCALE_DTYPES, dev)
    for name in ("v_scale", "v_min"):
        _expect(name, getattr(cache, name), (b, hkv, nq, d // gv), _SCALE_DTYPES, dev)
    for name in ("k_residual", "v_residual"):
        _expect(name, getattr(cache, name), (b, hkv, s - nq, d), _DTYPES, dev)
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"kivi_decode_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")


def _pair_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and min share one set of strides in the kernel."""
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _interpreted(q) -> bool:
    return q.device.type == "cpu"


def launch(kern1, kern2, q, cache: KIVICache, out, scale: float, num_splits: int | None = None,
           blocks: dict | None = None, workspace: torch.Tensor | None = None):
    """Run split + combine: q [B,Hq,Tq,D] (any strides), ``cache`` as produced by kivi_quantize (any
    strides), ``out`` [B,Hq,Tq,D] written in place and returned. The quantized tokens are cut into
    chunks (``num_splits`` None: automatic, see decode_attention.split_plan); the last chunk's program
    also reads the residual window. ``workspace``: optional flat fp32 tensor of at least
    decode_attention.workspace_numel(...) elements (allocated here when None)."""
    interpreted = _interpreted(q)
    B, H, LQ, D = q.shape
    _, HKV, S, _ = cache.shape
    NQ, NR = cache.n_quant, S - cache.n_quant
    if out.numel() == 0:
        return out
    if S == 0:  # no keys: every row sees nothing
        return out.zero_()
    if blocks is None and not interpreted:
        # the default config, falling back to the next on OutOfResources (e.g. shared memory of fp32
        # dots at large tiles); the fallback is recorded in FALLBACKS and warned about once
        cands = kivi_configs(LQ, H, HKV, D, cache.group, interpreted)
        key = (q.dtype, cache.bits, LQ, H, HKV, D, cache.group, q.device.index)
        return first_that_fits(FALLBACKS, key, cands, lambda cfg: launch(kern1, kern2, q, cache, out, scale,
                                                                         num_splits, cfg, workspace),
                               "kivi_decode_attention")
    cfg = dict(blocks or kivi_configs(LQ, H, HKV, D, cache.group, interpreted)[0])
    if interpreted:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    bm, bn, head = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["HEAD_DIM"]
    k_bcast = _pow2(cache.group) and bn % cache.group == 0
    v_bcast = _pow2(cache.v_group) and cache.v_group <= head
    fold = bool(cfg.pop("FOLD_K", False)) and bn == cache.group and k_bcast
    # K_MAGIC (bf16 q, folded keys): codes -> bf16 from their bits, offset removed per row (template)
    k_magic = bool(cfg.pop("K_MAGIC", True)) and fold and q.dtype == torch.bfloat16
    v_tf32 = bool(cfg.pop("V_TF32", False)) and q.dtype != torch.float32  # P @ V as a TF32 dot (template)
    row_tiles = -(-((H // HKV) * LQ) // bm)
    if num_splits is None and not interpreted and NQ:
        num_splits = auto_splits(NQ, B * HKV * row_tiles, bn, q.device)
    splits, chunk = da.split_plan(NQ, B * HKV * row_tiles, bn, q.device, num_splits) if NQ else (1, bn)
    acc_ws, ml_ws = da.split_workspace(workspace, B, H, LQ, D, splits, out, "kivi_decode_attention")
    ks, km = _pair_strides(cache.k_scale, cache.k_min)
    vs, vm = _pair_strides(cache.v_scale, cache.v_min)
    kc, vc, kr, vr = cache.k_codes, cache.v_codes, cache.k_residual, cache.v_residual
    out_bf16 = out.dtype == torch.bfloat16
    kern1[(splits, B * HKV, row_tiles)](
        q, kc, ks, km, vc, vs, vm, kr, vr, out, acc_ws, ml_ws, scale,
        *q.stride(), *kc.stride(), *ks.stride(), *vc.stride(), *vs.stride(), *kr.stride(), *vr.stride(),
        *out.stride(), H, HKV, LQ, NQ, NR, D, chunk, splits,
        BITS=cache.bits, G=cache.group, GV=cache.v_group, K_BCAST=k_bcast, V_BCAST=v_bcast, SINGLE=splits == 1,
        OUT_BF16=out_bf16, IEEE=q.dtype == torch.float32, D_CONST=D, INTERPRETED=interpreted, FOLD_K=fold,
        K_MAGIC=k_magic, V_TF32=v_tf32, **cfg)
    if splits > 1:
        kw = {} if interpreted else {"num_warps": 4 if head >= 128 else 2}
        kern2[(B * H * LQ,)](acc_ws, ml_ws, out, *out.stride(), H, LQ, D, splits,
                             BLOCK_S=min(next_pow2(splits), da.COMBINE_BLOCK_S), HEAD_DIM=head,
                             OUT_BF16=out_bf16, INTERPRETED=interpreted, **kw)
    return out


def kivi_decode_attention(q, cache: KIVICache, *, scale: float | None = None, num_splits: int | None = None,
                          out: torch.Tensor | None = None, blocks: dict | None = None) -> torch.Tensor:
    """SDPA (enable_gqa=True, not causal) of q [B, Hq, Tq, D] (fp16/bf16/fp32; meant for Tq ≤ 16) against a
    KIVI cache of [B, Hkv, S, D] (Hq a multiple of Hkv, D ≤ 256), reading the 2/4-bit codes directly.
    ``scale`` defaults to 1/sqrt(D); ``num_splits`` None chooses automatically (it counts chunks of the
    quantized tokens; the residual window rides with the last one). Returns out in q's dtype."""
    check_inputs(q, cache, out)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"kivi_decode_attention: num_splits must be ≥ 1, got {num_splits}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    k1, k2 = _kernels(q.device.type)
    return launch(k1, k2, q, cache, out, scale, num_splits, blocks)
