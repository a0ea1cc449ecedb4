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
from .kernels import (
    first_that_fits,
    interpreter_active,
    next_pow2,
    pdl_capable,
    template_kernels,
)

TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "kivi_attention.py"
NAME = "fxf_kivi_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["check_inputs", "kivi_configs", "kivi_decode_attention", "kivi_traffic_bytes", "launch"]


# (q dtype, bits, Tq, Hq, Hkv, D, group, device index) -> {"index": config used, "failed": cfg, "error": str}
FALLBACKS: dict = {}


def _kernels(device_type: str, cache_dir: str | None = None):
    """(split kernel, combine kernel) for ``device_type``; the combine kernel is decode_attention's."""
    from fxforge.config import cache_dir as env_cache_dir

    cache = cache_dir or env_cache_dir()
    return template_kernels(str(TEMPLATE), (f"{NAME}_split",), device_type, cache, NAME)[0], da._kernels(device_type, cache)[1]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fast_path(d: int, bits: int, group: int, v_group: int) -> dict | None:
    """The template's FAST path parameters (W = channels per value chunk, NACC = D / W accumulators) when
    the cache shape allows it, else None (the GENERAL per-element path): D a power of two with D / per ≥ 16
    bytes per token, G a power of two in [16, 128] (one key group per tile), W = min(D / per, Gv) a power
    of two ≥ 16 lying inside one value group, at most 4 chunks."""
    dp = d // (8 // bits)
    w = min(dp, v_group)
    if not (_pow2(d) and dp >= 16 and _pow2(group) and 16 <= group <= 128 and _pow2(w) and w >= 16
            and dp % w == 0 and v_group % w == 0 and d // w <= 4):
        return None
    return {"W": w, "NACC": d // w}


def kivi_configs(tq: int, hq: int, hkv: int, d: int, group: int, interpreted: bool, bits: int = 2,
                 v_group: int | None = None, elt: int = 2) -> list[dict]:
    """Launch configs to try (the first is the default): BLOCK_M, BLOCK_N, HEAD_DIM, FAST and, on CUDA,
    num_warps / num_stages. FAST (see fast_path): BLOCK_N = G, one key group per tile. GENERAL: BLOCK_N a
    multiple of 16 (64 on CUDA; tiles gathered per element). ``elt``: bytes per element of q (4: float32,
    whose dots are exact-fp32 FMA loops, not tensor-core mma)."""
    head = max(16, next_pow2(d))
    bm = da.block_m(tq, hq, hkv)
    fast = fast_path(d, bits, group, group if v_group is None else v_group) is not None and head == d
    if head >= 256:  # keep the fp32 accumulator and the dequantized tiles within registers
        bm = min(bm, 64)
    if elt == 4 and not interpreted:
        # float32 q: ieee dots are unrolled into per-thread FMA sequences, BLOCK_M·BLOCK_N·HEAD_DIM of them
        # per dot. Session 16: at 64 rows x 64 tokens x 256 channels (Tq 16, GQA 8) Triton 3.6's sm_90
        # compile ran past 8 minutes on the H100 (test_all_configs_on_cuda); 16 rows compile in 17 s.
        bm = 16
    if interpreted:  # tiny blocks: the interpreter's cost is per element; small tests still see several blocks
        return [{"BLOCK_M": bm, "BLOCK_N": group if fast else 16, "HEAD_DIM": head, "FAST": fast}]
    # H100, 32K, bf16 (results/probe_kivi.md, second sweep): fewer warps win, since each thread's mma
    # fragments then hold more tokens per channel and its scale conversions serve more elements: 2-bit
    # 2 warps / 3 stages / 64 splits 46.7 us, 4-bit 1 warp / 2 stages / 128 splits 42.6 us (4 warps: 58-62)
    # Session 10 (results/probe_kivi_occupancy.md; ncu: the 2-bit default ran 1.9 warps per scheduler at 45%
    # issue): at D = 128, 2-bit, 2 warps / 2 stages capped at 128 registers (8 programs per SM, 128 splits)
    # 41.6 us vs 44.3 for the uncapped 3-stage default (small spills, outside the hot path mostly).
    # Session 14 (results/probe_kivi_packed.md): PACKED (planes decoded by inline PTX in 16-bit pairs, same
    # output bits) 2-bit 41.9 -> 38.9 us, 4-bit 42.1 -> 39.3 (SDPA 51.9): on for every FAST config (the
    # kernel ignores it for fp32 q, K_FOLD / V_FOLD and the interpreter).
    # Session 15 (results/probe_kivi_vsword.md): VS_WORD (a token's 4 value scales / mins as one int64 each,
    # same output bits) 2-bit 33.7 -> 29.2 us, 4-bit 33.9 -> 28.9 (SDPA 50.4): on for every FAST config (the
    # launch drops it unless 2-byte scales and 4 value groups per token, see _vs_word_ok).
    # Session 15 (results/probe_kivi_ksword.md): KS_WORD (a plane's key scales / mins as int32 channel pairs:
    # 4-byte cp.async loads for one-warp programs instead of 2-byte plain loads the loop waited on; ncu:
    # long-scoreboard stalls 4.1 -> 0.7 per instruction) made 2-bit D = 128 on one warp without a register
    # cap (1212 loop instructions per tile against 2 x 794 for 2 warps) the fastest: 29.4 -> 25.8 us (2.0x
    # SDPA 51.6); 4-bit even (29.1-30.5 vs 29.2-29.3). On for every FAST config (dropped where _ks_word_ok
    # says no: scale dtype / layout / alignment, and shapes the GPU code got wrong). Its outputs can differ from 2-byte loads by 1 ulp in a few
    # elements on the GPU (4-bit: 1 of 4096): the compiler's fma contraction of m + MID·s follows the layout.
    # Session 16 (results/probe_kivi_vpairs.md, A B A B): V_PAIRS (the value fma as fma.rn.{bf16,f16}x2 on the
    # token pairs the mma takes, no re-pairing PRMTs) 2-bit 26.2 / 26.5 -> 25.7 / 25.8 us, 4-bit 29.7 / 29.4 ->
    # 28.6 / 28.4 (SDPA 52.0), same output bits there: on for every FAST config (the kernel uses it only
    # with PACK; elsewhere it may differ from the contracted plain expression by a rounding).
    if fast:
        first = (group, 2, 3, False, 0) if bits == 2 else (group, 1, 2, False, 0)
        cands = [first, (group, 1, 2, False, 0), (group, 2, 3, False, 0), (group, 4, 2, False, 0),
                 (group, 4, 3, True, 0)]
        if bits == 2 and d == 128:
            cands.insert(0, (group, 2, 2, False, 128))
            cands.insert(0, (group, 1, 2, False, 0))
    else:
        cands = [(64 if head < 256 else 32, 4, 2, False, 0), (32, 4, 2, False, 0)]
    out = []
    for bn, w, st, vf, regs in cands:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": head, "FAST": fast, "num_warps": w, "num_stages": st}
        if fast:
            cfg.update(K_FOLD=False, V_FOLD=vf, PACKED=True, VS_WORD=True, KS_WORD=True, V_PAIRS=True)
        if regs:
            cfg["maxnreg"] = regs
        if cfg not in out:
            out.append(cfg)
    if fast:  # the GENERAL path stays a candidate (autotuning, OutOfResources fallback)
        out.append({"BLOCK_M": bm, "BLOCK_N": 64, "HEAD_DIM": head, "FAST": False, "num_warps": 4, "num_stages": 2})
    return out


PROGRAMS_PER_SM = {1: 8, 2: 4, 4: 4, 8: 2}  # by num_warps; H100 FAST path (probe_kivi), B=1, Hkv=8, 32K:
# 1 warp: 128 splits best (64: 1.3-1.6x slower, 256: 1.1x); 2 and 4 warps: 64 splits best
MIN_SPLIT_TOKENS = 128  # 1-warp programs: 128 splits of 256 tokens at 32K


def auto_splits(n_quant: int, programs: int, block_n: int, device, num_warps: int = 4, maxnreg: int | None = None) -> int:
    """Splits of the quantized tokens on CUDA: about PROGRAMS_PER_SM programs per SM (with a register cap:
    as many as the register file holds, 65536 / (32·warps·maxnreg)), each split at least MIN_SPLIT_TOKENS
    tokens, a power of two (B=1, Hkv=8, 32K on 132 SMs: 64 splits of 512 tokens for 2-4 warps, 128 of 256
    for 1 warp or for 2 warps capped at 128 registers)."""
    sms = da.sm_count(device)
    per_sm = 65536 // (32 * num_warps * maxnreg) if maxnreg else PROGRAMS_PER_SM.get(num_warps, 2)
    want = -(-per_sm * sms // max(programs, 1))
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


def check_inputs(q, cache, out=None, lengths=None) -> None:
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
    _expect("k_codes", cache.k_codes, (b, hkv, nq, d // per), (torch.uint8,), dev)
    _expect("v_codes", cache.v_codes, (b, hkv, nq, d // per), (torch.uint8,), dev)
    for name in ("k_scale", "k_min"):
        _expect(name, getattr(cache, name), (b, hkv, nq // g, d), _SCALE_DTYPES, dev)
    for name in ("v_scale", "v_min"):
        _expect(name, getattr(cache, name), (b, hkv, nq, d // gv), _SCALE_DTYPES, dev)
    for name in ("k_residual", "v_residual"):
        _expect(name, getattr(cache, name), (b, hkv, s - nq, d), _DTYPES, dev)
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kivi_decode_attention: lengths must be an int32/int64 tensor of shape ({B},), got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
        if lengths.device != dev:
            raise ValueError(f"kivi_decode_attention: lengths on {lengths.device}, q on {dev}")
        if s - nq < cache.residual + g - 1:
            raise ValueError(f"kivi_decode_attention: with lengths, the residual ring ({s - nq} slots) must hold "
                             f"residual + group - 1 = {cache.residual + g - 1} tokens")
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"kivi_decode_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")


def _pair_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and min share one set of strides in the kernel."""
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _vs_word_ok(vs: torch.Tensor, vm: torch.Tensor, d: int, v_group: int) -> bool:
    """VS_WORD (a token's value scales / mins read as one int64 each) needs 2-byte scales, exactly 4 value
    groups per token stored contiguously and every token's 8 bytes 8-byte aligned."""
    return (vs.element_size() == 2 and vm.dtype == vs.dtype and d // v_group == 4 and vs.stride(3) == 1
            and all(st % 4 == 0 for st in vs.stride()[:3])
            and vs.data_ptr() % 8 == 0 and vm.data_ptr() % 8 == 0)


def _ks_word_ok(ks: torch.Tensor, km: torch.Tensor, d: int, bits: int, num_warps: int = 4) -> bool:
    """KS_WORD (a plane's key scales / mins read as int32 pairs of channels) needs 2-byte scales (mins of the
    same dtype), channels contiguous, every plane's first channel 4-byte aligned (even strides), at least 32
    channels per plane and at most 4 threads per word: with 8 words (2-bit, D = 64) on two warps (8 threads a
    word) triton 3.6's GPU code was wrong (GPU test test_packed_plane_decode_is_bit_identical, session 15;
    the interpreter was right), while 16 / 32 words on 1-2 warps passed, so only those shapes take it."""
    words = d // (8 // bits) // 2
    return (ks.element_size() == 2 and km.dtype == ks.dtype and ks.stride(3) == 1
            and all(st % 2 == 0 for st in ks.stride()[:3]) and words >= 16 and 4 * words >= 32 * num_warps
            and ks.data_ptr() % 4 == 0 and km.data_ptr() % 4 == 0)


def _interpreted(q) -> bool:
    return q.device.type == "cpu"


def launch(kern1, kern2, q, cache: KIVICache, out, scale: float, num_splits: int | None = None,
           blocks: dict | None = None, workspace: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
    """Run split + combine: q [B,Hq,Tq,D] (any strides), ``cache`` as produced by kivi_quantize (any
    strides), ``out`` [B,Hq,Tq,D] written in place and returned. The quantized tokens are cut into
    chunks (``num_splits`` None: automatic, see decode_attention.split_plan); the last chunk's program
    also reads the residual window. ``workspace``: optional flat fp32 tensor of at least
    decode_attention.workspace_numel(...) elements (allocated here when None). ``lengths``: see
    kivi_decode_attention (the cache's tensors are then capacity buffers, the residual a ring)."""
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
        cands = kivi_configs(LQ, H, HKV, D, cache.group, interpreted, cache.bits, cache.v_group, q.element_size())
        key = (q.dtype, cache.bits, LQ, H, HKV, D, cache.group, cache.v_group, q.device.index)
        return first_that_fits(FALLBACKS, key, cands, lambda cfg: launch(kern1, kern2, q, cache, out, scale,
                                                                         num_splits, cfg, workspace, lengths),
                               "kivi_decode_attention")
    cfg = dict(blocks or kivi_configs(LQ, H, HKV, D, cache.group, interpreted, cache.bits, cache.v_group,
                                      q.element_size())[0])
    if interpreted:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None), cfg.pop("maxnreg", None)
    bm, head = cfg["BLOCK_M"], cfg["HEAD_DIM"]
    fp = fast_path(D, cache.bits, cache.group, cache.v_group) if head == D else None
    fast = bool(cfg.pop("FAST", True)) and fp is not None
    if fast:
        cfg["BLOCK_N"] = cache.group
    else:  # options of the FAST path only
        for key in ("K_FOLD", "V_FOLD", "VS_WORD", "KS_WORD", "V_PAIRS"):
            cfg.pop(key, None)
    if interpreter_active() and not interpreted:  # CUDA tensors under TRITON_INTERPRET=1: no inline PTX there
        cfg["PACKED"] = False
    cfg.pop("PDL", None)  # set below, from the device
    w, nacc = (fp["W"], fp["NACC"]) if fast else (head, 1)
    row_tiles = -(-((H // HKV) * LQ) // bm)
    bn = cfg["BLOCK_N"]
    if num_splits is None and not interpreted and NQ:
        num_splits = auto_splits(NQ, B * HKV * row_tiles, bn, q.device, cfg.get("num_warps", 4), cfg.get("maxnreg"))
    splits, chunk = da.split_plan(NQ, B * HKV * row_tiles, bn, q.device, num_splits) if NQ else (1, bn)
    acc_ws, ml_ws = da.split_workspace(workspace, B, H, LQ, D, splits, out, "kivi_decode_attention")
    ks, km = _pair_strides(cache.k_scale, cache.k_min)
    vs, vm = _pair_strides(cache.v_scale, cache.v_min)
    if cfg.get("VS_WORD") and not _vs_word_ok(vs, vm, D, cache.v_group):
        cfg["VS_WORD"] = False  # the template's 2-byte loads per group instead
    # (threads per word matter only to the GPU code: the interpreter counts as one warp)
    if cfg.get("KS_WORD") and not _ks_word_ok(ks, km, D, cache.bits, 1 if interpreted else cfg.get("num_warps", 4)):
        cfg["KS_WORD"] = False
    kc, vc, kr, vr = cache.k_codes, cache.v_codes, cache.k_residual, cache.v_residual
    out_bf16 = out.dtype == torch.bfloat16
    dot = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[q.dtype]
    lens = lengths if lengths is not None else out  # any pointer: unread without HAS_LENS
    pdl = da.COMBINE_PDL and splits > 1 and pdl_capable(q.device)  # combine launched early (off: no gain)
    kern1[(splits, B * HKV, row_tiles)](
        q, kc, ks, km, vc, vs, vm, kr, vr, out, acc_ws, ml_ws, lens, scale,
        *q.stride(), *kc.stride(), *ks.stride(), *vc.stride(), *vs.stride(), *kr.stride(), *vr.stride(),
        *out.stride(), H, HKV, LQ, NQ, NR, cache.residual, max(NR, 1), chunk, splits,
        BITS=cache.bits, G=cache.group, GV=cache.v_group, D=D, BLOCK_R=16 if interpreted else 32, FAST=fast,
        W=w, NACC=nacc, SINGLE=splits == 1, OUT_BF16=out_bf16, DOT=dot, HAS_LENS=lengths is not None,
        INTERPRETED=interpreted, PDL=pdl, **cfg)
    if splits > 1:
        da.launch_combine(kern2, acc_ws, ml_ws, out, splits, head, interpreted, pdl)
    return out


def kivi_decode_attention(q, cache: KIVICache, *, scale: float | None = None, num_splits: int | None = None,
                          out: torch.Tensor | None = None, blocks: dict | None = None,
                          lengths: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA (enable_gqa=True, not causal) of q [B, Hq, Tq, D] (fp16/bf16/fp32; meant for Tq ≤ 16) against a
    KIVI cache of [B, Hkv, S, D] (Hq a multiple of Hkv, D ≤ 256), reading the 2/4-bit codes directly.
    ``scale`` defaults to 1/sqrt(D); ``num_splits`` None chooses automatically (it counts chunks of the
    quantized tokens; the residual window rides with the last one). Returns out in q's dtype.

    ``lengths`` (int32/int64 [B] on q's device; for CUDA graphs of a growing cache): tokens cached per
    batch row, read by the kernel. The cache's tensors are then capacity buffers: codes/scales for
    ``cache.n_quant`` (a multiple of the group) tokens, of which row b uses the first
    ``group·floor((lengths[b] - residual) / group)`` (0 when lengths[b] ≤ residual), and a residual ring of
    ``seq_len - n_quant`` (≥ residual + group - 1) slots holding token t at slot t % that. The caller keeps
    lengths within capacity (not checked on the device)."""
    check_inputs(q, cache, out, lengths)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"kivi_decode_attention: num_splits must be ≥ 1, got {num_splits}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    k1, k2 = _kernels(q.device.type)
    return launch(k1, k2, q, cache, out, scale, num_splits, blocks, lengths=lengths)
