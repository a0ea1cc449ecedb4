"""The tensor-core w4a16 GEMV (codegen/templates/dequant_gemv_mma.py, Gluon + inline mma.sync): when it applies, its
configs and its launch.

``runtime/quant_linear.py`` runs it for GEMV configs with ``MMA`` set. A case it does not apply to (a format other
than uint4 + zero point with bf16 scales per 128, an fp32 activation, K not a multiple of 8, unaligned rows, a GPU
below sm_80, a triton without Gluon, the interpreter) runs the next config that is not MMA and records why in SKIPPED.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .kernels import cuda_capability, device_index, template_kernels

MMA_TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "dequant_gemv_mma.py"
MMA_KERNELS = ("dequant_gemv_mma",)
GROUP = 128  # elements per scale group the kernel takes (one mma chain of 8 per thread and group)
# QW: groups per warp per step; PREFETCH: steps of code words held in registers ahead; WAIT: launched with PDL, the
# first PREFETCH steps' code words loaded before griddepcontrol.wait; AUX: x, zero points and scales loaded a step
# ahead; ADJ: a warp's QW groups of a step adjacent. H100, 20 launches per CUDA graph, bf16 x
# (results/probe_gemv_mma_r5.md .. _r10_m4.md, against the words GEMV in the same run): 4 warps, QW 1, PREFETCH 1,
# AUX: M = 1 14336 x 4096 14.25-14.8 us against 16.1, 32000 x 2048 15.7 against 18.7, 8192 x 4096 10.3 against 10.0;
# M = 4: 14336 rows 40.7 against 55.4 (PREFETCH 2 without AUX: 14.1-14.3 at 14336 rows, but 11.7 at 8192 and 17.3 at
# 32000). More warps, QW, PREFETCH 3-4 or a cp.async ring (r6; since removed) took registers / shared memory that cost
# the 14336-row grid its single wave (896 programs) and were slower (16-22 us). 4096^2: the best config 6.0 us (8
# warps, 2 adjacent groups per warp), the default 7.8, against 5.5-5.7; K = 14336 (4096 rows): the default 24.3
# against 14.3. quant_configs.gemv_configs picks it accordingly.
DEFAULT_CONFIG = {"MMA": True, "QW": 1, "PREFETCH": 1, "WAIT": True, "AUX": True, "num_warps": 4}
# (fmt, M, N, K, device type) -> why an MMA config ran another kernel instead (last reason wins)
SKIPPED: dict = {}


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    return dict(zip(MMA_KERNELS, template_kernels(str(MMA_TEMPLATE), MMA_KERNELS, device_type, env_cache_dir())))


def format_ok(kf: dict) -> bool:
    """uint4 codes with integer zero points and 16/32-bit float scales per 128 elements (w4a16_g128)."""
    return (kf["EPB"] == 2 and kf["ELEM"] == 1 and kf["HAS_ZERO"] and kf["SCALE"] == 0 and not kf["PER_ROW"]
            and kf["GB"] * kf["EPB"] == GROUP)


def why_not(kf: dict, x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros) -> str | None:
    """None when the MMA GEMV can run these tensors, else the reason it cannot."""
    if not format_ok(kf):
        return f"format is not uint4 with zero points and scales per {GROUP} (w4a16_g{GROUP})"
    if scales.dtype != torch.bfloat16 or zeros is None or zeros.dtype != torch.uint8:
        return "scales are not bf16 / zero points not uint8"
    if x2.dtype not in (torch.bfloat16, torch.float16):
        return "activations are not bf16 / fp16"
    if x2.shape[1] % 8:
        return "K is not a multiple of 8 (x is read as 16-byte runs of 8 elements)"
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) % 8) or x2.data_ptr() % 16:
        return "x rows are not 16-byte aligned and contiguous"
    if codes.stride(1) != 1 or codes.stride(0) % 16 or codes.data_ptr() % 16 or codes.shape[1] != scales.shape[1] * 64:
        return "code rows are not 16-byte aligned whole groups"
    if scales.stride(1) != 1 or zeros.stride(1) != 1:
        return "scales / zero points are not contiguous along K"
    if x2.device.type != "cuda" or torch.version.hip is not None:
        return "Gluon kernels run on NVIDIA CUDA only"
    if cuda_capability(device_index(x2.device))[0] < 8:
        return "mma.sync m16n8k16 bf16 needs sm_80+"
    try:
        from triton.experimental.gluon import language as gl  # noqa: F401
    except ImportError:
        return "triton has no Gluon"
    return None


def check_config(cfg: dict) -> None:
    w, qw, pf = cfg.get("num_warps", 4), cfg.get("QW", 1), cfg.get("PREFETCH", 1)
    if w not in (1, 2, 4, 8, 16) or qw not in (1, 2, 4) or pf not in (1, 2, 3, 4):
        raise ValueError(f"quant_linear: MMA configs need num_warps 1/2/4/8/16, QW 1/2/4, PREFETCH 1..4, got {cfg}")


def run(x2, codes, scales, zeros, bias, out, cfg: dict, wait: bool) -> str | None:
    """``launch``, or the reason it could not: a compile error of the Gluon kernel (an API this Triton lacks) is
    returned for the caller to record and fall back on, not raised from the user's model."""
    from triton.compiler.errors import CompilationError

    try:
        launch(x2, codes, scales, zeros, bias, out, cfg, wait)
    except CompilationError as e:
        return f"the Gluon kernel did not compile: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:200]}"
    return None


def launch(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias, out: torch.Tensor,
           cfg: dict, wait: bool) -> torch.Tensor:
    """y = x2 @ dequant(W)^T (+ bias) into ``out`` [M, N]: one program per 16 weight rows and row of x, its warps
    splitting K by groups. ``wait``: launched with programmatic dependent launch, the first steps' code words read
    before griddepcontrol.wait (the codes must not be written by the kernel ahead of this one)."""
    check_config(cfg)
    M, n = out.shape
    K = x2.shape[1]
    NB = scales.shape[1]
    w, qw = cfg.get("num_warps", 4), cfg.get("QW", 1)
    even = n % 16 == 0 and NB % (w * qw) == 0 and K == NB * GROUP
    kw = {"launch_pdl": True} if wait else {}
    kernels_for("cuda")["dequant_gemv_mma"][(-(-n // 16), 1, M)](
        x2.view(torch.int32), codes.view(torch.int32), scales, zeros, bias if bias is not None else scales, out, n, NB,
        K // 2, x2.stride(0) // 2 if M > 1 else 0, codes.stride(0) // 4, scales.stride(0), zeros.stride(0), out.stride(0), QW=qw,
        BF16=x2.dtype == torch.bfloat16, HAS_BIAS=bias is not None, EVEN=even, PREFETCH=cfg.get("PREFETCH", 1),
        WAIT=wait, num_warps=w, AUX=bool(cfg.get("AUX", True)), ADJ=bool(cfg.get("ADJ", False)), **kw)
    return out
