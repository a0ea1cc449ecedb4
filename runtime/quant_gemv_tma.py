"""The w8a16 GEMV fed by TMA (codegen/templates/dequant_gemv_tma.py): when it applies and its launch.

``runtime/quant_linear.py`` runs it for configs with ``TMA`` set (gemv_configs puts one second for w8a16 at
M <= 4 and N < 8192: without PDL it led, probe_gemv_tma_r4.md, 4096^2 8.4 us against the words GEMV's 8.8; with
PDL the words GEMV, which loads its first code words before the wait, leads). A config it does not
apply to (another format, K not a multiple of 16, a GPU without TMA) runs the next config that is not TMA
instead (the words GEMV on the GPU, the byte-tile kernel in the interpreter).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .kernels import cuda_capability, device_index, interpreter_active, template_kernels

TMA_TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "dequant_gemv_tma.py"
TMA_KERNELS = ("dequant_gemv_tma8",)
MAX_BW = 256  # words per box row: the TMA box limit per dimension
# the probe winner (results/probe_gemv_tma_r4.md): 16 rows x 128 words (512 codes) per box, 4 boxes in flight
DEFAULT_CONFIG = {"BLOCK_M": 1, "TMA": True, "BLOCK_N": 16, "BW": 128, "STAGES": 4, "num_warps": 4, "num_stages": 1}
# (fmt, M, N, K, device type) -> why a TMA config ran another kernel instead (debugging aid; last reason wins)
SKIPPED: dict = {}


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    return dict(zip(TMA_KERNELS, template_kernels(str(TMA_TEMPLATE), TMA_KERNELS, device_type, env_cache_dir())))


def format_ok(kf: dict) -> bool:
    """The kernel's format: int8 codes with one float scale per row, no zero point or tensor scale (w8a16)."""
    return (kf["ELEM"] == 0 and kf["EPB"] == 1 and kf["PER_ROW"] and kf["SCALE"] == 0 and not kf["HAS_ZERO"]
            and not kf["HAS_TS"] and kf["STEP"] == 1.0)


def why_not(kf: dict, x2: torch.Tensor, codes: torch.Tensor) -> str | None:
    """None when the TMA GEMV can run these tensors, else the reason it cannot."""
    if not format_ok(kf):
        return "format is not int8 per-row (w8a16)"
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return "triton has no host tensor descriptors"
    K = codes.shape[1]
    # a TMA descriptor needs a 16-byte aligned base and row stride (int8 codes: K % 16 == 0); the row stride is
    # checked itself: a [1, K] slice of a wider buffer counts as contiguous whatever its stride
    if (codes.dtype != torch.int8 or codes.stride(1) != 1 or codes.stride(0) % 16 or K % 16
            or codes.data_ptr() % 16):
        return "codes are not int8 rows of a multiple of 16 bytes, 16-byte aligned, each contiguous"
    if x2.device.type == "cuda" and cuda_capability(device_index(x2.device)) < (9, 0):
        return "TMA needs sm_90+"
    return None


def check_config(cfg: dict) -> None:
    bn, bw, st = cfg["BLOCK_N"], cfg["BW"], cfg["STAGES"]
    if bn < 1 or bn & (bn - 1) or bw < 4 or bw & (bw - 1) or bw > MAX_BW:
        raise ValueError(f"quant_linear: TMA configs need power-of-two BLOCK_N and BW (4..{MAX_BW} words), got {cfg}")
    if st < 1:
        raise ValueError(f"quant_linear: TMA STAGES must be >= 1, got {st}")


def launch(x2, codes, scales, bias, out, cfg: dict, splits: int, per_split: int, partials, interpreted: bool,
           wait: bool = False) -> None:
    """y = x2 @ (codes * scales)^T (+ bias) into ``out`` [M, N], or fp32 partials [splits, M, N] when
    ``splits`` > 1 (the caller reduces them); ``per_split`` words per split, a multiple of BW."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, n = out.shape
    K = codes.shape[1]
    bn, bw = cfg["BLOCK_N"], cfg["BW"]
    desc = TensorDescriptor.from_tensor(codes.view(torch.int32), [bn, bw])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    opts = {} if interpreted else {"num_warps": cfg.get("num_warps", 4), "num_stages": 1}
    dec = cfg.get("DEC", 0)
    if dec == 2 and (interpreted or interpreter_active()):
        dec = 1  # the PRMT offset decode's interpreter twin (same floats; the interpreter runs no inline PTX)
    kernels_for(x2.device.type)["dequant_gemv_tma8"][(-(-n // bn), splits, M)](
        x2, desc, scales, bias if bias is not None else scales, out, partials, M, n, K, per_split, x2.stride(0),
        out.stride(0), 255, BLOCK_N=bn, BW=bw, STAGES=cfg["STAGES"], SPLIT=splits > 1, X_DESC=False,
        HAS_BIAS=bias is not None, OUT_BF16=out.dtype == torch.bfloat16, INTERPRETED=interpreted, DEC=dec,
        **({"WAIT": True, "launch_pdl": True} if wait else {}), **opts)
