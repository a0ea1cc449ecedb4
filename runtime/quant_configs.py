"""Launch configs of the weight-only quantized linear (runtime/quant_linear.py): the template's constexprs per
format (``kernel_format``), the GEMV / GEMM config lists, default first (``gemv_configs`` / ``gemm_configs``),
and the automatic K-split counts. quant_linear re-exports all of them."""
from __future__ import annotations

import functools

import torch

from . import quant_gemm_gluon, quant_gemv_mma, quant_gemv_tma
from .kernels import cuda_sm_count, device_index, next_pow2

CPU_SMS = 4  # stand-in SM count for the interpreter (split-K heuristics see a tiny GPU)
WORDS_ROW_GW = 16  # WORDS GEMV, per-row formats: words per inner tile row (BLOCK_G of them per step)

# Element / scale kinds of the template (see its header).
_ELEM = {"int8": 0, "mxint8": 0, "uint4": 1, "int4": 2, "fp4_e2m1": 3, "fp8_e4m3": 4}
_SCALE = {"bf16": 0, "fp32": 0, "e8m0": 1, "e4m3": 2}


@functools.lru_cache(maxsize=64)
def kernel_format(fmt) -> dict:
    """The template's constexprs for a format (a FORMATS name or QuantFormat): element / scale kind,
    per-row or grouped scales, zero points, tensor scale, element step, elements per byte (EPB) and the
    group in byte columns (GB)."""
    from fxforge.passes.quant.formats import get_format

    f = get_format(fmt)
    epb = 2 if f.bits == 4 else 1
    return {"ELEM": _ELEM[f.elem], "SCALE": _SCALE[f.scale], "PER_ROW": f.block is None, "HAS_ZERO": f.zero_point,
            "HAS_TS": f.tensor_scale, "STEP": f.spec.step, "EPB": epb, "GB": (f.block or 2) // epb}


# ---------------------------------------------------------------------------------------------- configs
# the tensor-core GEMV's default range (measured at K = 2048 / 4096 and N = 4096 .. 32000; slower at K = 14336)
MMA_MAX_K = 4096
MMA_MIN_N = 12288  # at M = 1 (8192 rows: even with the words GEMV); from 8192 rows at M = 2..4


def gemv_configs(M: int, N: int, K: int, fmt, interpreted: bool) -> list[dict]:
    """GEMV launch configs, default first: BLOCK_M (rows of x per program, next_pow2(M)), BLOCK_N (weight
    rows), BLOCK_KB (code bytes per row per step), POST (grouped formats: scale per group after the
    partial dot), PREFETCH and, on the GPU, num_warps / num_stages. M <= 4
    on the GPU: WORDS configs first (``dequant_gemv_words``: int32 words of codes, mask decode for integer
    codes, BLOCK_G scale groups of codes per row per step, PREFETCH_X, XT, WAIT), a TMA config for w8a16 below
    8192 rows second (quant_gemv_tma.py), the tensor-core GEMV first for w4a16 g128 from MMA_MIN_N rows (8192 at
    M >= 2) and K <= MMA_MAX_K (quant_gemv_mma.py); the byte-tile kernel's configs follow (its H100 winners of
    benchmarks/results/probe_quant.md: 8-bit 8 x 1024 bytes, 4-bit 8 x 256 bytes)."""
    kf = kernel_format(fmt)
    bm = next_pow2(max(M, 1))
    if interpreted:  # the interpreter's cost is per program and per op: few, small-but-not-tiny programs
        return [{"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_KB": 32}]
    shrink = max(1, bm // 4)  # keep the [BLOCK_M, BLOCK_N, BLOCK_KB] product in registers for M > 4
    out = []
    if kf["EPB"] == 1:  # (BLOCK_N, BLOCK_KB, warps, stages, POST, PREFETCH)
        cands = [(8, 1024, 4, 1, True, False), (16, 512, 4, 1, True, False), (4, 1024, 4, 1, True, False),
                 (8, 2048, 8, 1, True, False)]
    else:
        cands = [(8, 256, 4, 1, False, True), (8, 256, 4, 1, False, False), (8, 512, 4, 1, False, True)]
    for bn, kb, w, st, post, pf in cands:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KB": max(kb // shrink, 16), "POST": post, "PREFETCH": pf,
               "num_warps": w, "num_stages": st}
        if cfg not in out:
            out.append(cfg)
    if M <= 4:  # words: (BLOCK_N, bytes of codes per row per step, warps, PREFETCH_X)
        # H100 probes of the [group, row, word] tile kernel (benchmarks/results/probe_gemv_words_r5.md, _r6.md,
        # M = 1, bf16 cuBLAS 15.6 / 41.7 us): with x and the group scales prefetched with the next step's words
        # (PREFETCH_X, 5-15% faster everywhere) 16 rows x 256 B won every format at 14336 rows (w4a16 17.6,
        # w8a16 22.8-23.1 us), 16 x 512 B the 4-bit formats at 4096^2 (w4a16 7.2 us), 16 x 1024 B over 8 warps
        # the 8-bit ones (w8a16 9.0 us). Deeper prefetch (2), the cp.async loop pipeline (tl.range stages; since removed) and
        # 32-row tiles did not win anywhere by more than the ~3% run-to-run spread.
        # WAIT (sm_90+, else ignored): launched with programmatic dependent launch, the first step's code words
        # loaded before griddepcontrol.wait, i.e. while the kernel before it (the norm, another GEMV) still runs.
        # In a chain of dependent GEMVs in a CUDA graph (benchmarks/results/probe_pdl_chain_sweep.md; bf16 cuBLAS
        # 16.1 / 42.2 us) the winners moved to larger first steps: 4096^2 w4a16 16 x 1024 B 5.72 us (7.14 without
        # WAIT), nvint4 6.38, mxfp4 16 x 512 B 6.72, w8a16 16 x 1024 B on 8 warps 7.74 (the TMA GEMV 8.06 with WAIT,
        # 8.63 without); 14336 rows: 16 x 256 B stays first (w4a16 16.06, w8a16 21.82).
        gb = 4 * WORDS_ROW_GW if kf["PER_ROW"] else kf["GB"]
        if N >= 8192:
            wc = [(16, 256, 4, 1), (16, 512, 4, 1), (8, 512, 4, 1)]
        elif kf["EPB"] == 2:
            wc = [(16, 1024, 4, 1), (16, 512, 4, 1), (16, 512, 8, 1)]
        else:
            wc = [(16, 1024, 8, 1), (8, 1024, 4, 1), (16, 1024, 4, 1)]
        wc += [(16, 256, 4, 0), (8, 512, 4, 0)]
        # XT (x loaded as [word, group, element], its lanes in the codes' order: fewer registers and shared-
        # memory round trips) for integer codes: probe r8 2-5% faster; the fp4 formats were even or slower
        xt = 1 if kf["ELEM"] <= 2 else 0
        words = []
        for bn, kbytes, w, pfx in wc:
            words.append({"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_G": max(kbytes // gb, 1), "WORDS": True, "POST": True,
                          "PREFETCH": 1, "PREFETCH_X": pfx, "XT": xt if pfx else 0, "num_warps": w, "num_stages": 1,
                          "WAIT": True})
        # w8a16 below 8192 rows: the TMA-fed GEMV (quant_gemv_tma.py) second: without PDL it led (probe_gemv_tma_r4.md,
        # 4096^2 8.38-8.44 us vs 8.73-8.88), but its loop pipeliner issues x with the codes, so it cannot fetch codes
        # before the wait (8.06 us with WAIT against the words kernel's 7.74)
        if N < 8192 and quant_gemv_tma.format_ok(kf):
            words.insert(1, dict(quant_gemv_tma.DEFAULT_CONFIG, WAIT=True))
        # w4a16 g128, K <= 4096, from 12288 rows (8192 at M >= 2): the tensor-core GEMV (quant_gemv_mma.py) first.
        # H100, in a CUDA graph (probe_gemv_mma_r10*.md, quant_gpu.md), against the words GEMV in the same run:
        # M = 1: 14336 x 4096 14.25-14.5 us against 16.1, 32000 x 2048 15.7 against 18.7, 8192 x 4096 10.3 against
        # 10.0 (even); M = 4: 14336 rows 40.7 against 55.4, 8192 rows 23.6 against 32.5. Below 8192 rows (4096^2,
        # 5632 x 2048, 2048^2) it was slower; at K = 14336 (4096 rows) its default took 24.3 us against 14.3 (each
        # warp walks 28 groups one after another): the words GEMV stays there.
        if N >= (MMA_MIN_N if M == 1 else 8192) and K <= MMA_MAX_K and quant_gemv_mma.format_ok(kf):
            words.insert(0, dict(quant_gemv_mma.DEFAULT_CONFIG))
        out = words + out
    return out


def gemm_configs(M: int, N: int, K: int, fmt, interpreted: bool) -> list[dict]:
    """Tensor-core launch configs for M > GEMV_MAX_M, default first (tl.dot needs 16+ on every side).
    BLOCK_M covers up to 64 rows, so each weight tile is decoded once per K step for all of them; SPLIT_K
    None: ``auto_split_k_gemm`` (enough programs for the SMs). Small M: a 32-wide plain tile (group scale
    after the partial dot, POST, for per-row / g128 formats; per-element scaling over a 128-element K tile
    for smaller groups), SWAP ("swap AB": the decoded weight tile is wgmma's register A operand, x^T the
    cp.async-pipelined B operand) with 64 / 128-wide tiles. At M = 33..64 with at most 96 64-row tiles the
    defaults are the session-10 H100 winners (results/probe_gemm_m64*.md, quant_gpu.md; bf16 cuBLAS 14.9 us
    at 4096^2): SWAP 64-wide with 4 K splits (nvfp4: 8; nvint4: 64-byte steps, 4 splits), mxint8 SWAP 128-wide on 8
    warps with 4 splits (session 13), mxfp8 the plain 64-wide tile on 8 warps with 4 splits. Before all of them, for
    M <= 64 and the formats it decodes: the Gluon GEMM's config (GLUON, quant_gemm_gluon.py; sm_90 and bf16 x,
    else the next config runs): 1.20-1.34x bf16 at M = 64 where the Triton tiles reached 0.96-1.07x."""
    kf = kernel_format(fmt)
    if interpreted:
        return [{"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 32, "BLOCK_KB": 32, "GROUP_M": 8}]
    bm = 32 if M <= 32 else 64 if M <= 64 else 128
    epb = kf["EPB"]
    post = kf["PER_ROW"] or kf["GB"] >= 64
    if post:
        kb = 128 // epb if kf["PER_ROW"] else min(kf["GB"], 128 // epb)
    else:
        kb = 32 if kf["GB"] < 16 else 128 // epb
    big = M > 256
    base = {"GROUP_M": 8, "POST": post, "SPLIT_K": None}
    if big:
        cands = [dict(base, BLOCK_M=bm, BLOCK_N=128, BLOCK_KB=kb, num_warps=8, num_stages=3),
                 dict(base, BLOCK_M=bm, BLOCK_N=64, BLOCK_KB=kb, num_warps=8, num_stages=3)]
    else:
        if post:
            first = dict(base, BLOCK_M=bm, BLOCK_N=32, BLOCK_KB=kb, num_warps=4, num_stages=3)
        else:
            first = dict(base, BLOCK_M=bm, BLOCK_N=64, BLOCK_KB=kb, num_warps=8, num_stages=3,
                         SPLIT_K=4 if kf["GB"] < 16 else None)
        swap = dict(base, BLOCK_M=bm, BLOCK_KB=kb, num_stages=3, SWAP=True, PREFETCH=False)
        # Second H100 probe (M = 64, 4096^2; bf16 cuBLAS 14.7 us): PREFETCH off won every format but
        # w4a16 g128 (w8a16 17.2, nvint4 20.8, mxint8 21.4, nvfp4 23.6-23.9, mxfp4 25.2 us), where SWAP
        # with 64-wide N tiles won (17.4 us). None reaches bf16 yet.
        cands = [dict(first, PREFETCH=False), first, dict(swap, BLOCK_N=64, num_warps=4),
                 dict(swap, BLOCK_N=128, num_warps=8)]
        if epb == 2 and post:
            cands.insert(0, cands.pop(2))
        if epb == 1 and kf["PER_ROW"] and bm == 64:
            # third H100 probe (results/probe_quant_s9.md, M = 64, 4096^2, bf16 cuBLAS 15.0 us): SWAP with
            # 128-wide N tiles, 4 K splits, 4 stages 15.8 us (0.95x) vs the first config's 17.2 us
            cands.insert(0, dict(swap, BLOCK_N=128, num_warps=4, num_stages=4, SPLIT_K=4))
        if bm == 64 and N // 64 <= 96:
            # fourth H100 probe (results/probe_gemm_m64.md, M = 64, 4096^2, bf16 cuBLAS 14.5 us; ncu had the
            # defaults at 0.48 waves): more K splits. SWAP 64-wide, 4 splits: w4a16 14.9 us (was 17.1),
            # w8a16 15.0 (15.7), mxfp4 21.1 (25.2); 16-element groups (NV) 8 splits: nvint4 19.7 (20.8),
            # nvfp4 23.3 (24.0); mxint8: the plain 64-wide 8-warp tile with 4 splits 18.5 (21.6)
            # MXINT8 after the one-FFMA decode (int8 x E8M0, session 11, results/probe_gemm_m64_mx8.md): the
            # same tile on 4 warps 16.8 us vs 18.8 on 8
            # The split-K reduce with PDL (results/probe_gemm_m64_pdl.md): 0.2-0.6 us faster for every format
            # but mxint8 (0.1-0.5 us slower, both pairs of runs): off there
            # MXINT8 in SWAP with its scales a step ahead (session 12) on two warpgroups (128-row tiles), 4
            # splits, 3 stages (results/probe_gemm_m64_n128.md, bf16 cuBLAS 14.35 us): 15.37 us vs 17.09
            if kf["GB"] == 32 and epb == 1 and kf["ELEM"] == 0:
                cands.insert(0, dict(swap, BLOCK_N=128, num_warps=8, SPLIT_K=4, PDL=False))
            elif kf["GB"] == 32 and epb == 1:
                cands.insert(0, dict(first, PREFETCH=False, SPLIT_K=4, num_warps=8, PDL=True))
            elif epb == 2 and kf["GB"] == 8 and kf["ELEM"] == 2:
                # nvint4 (session 11, results/probe_gemm_m64_fine_block.md): 64-byte steps with 4 splits
                # 16.4-16.5 us vs 17.0 for 32-byte steps with 8
                cands.insert(0, dict(swap, BLOCK_N=64, num_warps=4, BLOCK_KB=64, SPLIT_K=4))
            else:
                cands.insert(0, dict(swap, BLOCK_N=64, num_warps=4, SPLIT_K=8 if epb == 2 and kf["GB"] == 8 else 4))
        if M <= quant_gemm_gluon.MAX_M and quant_gemm_gluon.format_ok(kf):
            # the Gluon GEMM (quant_gemm_gluon.py, sm_90 + bf16 activations; other cases run the next config):
            # probe_gemm_m64_gluon_r2.md, M = 64, 4096^2, bf16 cuBLAS 14.7 us: 64 rows x 128 elements, 3 stages,
            # 4 K splits -- nvint4 11.8 us, mxint8 12.7, nvfp4 12.2, mxfp4 11.7, w4a16 11.1 (SWAP: 14.8-15.4)
            cands.insert(0, dict(quant_gemm_gluon.DEFAULT_CONFIG, BK=max(128, quant_gemm_gluon.group_size(kf))))
    out = []
    for cfg in cands:
        if cfg not in out:
            out.append(cfg)
    return out


def triton_gemm_configs(M: int, N: int, K: int, fmt, interpreted: bool) -> list[dict]:
    """gemm_configs without the Gluon GEMM's: the Triton tiles (dequant_matmul.py), default first."""
    return [c for c in gemm_configs(M, N, K, fmt, interpreted) if not c.get("GLUON")]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_sm_count(device_index(device))
    return CPU_SMS


def auto_split_k_tma(programs: int, kb: int, block_kb: int, device: torch.device) -> int:
    """TMA GEMV: no K split once its row tiles fill the SMs (4096^2: sk2 11.3 us, sk1 9.1; probe_gemv_tma.md)."""
    return 1 if programs >= _sm_count(device) else auto_split_k(programs, kb, block_kb, device)


def auto_split_k_gemm(programs: int, kb: int, block_kb: int, device: torch.device) -> int:
    """K splits for the tensor-core GEMM at small M: enough (M, N) tiles x splits to cover the SMs once
    (M = 64, N = 4096 with 64-wide N tiles: 64 tiles -> 2-3 splits), each split >= 4 steps of BLOCK_KB."""
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    steps = -(-kb // block_kb)
    return max(1, min(-(-sms // max(programs, 1)), steps // 4))


def auto_split_k(programs: int, kb: int, block_kb: int, device: torch.device) -> int:
    """K splits for the GEMV: none when the (N, M) tiles already fill the SMs twice over; else enough to
    reach that, keeping at least 4 steps of BLOCK_KB per split."""
    sms = _sm_count(device)
    if programs >= 2 * sms:
        return 1
    steps = -(-kb // block_kb)
    return max(1, min(-(-2 * sms // max(programs, 1)), steps // 4))
