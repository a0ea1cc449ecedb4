"""The Gluon w8a16 GEMV for M <= 4 on Hopper (codegen/templates/dequant_gemv_gluon.py): when it applies, its config
and its launch.

Its point is PREFETCH: launched with programmatic dependent launch, each program fetches its first code boxes
before griddepcontrol.wait, while the kernel before it still runs, and reads x only after the wait. ``runtime/
quant_linear.py`` runs it for GEMV configs with ``GLUON_GEMV`` set. A config it does not apply to (another format, K
not a multiple of 16, a GPU other than sm_90, a triton without Gluon) runs the next config instead and records why
in SKIPPED.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .kernels import cuda_capability, device_index, template_kernels

GLUON_GEMV_TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "dequant_gemv_gluon.py"
GLUON_GEMV_KERNELS = ("dequant_gemv_gluon",)
MAX_BW = 256  # words per box row: the TMA box limit per dimension
DEFAULT_CONFIG = {"BLOCK_M": 1, "GLUON_GEMV": True, "BLOCK_N": 16, "BW": 128, "STAGES": 4, "num_warps": 4,
                  "num_stages": 1, "PREFETCH": True}
# (fmt, M, N, K, device type) -> why a GLUON_GEMV config ran another kernel instead (last reason wins)
SKIPPED: dict = {}


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    return dict(zip(GLUON_GEMV_KERNELS, template_kernels(str(GLUON_GEMV_TEMPLATE), GLUON_GEMV_KERNELS, device_type,
                                                         env_cache_dir())))


def format_ok(kf: dict) -> bool:
    """int8 codes with one float scale per row, no zero point or tensor scale (w8a16)."""
    return (kf["ELEM"] == 0 and kf["EPB"] == 1 and kf["PER_ROW"] and kf["SCALE"] == 0 and not kf["HAS_ZERO"]
            and not kf["HAS_TS"] and kf["STEP"] == 1.0)


def why_not(kf: dict, x2: torch.Tensor, codes: torch.Tensor) -> str | None:
    """None when the Gluon GEMV can run these tensors, else the reason it cannot."""
    if not format_ok(kf):
        return "format is not int8 per-row (w8a16)"
    if x2.device.type != "cuda" or torch.version.hip is not None:
        return "Gluon kernels run on NVIDIA CUDA only"
    if cuda_capability(device_index(x2.device))[0] != 9:
        return "the Gluon GEMV's TMA path is built for sm_90"
    try:
        from triton.experimental.gluon import language as gl  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return "triton has no Gluon"
    K = codes.shape[1]
    # TMA: 16-byte aligned base and row stride (int8 codes: K % 16 == 0), each row contiguous
    if (codes.dtype != torch.int8 or codes.stride(1) != 1 or codes.stride(0) % 16 or K % 16
            or codes.data_ptr() % 16):
        return "codes are not int8 rows of a multiple of 16 bytes, 16-byte aligned, each contiguous"
    if x2.stride(1) != 1:
        return "x rows are not contiguous"
    return None


def check_config(cfg: dict) -> None:
    bn, bw, st, w = cfg["BLOCK_N"], cfg["BW"], cfg["STAGES"], cfg.get("num_warps", 4)
    if bn < 1 or bn & (bn - 1) or bn % w or bw < 32 or bw & (bw - 1) or bw > MAX_BW:
        raise ValueError("quant_linear: GLUON_GEMV configs need power-of-two BLOCK_N (a multiple of num_warps) and "
                         f"BW (32..{MAX_BW} words), got {cfg}")
    if st < 1:
        raise ValueError(f"quant_linear: GLUON_GEMV STAGES must be >= 1, got {st}")


@functools.lru_cache(maxsize=16)
def _smem_layout():
    from triton.experimental.gluon import language as gl

    # unswizzled: a box row is BW words (up to 1 KB), wider than any swizzle span; each warp reads whole rows
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def launch(x2, codes, scales, bias, out, cfg: dict, splits: int, per_split: int, partials, prefetch: bool) -> None:
    """y = x2 @ (codes * scales)^T (+ bias) into ``out`` [M, N], or fp32 partials [splits, M, N] when ``splits`` > 1
    (the caller reduces them); ``per_split`` words per split, a multiple of BW. ``prefetch``: launched with PDL,
    the first STAGES code boxes fetched before griddepcontrol.wait."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    check_config(cfg)
    M, n = out.shape
    K = codes.shape[1]
    bn, bw = cfg["BLOCK_N"], cfg["BW"]
    desc = TensorDescriptor.from_tensor(codes.view(torch.int32), [bn, bw], _smem_layout())
    kernels_for("cuda")["dequant_gemv_gluon"][(-(-n // bn), splits, M)](
        desc, x2, scales, bias if bias is not None else scales, out, partials, M, n, K, K // 4, per_split,
        x2.stride(0), out.stride(0), 255, STAGES=cfg["STAGES"], SPLIT=splits > 1, HAS_BIAS=bias is not None,
        PREFETCH=prefetch, num_warps=cfg.get("num_warps", 4), **({"launch_pdl": True} if prefetch else {}))
