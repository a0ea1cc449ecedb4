"""The Gluon dequant GEMM for M <= 64 on Hopper (codegen/templates/dequant_gemm_gluon.py): when it applies, its
configs and its launch. quant_configs.gemm_configs puts its config first for the formats it decodes, so the
default dispatch runs it from 5 rows (the GEMV takes M <= 4) to 64.

``runtime/quant_linear.py`` runs it for GEMM configs with ``GLUON`` set. A config it does not apply to (a format
it has no decode for, an fp16 / fp32 activation, K or the code rows not 16-byte aligned for TMA, a GPU other
than sm_90, a triton without Gluon) runs the next config that is not GLUON instead and records why in SKIPPED.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .kernels import cuda_capability, cuda_sm_count, device_index, template_kernels

GLUON_TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "dequant_gemm_gluon.py"
GLUON_KERNELS = ("dequant_gemm_gluon",)
MAX_M = 64  # x rows per program: wgmma's N side (one [64, BK] TMA box of x per step)
# probe_gemm_m64_gluon_r2.md (M = 64, 4096^2): 64 weight rows x 128 elements per step, 3 stages, 4 warps;
# SPLIT_K None: auto_splits (GROUP_M / BLOCK_M mark it a GEMM config for quant_linear's dispatch)
# PREFETCH (off): launched with PDL, the first STAGES - 1 code boxes fetched before griddepcontrol.wait. In a chain
# of dependent layers (probe_pdl_chain_gemm.md, 4096^2) it moved the time by -1.1 .. +0.8 us at M = 16 and -1.2 ..
# +0.8 us at M = 64 depending on the format: no consistent gain, so an option (tested), not the default.
DEFAULT_CONFIG = {"GLUON": True, "BLOCK_M": MAX_M, "GROUP_M": 1, "BLOCK_N": 64, "BK": 128, "STAGES": 3,
                  "num_warps": 4, "num_stages": 1, "SPLIT_K": None, "PREFETCH": False}
# (fmt, M, N, K, device type) -> why a GLUON config ran another kernel instead (last reason wins)
SKIPPED: dict = {}


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    return dict(zip(GLUON_KERNELS, template_kernels(str(GLUON_TEMPLATE), GLUON_KERNELS, device_type,
                                                    env_cache_dir())))


def format_ok(kf: dict) -> bool:
    """Formats the kernel decodes: int8 with a bf16 scale per row (w8a16, applied in the epilogue), MXINT8 (int8 x
    E8M0), uint4 with zero points and bf16 group scales (w4a16), NVINT4 (int4 x E4M3), MXFP4 / NVFP4 (E2M1 x E8M0 /
    E4M3)."""
    elem, scale = kf["ELEM"], kf["SCALE"]
    if kf["PER_ROW"]:
        return elem == 0 and scale == 0 and not kf["HAS_ZERO"] and not kf["HAS_TS"] and kf["STEP"] == 1.0
    return ((elem == 0 and scale == 1) or (elem == 1 and scale == 0 and kf["HAS_ZERO"]) or (elem == 2 and scale == 2)
            or (elem == 3 and scale in (1, 2)))


def group_size(kf: dict) -> int:
    """Elements per scale along K (1 for a per-row scale: any step length fits)."""
    return 1 if kf["PER_ROW"] else kf["GB"] * kf["EPB"]


def why_not(kf: dict, x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bk: int = 128) -> str | None:
    """None when the Gluon GEMM can run these tensors with K steps of ``bk`` elements, else the reason it cannot."""
    if not format_ok(kf):
        return "format has no Gluon decode (int8 per row, MXINT8, w4a16, NVINT4, MXFP4, NVFP4)"
    if not kf["PER_ROW"] and (scales.shape[1] * group_size(kf)) % bk:
        # the last step's groups would run past the row's scales (the kernel reads whole steps of groups unmasked)
        return f"K padded to the group ({scales.shape[1] * group_size(kf)}) is not a multiple of the {bk}-element step"
    if kf["EPB"] == 1 and codes.shape[1] % 2:
        return "int8 codes need an even row length (read as int16 pairs)"
    if kf["SCALE"] == 0 and scales.dtype != torch.bfloat16:
        return "group scales are not bf16 (the decode multiplies in bf16x2)"
    if x2.device.type != "cuda" or torch.version.hip is not None:
        return "Gluon kernels run on NVIDIA CUDA only"
    if x2.dtype != torch.bfloat16:
        return "activations are not bf16"
    M = x2.shape[0]
    if not 1 <= M <= MAX_M:
        return f"M = {M} is not in 1..{MAX_M}"
    if cuda_capability(device_index(x2.device))[0] != 9:
        return "wgmma needs sm_90"
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return "triton has no Gluon"
    if not hasattr(gl, "to_linear_layout"):  # (triton 3.5 has Gluon but not this; the template needs triton >= 3.6)
        return "this triton's Gluon lacks to_linear_layout (needs triton >= 3.6)"
    # TMA: 16-byte aligned bases and row strides, unit inner stride (row strides checked themselves: a one-row
    # slice of a wider buffer counts as contiguous whatever its stride)
    if x2.stride(1) != 1 or (x2.stride(0) * 2) % 16 or x2.data_ptr() % 16:
        return "x rows are not 16-byte aligned and contiguous"
    if codes.stride(1) != 1 or codes.stride(0) % 16 or codes.data_ptr() % 16:
        return "code rows are not 16-byte aligned and contiguous"
    if scales.stride(1) != 1:
        return "scales are not contiguous along K"
    return None


def check_config(cfg: dict, kf: dict) -> None:
    bn, bk, st, w = cfg["BLOCK_N"], cfg["BK"], cfg["STAGES"], cfg.get("num_warps", 4)
    if w not in (4, 8) or bn != 16 * w:
        raise ValueError(f"quant_linear: GLUON configs need num_warps 4 / 8 and BLOCK_N = 16 * num_warps, got {cfg}")
    if bk not in (64, 128, 256) or bk % group_size(kf):
        raise ValueError(f"quant_linear: GLUON BK must be 64, 128 or 256 and a multiple of the group, got {cfg}")
    if st < 2:
        raise ValueError(f"quant_linear: GLUON STAGES must be >= 2, got {cfg}")


def launch(x2, codes, scales, zeros, tensor_scale, bias, out, kf: dict, cfg: dict, plan,
           pdl: bool = False, prefetch: bool = False) -> tuple[int, torch.Tensor]:
    """y = x2 @ dequant(W)^T (+ bias) into ``out`` [M, N] (one split), or fp32 partials [splits, M, N] the caller
    reduces (dequant_splitk_reduce, which adds the bias). ``plan(programs, kb, step, auto)`` is quant_linear's
    split planner (-> splits, storage units per split, partials), ``auto`` this kernel's split heuristic. ``pdl``:
    the reduce will be launched with programmatic dependent launch (the kernel then signals it early).
    ``prefetch``: the kernel itself launched with PDL, its first STAGES - 1 code boxes fetched before
    griddepcontrol.wait and x after it (the codes must not be written by the kernel before it). Returns
    (splits, partials)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    check_config(cfg, kf)
    M = x2.shape[0]
    n = codes.shape[0]
    bn, bk = cfg["BLOCK_N"], cfg["BK"]
    # storage units of the kernel: a byte of two 4-bit codes, or a 16-bit pair of int8 codes
    units = codes.view(torch.int16 if kf["EPB"] == 1 else torch.uint8)
    ubk = bk // 2
    total_steps = -(-units.shape[1] // ubk)
    tiles = -(-n // bn)
    splits, per_units, partials = plan(tiles, units.shape[1], ubk, auto_splits)
    per = per_units // ubk
    w_desc = TensorDescriptor.from_tensor(units, [bn, ubk], _smem_layout((bn, ubk), "int16" if kf["EPB"] == 1 else "uint8"))
    # x box rows = wgmma's N: the next power of two >= M (16..64), so small M neither reads nor multiplies 64 rows
    bm = min(MAX_M, max(16, 1 << (M - 1).bit_length()))
    x_desc = TensorDescriptor.from_tensor(x2, [bm, bk], _smem_layout((bm, bk), "bfloat16"))
    dummy = scales
    kernels_for("cuda")["dequant_gemm_gluon"][(tiles, splits)](
        w_desc, x_desc, scales, zeros if zeros is not None else dummy,
        tensor_scale if tensor_scale is not None else dummy, bias if bias is not None else dummy, partials, M, n,
        scales.shape[1], scales.stride(0), per, total_steps, out.stride(0), ELEM=kf["ELEM"], SCALE=kf["SCALE"],
        HAS_ZERO=kf["HAS_ZERO"], HAS_TS=kf["HAS_TS"], STEP=kf["STEP"], EPB=kf["EPB"],
        G=bk if kf["PER_ROW"] else group_size(kf), PER_ROW=kf["PER_ROW"], PDL=pdl and splits > 1,
        STAGES=cfg["STAGES"], SPLIT=splits > 1, HAS_BIAS=bias is not None and splits == 1,
        num_warps=cfg.get("num_warps", 4), **({"PREFETCH": True, "launch_pdl": True} if prefetch else {}))
    return splits, partials


@functools.lru_cache(maxsize=64)
def _smem_layout(block: tuple, dtype_name: str):
    """The NVMMA shared layout of a TMA box (cached: building one costs ~15 us of Python per call)."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for(list(block), getattr(gl, dtype_name))


def auto_splits(tiles: int, kb: int, step: int, device: torch.device) -> int:
    """K splits for ``tiles`` row tiles over ``kb`` storage units in steps of ``step``: up to two programs per SM (a
    program's 3 stages take 72 KB of shared memory: two fit, and the second hides the first's prologue and
    epilogue; probe r2 at 64 tiles: 4 splits 11.8 us, 2 splits 13.1), each split at least 4 steps long; none once
    the row tiles alone reach that."""
    sms = cuda_sm_count(device_index(device))
    steps = -(-kb // step)
    splits = 1
    while tiles * splits * 2 <= 2 * sms and steps // (splits * 2) >= 4:
        splits *= 2
    return splits


def run(x2, codes, scales, zeros, tensor_scale, bias, out, kf: dict, cfg: dict, plan, reduce,
        pdl: bool = False, prefetch: bool = False) -> str | None:
    """launch() and, with K splits, ``reduce(partials, splits)`` (quant_linear's split-K reduce, launched with
    programmatic dependent launch when ``pdl``) into ``out``; ``prefetch`` as launch(). Returns None, or why the
    kernel did not compile (nothing was launched then; the caller runs another kernel): a Triton whose Gluon lacks
    what the template uses."""
    from triton.compiler.errors import CompilationError

    try:
        splits, partials = launch(x2, codes, scales, zeros, tensor_scale, bias, out, kf, cfg, plan, pdl, prefetch)
    except CompilationError as e:
        return f"the Gluon kernel did not compile with this triton: {str(e).strip().splitlines()[-1][:200]}"
    if splits > 1:
        reduce(partials, splits)
    return None
