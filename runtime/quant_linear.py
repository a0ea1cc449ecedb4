"""Weight-only quantized linear layers: ``y = x @ dequant(W)^T + bias`` run by the dequant-matmul Triton
kernels of ``codegen/templates/dequant_matmul.py`` and ``dequant_gemv_words.py`` (GPU, or the CPU interpreter).

``W [N, K]`` is stored in a packed layout of ``passes/quant/formats.py`` (``quantize(w, fmt)``): codes,
scales, optional integer zero points and an optional fp32 per-tensor scale. The graph-level op is

    fxforge::quant_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? tensor_scale,
                          Tensor? bias, str fmt, int K) -> Tensor

written by the ``quantize`` pass (passes/quant/quantize_pass.py) and registered when fxforge is imported.
``x [..., K]`` is fp16 / bf16 / fp32; the output has x's dtype and shape ``[..., N]``.

Dispatch: M = rows of x. M <= GEMV_DISPATCH_M (4): ``dequant_gemv`` (CUDA-core dot products, optional split-K with
a deterministic reduce launch); larger M: ``dequant_gemm`` (tl.dot, the weight tile decoded in the K loop), and
before it, up to 64 rows of bf16 x on sm_90, the Gluon GEMM of ``quant_gemm_gluon.py`` (GLUON configs). w4a16_g128
GEMVs from 12288 rows (8192 at M >= 2, K <= 4096) run the tensor-core GEMV of ``quant_gemv_mma.py`` (MMA configs:
Gluon + inline mma.sync).
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

from pathlib import Path

import torch

from . import quant_gemm_gluon, quant_gemv_mma, quant_gemv_tma
from .kernels import (
    first_that_fits,
    interpreter_active,
    pdl_capable,
    template_kernels,
)
from .quant_configs import (  # noqa: F401 (re-exported: the benchmarks and tests reach them through here)
    CPU_SMS,
    WORDS_ROW_GW,
    _cdiv,
    auto_split_k,
    auto_split_k_gemm,
    auto_split_k_tma,
    gemm_configs,
    gemv_configs,
    kernel_format,
    triton_gemm_configs,
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
REDUCE_BLOCK = 1024
REDUCE_PDL = True  # default of the PDL config key: the split-K reduce with programmatic dependent launch
# (quant_helpers.pdl_*; GPU only)
HBM_TBPS = 3.0  # H100 SXM achievable HBM bandwidth used by the bytes model
# (fmt, M, N, K, x dtype, device index) -> {"index": config used, "failed": cfg, "error": str} (default path)
FALLBACKS: dict = {}
_ACT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_CODE_DTYPES = {"int8": torch.int8, "mxint8": torch.int8, "fp8_e4m3": torch.uint8}
_SCALE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "e8m0": torch.uint8, "e4m3": torch.uint8}


def template_source() -> str:
    """The source of the quant kernels: dequant_matmul.py first (its header holds the bytes model), then
    the words GEMVs and the helper modules they import."""
    return "\n".join(p.read_text() for p in (TEMPLATE, WORDS_TEMPLATE, KSPAN_TEMPLATE, PLANES_TEMPLATE,
                                              quant_gemv_tma.TMA_TEMPLATE, quant_gemv_mma.MMA_TEMPLATE, HELPERS,
                                              PACKED_HELPERS))


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    cache = env_cache_dir()
    return {**dict(zip(KERNELS, template_kernels(str(TEMPLATE), KERNELS, device_type, cache))),
            **dict(zip(WORDS_KERNELS, template_kernels(str(WORDS_TEMPLATE), WORDS_KERNELS, device_type, cache))),
            **dict(zip(KSPAN_KERNELS, template_kernels(str(KSPAN_TEMPLATE), KSPAN_KERNELS, device_type, cache))),
            **dict(zip(PLANES_KERNELS, template_kernels(str(PLANES_TEMPLATE), PLANES_KERNELS, device_type, cache)))}


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
    # The PDL configs (WAIT, PREFETCH) read code words before griddepcontrol.wait, i.e. before the kernel ahead of
    # them in the stream has finished: only safe when no kernel ahead writes the codes. They are weights, written
    # once; but a copy made here would be exactly the kernel ahead, so a non-contiguous weight reads its codes after
    # the wait (its launch still uses PDL).
    early_codes = codes.is_contiguous()
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
    asked_pdl = bool(cfg.pop("PDL", REDUCE_PDL))  # a config's PDL=False turns off the reduce's PDL, WAIT and PREFETCH
    pdl = asked_pdl and pdl_capable(x.device)
    if cfg.pop("PLANES", False):
        # (CUDA tensors under TRITON_INTERPRET=1 cannot run its inline PTX: the default kernels instead)
        if planes_ok(kf, x.dtype, interpreted) and (interpreted or not interpreter_active()):
            return _gemv_planes(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg,
                                split_k if split_k is not None else cfg_split, interpreted, pdl).reshape(*lead, n)
        # a format / dtype the planes GEMV does not take: the default GEMV config instead
        cfg, cfg_split = _fallback((gemv_configs if gemv else gemm_configs)(M, n, K, fmt, interpreted)[0], interpreted)
    if cfg.pop("MMA", False):
        why = quant_gemv_mma.why_not(kf, x2, codes, scales, zeros) if gemv else "MMA configs are for the GEMV only"
        if why is None and interpreter_active():
            why = "the Triton interpreter runs no Gluon"
        if why is None and (split_k if split_k is not None else cfg_split) not in (None, 1):
            why = "K splits were asked for (the MMA GEMV splits K over its warps only)"
        if why is None:
            # (WAIT only when the codes were not copied just before)
            why = quant_gemv_mma.run(x2, codes, scales, zeros, bias, out, cfg, bool(cfg.get("WAIT")) and pdl and early_codes)
            if why is None:
                return out.reshape(*lead, n)
        quant_gemv_mma.SKIPPED[(fmt, M, n, K, x.device.type)] = why  # then the next config that is not MMA
        cfg, cfg_split = _fallback(next(c for c in (gemv_configs if gemv else gemm_configs)(M, n, K, fmt, interpreted)
                                        if not c.get("MMA")), interpreted)
    if cfg.pop("TMA", False):
        why = quant_gemv_tma.why_not(kf, x2, codes) if gemv else "TMA configs are for the GEMV only"
        if why is None:
            return _gemv_tma(x2, codes, scales, bias, out, cfg, split_k if split_k is not None else cfg_split,
                             interpreted, pdl).reshape(*lead, n)
        quant_gemv_tma.SKIPPED[(fmt, M, n, K, x.device.type)] = why  # then the next config that is not TMA
        cfg, cfg_split = _fallback(next(c for c in (gemv_configs if gemv else gemm_configs)(M, n, K, fmt, interpreted)
                                        if not c.get("TMA")), interpreted)
    if cfg.pop("GLUON", False):
        why = ("GLUON configs are for the GEMM only" if gemv else
               quant_gemm_gluon.why_not(kf, x2, codes, scales, cfg.get("BK", 128)))
        if why is None and interpreter_active():
            why = "the Triton interpreter runs no Gluon"
        if why is None:
            asked = split_k if split_k is not None else cfg_split
            why = quant_gemm_gluon.run(
                x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg,
                lambda programs, kb, step, auto: _plan_splits(asked, programs, kb, step, out, auto),
                lambda parts, s: _splitk_reduce(ks, parts, bias, out, s, interpreted, pdl), pdl,
                pdl and early_codes and bool(cfg.get("PREFETCH")))
            if why is None:
                return out.reshape(*lead, n)
        quant_gemm_gluon.SKIPPED[(fmt, M, n, K, x.device.type)] = why  # then the next config that is not GLUON
        nxt = (gemv_configs if gemv else triton_gemm_configs)(M, n, K, fmt, interpreted)[0]
        # the fallback's own PDL choice, unless the caller's config turned PDL off
        pdl = asked_pdl and bool(nxt.get("PDL", REDUCE_PDL)) and pdl_capable(x.device)
        cfg, cfg_split = _fallback(nxt, interpreted)
    if cfg.pop("WORDS", False):
        if gemv and _words_ok(codes):
            return _gemv_words(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg,
                               split_k if split_k is not None else cfg_split, interpreted, pdl,
                               early_codes).reshape(*lead, n)
        # the int32 view needs whole words per row: the first byte-tile config instead (not TMA: its int8 codes
        # need K % 16 == 0, a stricter condition than whole words)
        cfg, cfg_split = _fallback(next(c for c in gemv_configs(M, n, K, fmt, interpreted)
                                        if not c.get("WORDS") and not c.get("TMA")), interpreted)
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


def _gemv_words(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg, splits, interpreted, pdl=False,
                early_codes=True):
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
    # WAIT (the words kernel; not K-span): launched with PDL, the first steps' code words loaded before
    # griddepcontrol.wait (pdl: GPU, sm_90+, the config's PDL not off; codes not copied just before: quant_linear_apply)
    if launch.pop("WAIT", False) and pdl and early_codes and not kspan:
        launch.update(WAIT=True, launch_pdl=True)
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


def _gemv_tma(x2, codes, scales, bias, out, cfg, splits, interpreted, pdl=False):
    """``dequant_gemv_tma8`` launch (w8a16 codes through TMA boxes of BW words; quant_gemv_tma.py), then the
    split-K reduce when the K range is split."""
    quant_gemv_tma.check_config(cfg)
    M, n = out.shape
    splits, per_split, partials = _plan_splits(splits, _cdiv(n, cfg["BLOCK_N"]) * M, codes.shape[1] // 4, cfg["BW"], out,
                                               auto_split_k_tma)
    wait = bool(cfg.get("WAIT")) and pdl  # (pdl: GPU, sm_90+, the config's PDL not off)
    quant_gemv_tma.launch(x2, codes, scales, bias, out, cfg, splits, per_split, partials, interpreted, wait)
    if splits > 1:
        _splitk_reduce(kernels_for(x2.device.type), partials, bias, out, splits, interpreted, wait)
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
    if cfg.get("GLUON"):
        if gemv:
            raise ValueError("quant_linear: GLUON configs are for the GEMM only")
        quant_gemm_gluon.check_config(cfg, kf)
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
    """``x @ dequant(W)^T + bias`` for ``W [N, K]`` packed in format ``fmt`` (the quantize pass's op). On sm_90+ the
    default GEMV launches with programmatic dependent launch and reads its first code words while the kernel ahead
    of it in the stream still runs: ``codes`` are weights, which that kernel must not be writing (a copy made for a
    non-contiguous ``codes`` here is handled)."""
    return quant_linear_apply(x, codes, scales, zeros, tensor_scale, bias, fmt, K)


@quant_linear.register_fake
def _(x, codes, scales, zeros, tensor_scale, bias, fmt, K):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
