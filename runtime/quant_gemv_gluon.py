"""The Gluon 4-bit GEMV (codegen/templates/dequant_gemv_gluon.py): when it applies, its configs and its launch.

Launched with programmatic dependent launch, it fetches its whole slice of the weight into shared memory before
griddepcontrol.wait (the words GEMV can hold only its first step, in registers). ``runtime/quant_linear.py`` runs
it for GEMV configs with ``GLUON`` set; a config it does not apply to (another format, K not a multiple of the
group, a GPU other than sm_90, a triton without Gluon, fp16 / fp32 activations) runs the next config that is not
GLUON instead and records why in SKIPPED.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .kernels import cuda_capability, device_index, template_kernels

GEMV_GLUON_TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "dequant_gemv_gluon.py"
GEMV_GLUON_KERNELS = ("dequant_gemv_gluon",)
# BLOCK_N rows x BG scale groups per TMA box, STAGES boxes in flight (all of them fetched before the wait)
DEFAULT_CONFIG = {"BLOCK_M": 1, "GLUON": True, "BLOCK_N": 16, "BG": 8, "STAGES": 4, "num_warps": 4, "num_stages": 1,
                  "WAIT": True}
MAX_BOX = 256  # TMA box limit per dimension
# (fmt, M, N, K, device type) -> why a GLUON GEMV config ran another kernel instead (last reason wins)
SKIPPED: dict = {}


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    return dict(zip(GEMV_GLUON_KERNELS, template_kernels(str(GEMV_GLUON_TEMPLATE), GEMV_GLUON_KERNELS, device_type,
                                                         env_cache_dir())))


def format_ok(kf: dict) -> bool:
    """uint4 codes with a zero point and a bf16 scale per group of a multiple of 32 (w4a16)."""
    return (kf["ELEM"] == 1 and kf["EPB"] == 2 and not kf["PER_ROW"] and kf["SCALE"] == 0 and kf["HAS_ZERO"]
            and not kf["HAS_TS"] and kf["STEP"] == 1.0 and (kf["GB"] * 2) % 32 == 0)


def why_not(kf: dict, x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros) -> str | None:
    """None when the Gluon GEMV can run these tensors, else the reason it cannot."""
    if not format_ok(kf):
        return "format is not uint4 with zero points and bf16 group scales of 32k elements (w4a16)"
    group = kf["GB"] * 2
    K = x2.shape[1]
    if K % group:
        return f"K = {K} is not a multiple of the group ({group})"
    if x2.device.type != "cuda" or torch.version.hip is not None:
        return "Gluon kernels run on NVIDIA CUDA only"
    if x2.dtype != torch.bfloat16:
        return "activations are not bf16"
    if cuda_capability(device_index(x2.device))[0] != 9:
        return "the kernel is built for sm_90 (TMA, Gluon layouts)"
    try:
        from triton.experimental.gluon import language as gl  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return "triton has no Gluon"
    if codes.dtype != torch.uint8 or codes.stride(1) != 1 or codes.stride(0) % 16 or codes.data_ptr() % 16:
        return "code rows are not uint8, 16-byte aligned and contiguous"
    if scales.dtype != torch.bfloat16 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        return "group scales are not bf16 / scales or zero points not contiguous along K"
    # TMA: 16-byte aligned bases and row strides
    if (scales.stride(0) * 2) % 16 or zeros.stride(0) % 16 or scales.data_ptr() % 16 or zeros.data_ptr() % 16:
        return "scale / zero-point rows are not 16-byte aligned (K / group a multiple of 16)"
    return None


def check_config(cfg: dict, kf: dict) -> None:
    bn, bg, st, w = cfg["BLOCK_N"], cfg["BG"], cfg["STAGES"], cfg.get("num_warps", 4)
    gw = kf["GB"] * 2 // 8
    lanes_g = 32 // (gw // 4)
    if bn < w or bn % w or bn > MAX_BOX or bg % lanes_g or bg > MAX_BOX or st < 1:
        raise ValueError(f"quant_linear: GLUON GEMV configs need BLOCK_N a multiple of num_warps, BG a multiple of "
                         f"{lanes_g} (groups of {gw} words), STAGES >= 1 and boxes <= {MAX_BOX}, got {cfg}")


def launch(x2, codes, scales, zeros, bias, out, kf: dict, cfg: dict, plan, pdl: bool = False,
           wait: bool = False) -> tuple[int, torch.Tensor]:
    """y = x2 @ dequant(W)^T (+ bias) into ``out`` [M, N] (one split), or fp32 partials [splits, M, N] the caller
    reduces. ``plan(programs, kb, step)`` is quant_linear's split planner over scale groups (-> splits, groups per
    split, partials). ``pdl``: the reduce will be launched with programmatic dependent launch (the kernel signals it
    early). ``wait``: the kernel itself launched with PDL, its first STAGES code boxes fetched before
    griddepcontrol.wait (no kernel before it may write the codes). Returns (splits, partials)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    check_config(cfg, kf)
    M, K = x2.shape
    n = codes.shape[0]
    nb = scales.shape[1]
    gw = kf["GB"] * 2 // 8
    words = codes.view(torch.int32).view(n, -1)[:, : nb * gw].reshape(n, nb, gw)
    bn, bg = cfg["BLOCK_N"], cfg["BG"]
    splits, per, partials = plan(-(-n // bn) * M, nb, bg)
    w_desc = TensorDescriptor.from_tensor(words, [bn, bg, gw], _smem_layout(32, 3))
    dummy = scales
    ck = kernels_for("cuda")["dequant_gemv_gluon"][(-(-n // bn), splits, M)](
        w_desc, x2, scales, zeros, bias if bias is not None else dummy, out, partials, M, n, K, nb, per,
        x2.stride(0), scales.stride(0), zeros.stride(0), out.stride(0), 15, STAGES=cfg["STAGES"],
        SPLIT=splits > 1, HAS_BIAS=bias is not None and splits == 1, WAIT=wait, PDL=pdl and splits > 1,
        num_warps=cfg.get("num_warps", 4), **({"launch_pdl": True} if wait else {}))
    if cfg.get("CARVEOUT") is not None:
        _set_carveout(ck, cfg["CARVEOUT"])
    return splits, partials


_CARVED: dict = {}


def _set_carveout(ck, percent: int) -> None:
    """The preferred shared-memory carveout of a compiled kernel (CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
    percent of the maximum): with room for more than this kernel's own programs, the next kernel's programs (launched
    with PDL) can sit beside them."""
    import ctypes

    fn = getattr(ck, "function", None)
    if fn is None or _CARVED.get(fn) == percent:
        return
    lib = ctypes.CDLL("libcuda.so.1")
    rc = lib.cuFuncSetAttribute(ctypes.c_void_p(fn), ctypes.c_int(9), ctypes.c_int(percent))
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute(carveout) failed: {rc}")
    _CARVED[fn] = percent


@functools.lru_cache(maxsize=8)
def _smem_layout(bits: int, rank: int):
    """Unswizzled shared layout of a TMA box (threads read the code words 16 contiguous bytes at a time)."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=rank)
