"""Weight-only quantized linear layers: ``y = x @ dequant(W)^T + bias`` run by the dequant-matmul Triton
kernels of ``codegen/templates/dequant_matmul.py`` and ``dequant_gemv_words.py`` (GPU, or the CPU interpreter).

``W [N, K]`` is stored in a packed layout of ``passes/quant/formats.py`` (``quantize(w, fmt)``): codes,
scales, optional integer zero points and an optional fp32 per-tensor scale. The graph-level op is

    fxforge::quant_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? tensor_scale,
                          Tensor? bias, str fmt, int K) -> Tensor

written by the ``quantize`` pass (passes/quant/quantize_pass.py) and registered when fxforge is imported.
``x [..., K]`` is fp16 / bf16 / fp32; the output has x's dtype and shape ``[..., N]``.

Dispatch: M = rows of x. M <= GEMV_DISPATCH_M (4): ``dequant_gemv`` (CUDA-core dot products, optional split-K with
a deterministic reduce launch); larger M: ``dequant_gemm`` (tl.dot, the weight tile decoded in the K loop).
Every format of ``FORMATS`` runs in the kernels: w8a16, w8a16_fp8, w4a16_g32/g64/g128, mxint8, mxfp8,
mxfp4, nvfp4, nvint4. CPU tensors without the Triton interpreter (a CUDA machine working on a CPU copy)
fall back to ``dequantize`` + an fp32 matmul.

Configs (``gemv_configs`` / ``gemm_configs``, first = default = the H100 winners of
benchmarks/results/probe_quant.md): small lists, and an interpreter default with tiny blocks (every tile
path runs in CPU tests). Config keys beyond the blocks: POST (group scales after the partial dot),
PREFETCH (next code tile loaded before the current one is decoded), SPLIT_K (None: automatic), SWAP
(GEMM: swap AB, ``acc^T = W @ x^T`` with the decoded tile as the register operand), WORDS + BLOCK_G
(GEMV: ``dequant_gemv_words`` on int32 words of codes, BITS 4 or 8; falls back to the byte-tile
default when a row is not a whole number of words). On CUDA the default path falls back to the next
config when a launch fails with OutOfResources (recorded in ``FALLBACKS``, warned once per shape).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import quant_gemv_tma
from .kernels import (
    first_that_fits,
    interpreter_active,
    next_pow2,
    pdl_capable,
    template_kernels,
)

_CODEGEN = Path(__file__).resolve().parent.parent / "codegen"
TEMPLATE = _CODEGEN / "templates" / "dequant_matmul.py"
WORDS_TEMPLATE = _CODEGEN / "templates" / "dequant_gemv_words.py"
KSPAN_TEMPLATE = _CODEGEN / "templates" / "dequant_gemv_kspan.py"
PLANES_TEMPLATE = _CODEGEN / "templates" / "dequant_gemv_planes.py"
HELPERS = _CODEGEN / "quant_helpers.py"  # @triton.jit helpers the templates import
PACKED_HELPERS = _CODEGEN / "quant_packed.py"  # the dequant GEMM's dot-operand decodes
KERNELS = ("dequant_gemv", "dequant_gemm", "dequant_splitk_reduce")
WORDS_KERNELS = ("dequant_gemv_words",)
KSPAN_KERNELS = ("dequant_gemv_kspan",)
PLANES_KERNELS = ("dequant_gemv_planes",)
GEMV_MAX_M = 16  # the GEMV kernel takes up to this many rows (a config without GROUP_M selects it)
GEMV_DISPATCH_M = 4  # the default dispatch sends up to this many rows to the GEMV: the 853M decoder's decode
# step at batch 16 measured 8.4 ms through the GEMV against 1.6 ms in bf16
# (benchmarks/results/decode_tokens_gpu_b16.md); from 5 rows the tensor-core GEMM decodes each weight tile
# once for all rows instead of once per row block
CPU_SMS = 4  # stand-in SM count for the interpreter (split-K heuristics see a tiny GPU)
REDUCE_BLOCK = 1024
REDUCE_PDL = True  # default of the PDL config key: the split-K reduce with programmatic dependent launch
# (quant_helpers.pdl_*; GPU only)
WORDS_ROW_GW = 16  # WORDS GEMV, per-row formats: words per inner tile row (BLOCK_G of them per step)
HBM_TBPS = 3.0  # H100 SXM achievable HBM bandwidth used by the bytes model
# (fmt, M, N, K, x dtype, device index) -> {"index": config used, "failed": cfg, "error": str} (default path)
FALLBACKS: dict = {}
_ACT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Element / scale kinds of the template (see its header).
_ELEM = {"int8": 0, "mxint8": 0, "uint4": 1, "int4": 2, "fp4_e2m1": 3, "fp8_e4m3": 4}
_SCALE = {"bf16": 0, "fp32": 0, "e8m0": 1, "e4m3": 2}
_CODE_DTYPES = {"int8": torch.int8, "mxint8": torch.int8, "fp8_e4m3": torch.uint8}
_SCALE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "e8m0": torch.uint8, "e4m3": torch.uint8}


def template_source() -> str:
    """The source of the quant kernels: dequant_matmul.py first (its header holds the bytes model), then
    the words GEMVs and the helper modules they import."""
    return "\n".join(p.read_text() for p in (TEMPLATE, WORDS_TEMPLATE, KSPAN_TEMPLATE, PLANES_TEMPLATE,
                                              quant_gemv_tma.TMA_TEMPLATE, HELPERS, PACKED_HELPERS))


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    cache = env_cache_dir()
    return {**dict(zip(KERNELS, template_kernels(str(TEMPLATE), KERNELS, device_type, cache))),
            **dict(zip(WORDS_KERNELS, template_kernels(str(WORDS_TEMPLATE), WORDS_KERNELS, device_type, cache))),
            **dict(zip(KSPAN_KERNELS, template_kernels(str(KSPAN_TEMPLATE), KSPAN_KERNELS, device_type, cache))),
            **dict(zip(PLANES_KERNELS, template_kernels(str(PLANES_TEMPLATE), PLANES_KERNELS, device_type, cache)))}


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


# ------------------------------------------------------------------------------------------- bytes model
def bytes_model(fmt: str, N: int, K: int, M: int = 1, act_bytes: int = 2, splits: int = 1) -> dict:
    """Bytes a launch moves: the packed weight (``metrics.bytes_per_weight``; fmt "bf16"/"fp16"/"fp32" =
    an unquantized reference), x, y and split-K partials, with the time at ``HBM_TBPS``."""
    from fxforge.passes.quant.metrics import bytes_per_weight

    dense = {"bf16": 2, "fp16": 2, "fp32": 4}
    weights = N * K * dense[fmt] if fmt in dense else bytes_per_weight(fmt, K, N) * N * K
    acts = M * K * act_bytes + M * N * act_bytes + (2 * splits * M * N * 4 if splits > 1 else 0)
    total = weights + acts
    return {"format": fmt, "N": N, "K": K, "M": M, "weight_bytes": round(weights), "act_bytes": acts,
            "total_bytes": round(total), "expected_us": total / (HBM_TBPS * 1e12) * 1e6}


# ---------------------------------------------------------------------------------------------- configs
def gemv_configs(M: int, N: int, K: int, fmt, interpreted: bool) -> list[dict]:
    """GEMV launch configs, default first: BLOCK_M (rows of x per program, next_pow2(M)), BLOCK_N (weight
    rows), BLOCK_KB (code bytes per row per step), POST (grouped formats: scale per group after the
    partial dot), PREFETCH and, on the GPU, num_warps / num_stages. M <= 4
    on the GPU: WORDS configs first (``dequant_gemv_words``: int32 words of codes, mask decode for integer
    codes, BLOCK_G scale groups of codes per row per step, PREFETCH_X, XT), after a TMA config for w8a16 below
    8192 rows (quant_gemv_tma.py); the byte-tile kernel's configs follow (its H100 winners of
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
        gb = 4 * WORDS_ROW_GW if kf["PER_ROW"] else kf["GB"]
        if N >= 8192:
            wc = [(16, 256, 4, 1), (8, 512, 4, 1), (16, 512, 4, 1)]
        elif kf["EPB"] == 2:
            wc = [(16, 512, 4, 1), (8, 512, 4, 1), (16, 256, 4, 1)]
        else:
            wc = [(16, 1024, 8, 1), (8, 1024, 4, 1), (8, 512, 4, 1)]
        wc += [(16, 256, 4, 0), (8, 512, 4, 0)]
        # XT (x loaded as [word, group, element], its lanes in the codes' order: fewer registers and shared-
        # memory round trips) for integer codes: probe r8 2-5% faster; the fp4 formats were even or slower
        xt = 1 if kf["ELEM"] <= 2 else 0
        words = []
        for bn, kbytes, w, pfx in wc:
            words.append({"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_G": max(kbytes // gb, 1), "WORDS": True, "POST": True,
                          "PREFETCH": 1, "PREFETCH_X": pfx, "XT": xt if pfx else 0, "num_warps": w, "num_stages": 1})
        # w8a16 below 8192 rows: the TMA-fed GEMV (quant_gemv_tma.py; probe_gemv_tma_r4.md, 4096^2 8.38-8.44 us
        # vs the words default's 8.73-8.88); at 14336 rows the words kernel stays ahead (22.7-23.1 vs 23.4-23.7)
        if N < 8192 and quant_gemv_tma.format_ok(kf):
            words.insert(0, dict(quant_gemv_tma.DEFAULT_CONFIG))
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
    warps with 4 splits (session 13), mxfp8 the plain 64-wide tile on 8 warps with 4 splits."""
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
    out = []
    for cfg in cands:
        if cfg not in out:
            out.append(cfg)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
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


# -------------------------------------------------------------------------------------------- checking
def check_inputs(x, codes, scales, zeros, tensor_scale, bias, fmt: str, K: int) -> None:
    """ValueError naming what does not match the packed layout of ``fmt``."""
    from fxforge.passes.quant.formats import FORMATS

    if fmt not in FORMATS:
        raise ValueError(f"quant_linear: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    f = FORMATS[fmt]
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"quant_linear: x dtype {x.dtype} not supported (float16, bfloat16, float32)")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"quant_linear: x must be [..., K={K}], got shape {tuple(x.shape)}")
    kp, nb = f.padded_k(K), f.n_blocks(K)
    kb = kp * f.bits // 8
    want_codes = _CODE_DTYPES.get(f.elem, torch.uint8)
    if codes.dim() != 2 or codes.shape[1] != kb or codes.dtype != want_codes:
        raise ValueError(f"quant_linear[{fmt}]: codes must be {want_codes} [N, {kb}] for K={K}, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    n = codes.shape[0]
    if tuple(scales.shape) != (n, nb) or scales.dtype != _SCALE_DTYPES[f.scale]:
        raise ValueError(f"quant_linear[{fmt}]: scales must be {_SCALE_DTYPES[f.scale]} [{n}, {nb}], got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    if f.zero_point != (zeros is not None):
        raise ValueError(f"quant_linear[{fmt}]: zero points {'required' if f.zero_point else 'not used'}")
    if zeros is not None and (tuple(zeros.shape) != (n, nb) or zeros.dtype != torch.uint8):
        raise ValueError(f"quant_linear[{fmt}]: zeros must be uint8 [{n}, {nb}], got {zeros.dtype} {tuple(zeros.shape)}")
    if f.tensor_scale != (tensor_scale is not None):
        raise ValueError(f"quant_linear[{fmt}]: a per-tensor scale is {'required' if f.tensor_scale else 'not used'}")
    if tensor_scale is not None and (tensor_scale.numel() != 1 or tensor_scale.dtype != torch.float32):
        raise ValueError(f"quant_linear[{fmt}]: tensor_scale must be one float32, got {tensor_scale.dtype} "
                         f"{tuple(tensor_scale.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.is_floating_point()):
        raise ValueError(f"quant_linear: bias must be a float [{n}] vector, got {bias.dtype} {tuple(bias.shape)}")
    devs = {t.device for t in (x, codes, scales, zeros, tensor_scale, bias) if t is not None}
    if len(devs) > 1:
        raise ValueError(f"quant_linear: tensors on different devices {sorted(map(str, devs))}")


def reference(x, codes, scales, zeros, tensor_scale, bias, fmt: str, K: int) -> torch.Tensor:
    """``x @ dequantize(W)^T + bias`` in fp32 through formats.dequantize (no kernels), in x's dtype."""
    from fxforge.passes.quant.formats import FORMATS, QuantizedTensor, dequantize

    qt = QuantizedTensor(FORMATS[fmt], (codes.shape[0], K), codes, scales, zeros, tensor_scale)
    y = x.float() @ dequantize(qt).to(x.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# -------------------------------------------------------------------------------------------- launching
def quant_linear_apply(x, codes, scales, zeros, tensor_scale, bias, fmt: str, K: int, *, config: dict | None = None,
                       split_k: int | None = None, check: bool = True) -> torch.Tensor:
    """Run the kernels. ``config``: a dict from gemv_configs / gemm_configs (default: their first);
    ``split_k``: GEMV K splits (None: ``auto_split_k``). Benchmarks call this directly to try configs."""
    if check:
        check_inputs(x, codes, scales, zeros, tensor_scale, bias, fmt, K)
    if config is None and x.device.type == "cuda":
        # the default config, falling back to the next one on OutOfResources (recorded in FALLBACKS)
        M = x.numel() // max(K, 1)
        gemv = M <= GEMV_DISPATCH_M
        cands = (gemv_configs if gemv else gemm_configs)(M, codes.shape[0], K, fmt, False)
        key = (fmt, M, codes.shape[0], K, x.dtype, x.device.index)
        return first_that_fits(FALLBACKS, key, cands, lambda cfg: quant_linear_apply(
            x, codes, scales, zeros, tensor_scale, bias, fmt, K, config=cfg, split_k=split_k, check=False), "quant_linear")
    n = codes.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if M == 0 or n == 0:
        return out.reshape(*lead, n)
    if x.device.type == "cpu" and not interpreter_active():
        return reference(x, codes, scales, zeros, tensor_scale, bias, fmt, K)
    interpreted = x.device.type == "cpu"
    codes, scales = codes.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    bias = bias.contiguous() if bias is not None else None
    kf = kernel_format(fmt)
    KB, NB = codes.shape[1], scales.shape[1]
    dummy = scales
    common = dict(kf, HAS_BIAS=bias is not None, OUT_BF16=x.dtype == torch.bfloat16, INTERPRETED=interpreted)
    ptrs = (x2, codes, scales, zeros if zeros is not None else dummy, tensor_scale if tensor_scale is not None else dummy,
            bias if bias is not None else dummy, out)
    strides = (x2.stride(0), x2.stride(1), codes.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
               out.stride(0), out.stride(1))
    ks = kernels_for(x.device.type)
    # an explicit config chooses the kernel (GEMM configs carry GROUP_M); the default dispatches by rows
    gemv = M <= GEMV_MAX_M and "GROUP_M" not in config if config else M <= GEMV_DISPATCH_M
    cfg = dict(config or (gemv_configs if gemv else gemm_configs)(M, n, K, fmt, interpreted)[0])
    if interpreted:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    cfg_split = cfg.pop("SPLIT_K", None)
    pdl = bool(cfg.pop("PDL", REDUCE_PDL)) and pdl_capable(x.device)
    if cfg.pop("PLANES", False):
        # (CUDA tensors under TRITON_INTERPRET=1 cannot run its inline PTX: the default kernels instead)
        if planes_ok(kf, x.dtype, interpreted) and (interpreted or not interpreter_active()):
            return _gemv_planes(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg,
                                split_k if split_k is not None else cfg_split, interpreted, pdl).reshape(*lead, n)
        # a format / dtype the planes GEMV does not take: the default GEMV config instead
        cfg, cfg_split = _fallback((gemv_configs if gemv else gemm_configs)(M, n, K, fmt, interpreted)[0], interpreted)
    if cfg.pop("TMA", False):
        why = quant_gemv_tma.why_not(kf, x2, codes) if gemv else "TMA configs are for the GEMV only"
        if why is None:
            return _gemv_tma(x2, codes, scales, bias, out, cfg, split_k if split_k is not None else cfg_split,
                             interpreted).reshape(*lead, n)
        quant_gemv_tma.SKIPPED[(fmt, M, n, K, x.device.type)] = why  # then the next config that is not TMA
        cfg, cfg_split = _fallback(next(c for c in (gemv_configs if gemv else gemm_configs)(M, n, K, fmt, interpreted)
                                        if not c.get("TMA")), interpreted)
    if cfg.pop("WORDS", False):
        if gemv and _words_ok(codes):
            return _gemv_words(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg,
                               split_k if split_k is not None else cfg_split, interpreted, pdl).reshape(*lead, n)
        # the int32 view needs whole words per row: the first byte-tile config instead
        cfg, cfg_split = _fallback(next(c for c in gemv_configs(M, n, K, fmt, interpreted) if not c.get("WORDS")),
                                   interpreted)
    _check_blocks(cfg, kf, gemv)
    bkb = cfg["BLOCK_KB"]
    m_tiles, n_tiles = _cdiv(M, cfg["BLOCK_M"]), _cdiv(n, cfg["BLOCK_N"])
    splits, per_split, partials = _plan_splits(split_k if split_k is not None else cfg_split, m_tiles * n_tiles, KB,
                                               bkb, out, auto_split_k if gemv else auto_split_k_gemm)
    if gemv:
        ks["dequant_gemv"][(n_tiles, splits, m_tiles)](*ptrs, partials, M, n, K, KB, NB, per_split, *strides,
                                                         SPLIT=splits > 1, ACC3=cfg["BLOCK_M"] <= 4, PDL=pdl, **common,
                                                         **cfg)
    else:
        ks["dequant_gemm"][(m_tiles * n_tiles, splits)](*ptrs, partials, M, n, K, KB, NB, per_split, *strides,
                                                         ACT=_ACT_DTYPES[x.dtype], SPLIT=splits > 1, PDL=pdl, **common,
                                                         **cfg)
    if splits > 1:
        _splitk_reduce(ks, partials, bias, out, splits, interpreted, pdl)
    return out.reshape(*lead, n)


def _fallback(cfg: dict, interpreted: bool) -> tuple[dict, int | None]:
    """A copy of the config a kernel that cannot run falls back to, ready to launch (no warps / stages in the
    interpreter, PDL from the device as decided before), and its SPLIT_K."""
    cfg = dict(cfg)
    if interpreted:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    cfg.pop("PDL", None)
    return cfg, cfg.pop("SPLIT_K", None)


def _words_ok(codes: torch.Tensor) -> bool:
    return codes.shape[1] % 4 == 0 and codes.storage_offset() % 4 == 0 and codes.stride(0) % 4 == 0


def _gemv_words(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg, splits, interpreted, pdl=False):
    """``dequant_gemv_words`` launch (codes read as int32 words, BITS 4 or 8; one row of x per program), or with
    KSPAN in the config ``dequant_gemv_kspan`` (Q runs of WPT words per row per step, lanes and warps over K)."""
    M, n = out.shape
    K = x2.shape[1]
    ks = kernels_for(x2.device.type)
    words = codes.view(torch.int32)
    KW, NB = words.shape[1], scales.shape[1]
    _check_words(cfg, kf)
    cfg = dict(cfg)
    kspan = bool(cfg.pop("KSPAN", False))
    gw = _words_group(kf, kspan)
    tw = cfg["Q"] * cfg["WPT"] if kspan else cfg["BLOCK_G"] * gw
    n_tiles = _cdiv(n, cfg["BLOCK_N"])
    splits, per_split, partials = _plan_splits(splits, n_tiles * M, KW, tw, out)
    dummy = scales
    launch = {k: v for k, v in cfg.items() if k not in ("BLOCK_M",)}
    if interpreted:
        launch.pop("num_warps", None), launch.pop("num_stages", None)
    if kspan:
        launch.pop("POST", None), launch.pop("PREFETCH_X", None), launch.pop("XT", None)
    kernel, extra = (ks["dequant_gemv_kspan"], (1,)) if kspan else (ks["dequant_gemv_words"], ())
    kernel[(n_tiles, splits, M)](
        x2, words, scales, zeros if zeros is not None else dummy, tensor_scale if tensor_scale is not None else dummy,
        bias if bias is not None else dummy, out, partials, M, n, K, KW, NB, per_split, x2.stride(0), x2.stride(1),
        words.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, out.stride(0), out.stride(1),
        15 if kf["EPB"] == 2 else 255, *extra, BITS=4 if kf["EPB"] == 2 else 8, ELEM=kf["ELEM"], SCALE=kf["SCALE"], PER_ROW=kf["PER_ROW"], HAS_ZERO=kf["HAS_ZERO"],
        HAS_TS=kf["HAS_TS"], HAS_BIAS=bias is not None, STEP=kf["STEP"], GW=gw, SPLIT=splits > 1,
        OUT_BF16=out.dtype == torch.bfloat16, INTERPRETED=interpreted, PDL=pdl, **launch)
    if splits > 1:
        _splitk_reduce(ks, partials, bias, out, splits, interpreted, pdl)
    return out


def _gemv_tma(x2, codes, scales, bias, out, cfg, splits, interpreted):
    """``dequant_gemv_tma8`` launch (w8a16 codes through TMA boxes of BW words; quant_gemv_tma.py), then the
    split-K reduce when the K range is split."""
    quant_gemv_tma.check_config(cfg)
    M, n = out.shape
    splits, per_split, partials = _plan_splits(splits, _cdiv(n, cfg["BLOCK_N"]) * M, codes.shape[1] // 4, cfg["BW"], out,
                                               auto_split_k_tma)
    quant_gemv_tma.launch(x2, codes, scales, bias, out, cfg, splits, per_split, partials, interpreted)
    if splits > 1:
        _splitk_reduce(kernels_for(x2.device.type), partials, bias, out, splits, interpreted, False)
    return out


def _plan_splits(splits: int | None, programs: int, kb: int, step: int, out: torch.Tensor,
                 auto=auto_split_k) -> tuple[int, int, torch.Tensor]:
    """(splits, code columns per split, partials) for ``kb`` code columns cut into whole ``step``s: the
    splits asked for (None: ``auto(programs, kb, step, device)``), none empty; partials the fp32 [splits, M, N]
    workspace of the split-K reduce, or ``out`` itself without splits."""
    if splits is None:
        splits = auto(programs, kb, step, out.device)
    if splits < 1:
        raise ValueError(f"quant_linear: split_k must be >= 1, got {splits}")
    per_split = _cdiv(_cdiv(kb, splits), step) * step
    splits = _cdiv(kb, per_split)  # no empty split
    partials = torch.empty((splits, *out.shape), dtype=torch.float32, device=out.device) if splits > 1 else out
    return splits, per_split, partials


def _splitk_reduce(ks, partials, bias, out, splits: int, interpreted: bool, pdl: bool) -> None:
    """out = sum of the fp32 partials [splits, M, N] in split order (+ bias), launched after the GEMV / GEMM
    that wrote them (with ``pdl``: programmatic dependent launch, the kernel before signalled it)."""
    M, n = out.shape
    kw = {} if interpreted else {"num_warps": 4}
    if pdl:  # (older launchers do not know the option at all)
        kw.update(launch_pdl=True, PDL=True)
    ks["dequant_splitk_reduce"][(_cdiv(M * n, REDUCE_BLOCK),)](
        partials, bias if bias is not None else partials, out, M, n, splits, out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, OUT_BF16=out.dtype == torch.bfloat16, BLOCK=REDUCE_BLOCK,
        INTERPRETED=interpreted, **kw)


def planes_ok(kf: dict, x_dtype: torch.dtype, interpreted: bool) -> bool:
    """The nibble-planes kernel (dequant_gemv_planes.py) takes 4-bit codes -- uint4 + zero point / int4 with
    16/32-bit float group scales of at least 32 elements (applied to a group's partial dot) or E4M3 scales
    (nvint4: applied per element, exact in bf16 / fp16), e2m1 with E8M0 (mxfp4) or E4M3 (nvfp4) scales
    (bf16 x only) -- and bf16 / fp16 x (fp32 in the interpreter only, which computes in fp32 anyway)."""
    if kf["EPB"] != 2 or kf["PER_ROW"] or kf["GB"] & (kf["GB"] - 1) or not (x_dtype in (torch.bfloat16, torch.float16)
                                                                           or interpreted):
        return False
    if kf["ELEM"] == 3:  # e2m1 (mxfp4: E8M0 per 32, on the partial; nvfp4: E4M3 per 16, per element): bf16 only
        return (kf["SCALE"] == 1 and kf["GB"] >= 16 or kf["SCALE"] == 2) and (x_dtype == torch.bfloat16 or interpreted)
    return kf["ELEM"] in (1, 2) and (kf["SCALE"] == 0 and kf["GB"] >= 16 or kf["SCALE"] == 2)


def _gemv_planes(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg, splits, interpreted, pdl=False):
    """``dequant_gemv_planes`` launch: BLOCK_N weight rows per program (tensor-core M), BLOCK_M rows of x
    (the dot's N; default 16, or 64 above 16 rows), STEP_B code bytes per step (a group with its scale on
    the partial; E4M3-scaled 16-element groups: STEP_B, default 32, per-element scaled), K splits through
    the split-K reduce."""
    M, n = out.shape
    K, KB = x2.shape[1], codes.shape[1]
    gb = kf["GB"]
    bn, bm = cfg["BLOCK_N"], cfg.get("BLOCK_M", 16 if M <= 16 else 64)
    # w4a16: a group per step (scale on the partial); block formats: STEP_B bytes per step, each element
    # scaled (their scales are exact in bf16: E4M3, E8M0 powers of two); offline sm_90: mxfp4 on 16-byte
    # group steps 5-11 instructions per element, nvfp4 on 32 / 64-byte steps 6.2 / 5.7
    step_b = gb if kf["SCALE"] == 0 else cfg.get("STEP_B", max(64, gb))
    for key, v in (("BLOCK_N", bn), ("BLOCK_M", bm), ("STEP_B", step_b)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"quant_linear: PLANES {key} must be a power of two >= 16, got {v}")
    n_tiles = _cdiv(n, bn)
    splits, per_split, partials = _plan_splits(splits, n_tiles * _cdiv(M, bm), KB, step_b, out)
    dummy = scales
    launch = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages", "maxnreg") and not interpreted}
    ks = kernels_for(x2.device.type)
    ks["dequant_gemv_planes"][(n_tiles, splits, _cdiv(M, bm))](
        x2, codes, scales, zeros if zeros is not None else dummy, tensor_scale if tensor_scale is not None else dummy,
        bias if bias is not None else dummy, out, partials, M, n, K, KB, scales.shape[1], per_split, x2.stride(0),
        x2.stride(1), codes.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, out.stride(0),
        out.stride(1), ELEM=kf["ELEM"], SCALE=kf["SCALE"], HAS_ZERO=kf["HAS_ZERO"], HAS_TS=kf["HAS_TS"],
        STEP=kf["STEP"], GB=gb, STEP_B=step_b, ACT=_ACT_DTYPES[x2.dtype], HAS_BIAS=bias is not None,
        OUT_BF16=out.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn, SPLIT=splits > 1, INTERPRETED=interpreted,
        PDL=pdl, **launch)
    if splits > 1:
        _splitk_reduce(ks, partials, bias, out, splits, interpreted, pdl)
    return out


def _words_group(kf: dict, kspan: bool) -> int:
    """Words per scale group of the words kernels (per-row formats: the words kernel's tile row, 1 for K-span)."""
    return kf["GB"] // 4 if not kf["PER_ROW"] else (1 if kspan else WORDS_ROW_GW)


def _check_words(cfg: dict, kf: dict) -> None:
    """ValueError for a words-GEMV config (WORDS, or WORDS + KSPAN) the kernels cannot run."""
    kspan = bool(cfg.get("KSPAN"))
    for key in (("BLOCK_N", "Q", "WPT") if kspan else ("BLOCK_N", "BLOCK_G")):
        v = cfg[key]
        if v < 1 or v & (v - 1):
            raise ValueError(f"quant_linear: {key} must be a power of two, got {v}")
    gw = _words_group(kf, kspan)
    if kspan and not kf["PER_ROW"] and gw % cfg["WPT"]:
        raise ValueError(f"quant_linear: KSPAN runs of WPT={cfg['WPT']} words must lie in one scale group "
                         f"({gw} words)")


def _check_blocks(cfg: dict, kf: dict, gemv: bool) -> None:
    if cfg.get("TMA"):
        if not gemv:
            raise ValueError("quant_linear: TMA configs are for the GEMV only")
        quant_gemv_tma.check_config(cfg)
        return
    if cfg.get("WORDS"):
        if not gemv:
            raise ValueError("quant_linear: WORDS configs are for the GEMV only")
        _check_words(cfg, kf)
        return
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_KB"):
        v = cfg[key]
        if v < 1 or v & (v - 1):
            raise ValueError(f"quant_linear: {key} must be a power of two, got {v}")
    gb = kf["GB"]
    if not kf["PER_ROW"] and cfg["BLOCK_KB"] > gb and cfg["BLOCK_KB"] % gb:
        raise ValueError(f"quant_linear: BLOCK_KB {cfg['BLOCK_KB']} must divide or be a multiple of the group ({gb} bytes)")
    if not gemv and min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_KB"] * kf["EPB"]) < 16:
        raise ValueError(f"quant_linear: tl.dot needs BLOCK_M, BLOCK_N, BLOCK_KB * elements per byte >= 16, got {cfg}")


# ------------------------------------------------------------------------------------------- the graph op
@torch.library.custom_op("fxforge::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 tensor_scale: torch.Tensor | None, bias: torch.Tensor | None, fmt: str, K: int) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for ``W [N, K]`` packed in format ``fmt`` (the quantize pass's op)."""
    return quant_linear_apply(x, codes, scales, zeros, tensor_scale, bias, fmt, K)


@quant_linear.register_fake
def _(x, codes, scales, zeros, tensor_scale, bias, fmt, K):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
