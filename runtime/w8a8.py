"""W8A8 linear layers: int8 weights per output channel, dynamic per-token int8 activations, an int8 x int8 ->
int32 tensor-core GEMM with a rescale epilogue (issue 4), run by the Triton kernels of
``codegen/templates/int8_matmul.py`` (GPU, or the CPU interpreter). The graph-level op is

    fxforge::w8a8_linear(Tensor x, Tensor w_codes, Tensor w_scale, Tensor? smooth, Tensor? bias) -> Tensor

``x [..., K]`` fp16 / bf16 / fp32; ``w_codes int8 [N, K]`` and ``w_scale fp32 [N]`` (symmetric per-channel,
``w ~= w_codes * w_scale[:, None]``; the weight is already multiplied by the SmoothQuant factors along K);
``smooth fp32 [K]`` the SmoothQuant factors s (x is divided by them on the fly) or None; ``bias [N]`` float
or None. The output has x's dtype and shape ``[..., N]``. passes/quant/smoothquant.py builds these tensors
(``w8a8_quantize_linear``) and the ``W8A8Linear`` module that calls the op, so ``torch.export`` captures it
and fxforge runs it as a library op.

The math (``reference`` computes it with the activation quantization in fp32, as the kernel does, and the
rest in float64):
    xs = x.float() * (1 / smooth)           (fp32, reciprocal by IEEE division; skipped without smoothing)
    x_scale[m] = amax_k |xs[m, k]| / 127    (fp32; 0 for an all-zero row)
    a[m, k] = clamp(rint(xs * (127 / amax_k |xs[m, k]|)), -127, 127) int8   (0 for an all-zero row)
    y = (a @ w_codes^T)[int32] * x_scale[m] * w_scale[n] + bias[n]

Launches: M > FUSED_MAX_M: ``w8a8_quantize_act`` (codes + scales to memory) then ``w8a8_gemm``; smaller M
(decode): ``w8a8_gemm`` alone, each program quantizing its x rows itself (same code, bit-identical codes).

Configs (``gemm_configs``, first = default): a few tensor-core tiles for the GPU (untuned guesses until the
H100 run measures them; small M uses BLOCK_M = 16, the smallest int8 tl.dot tile, and narrow N tiles so
a 4096-wide layer still spreads over the 132 SMs) and one tiny-tile config for the interpreter.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .kernels import interpreter_active, next_pow2, template_kernels

TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "int8_matmul.py"
KERNELS = ("w8a8_quantize_act", "w8a8_gemm")
HBM_TBPS = 3.0  # H100 SXM achievable HBM bandwidth used by the bytes model
INT8_TOPS = 1500.0  # H100 SXM dense int8 tensor-core throughput assumed achievable (spec sheet: 1,979)
FUSED_MAX_M = 16  # up to this many rows the GEMM quantizes x itself (one launch; x is re-read from L2)
MAX_K = 2**31 // 127**2  # int32 accumulation of 127 * 127 products is exact up to this K
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def template_source() -> str:
    return TEMPLATE.read_text()


def kernels_for(device_type: str) -> dict:
    from fxforge.config import cache_dir as env_cache_dir

    return dict(zip(KERNELS, template_kernels(str(TEMPLATE), KERNELS, device_type, env_cache_dir())))


# ------------------------------------------------------------------------------------------- bytes model
def bytes_model(N: int, K: int, M: int = 1, act_bytes: int = 2, smooth: bool = False, bias: bool = False,
                fused: bool | None = None) -> dict:
    """HBM bytes the launches move (header of the template) and the expected time at ``HBM_TBPS`` and at
    ``INT8_TOPS``; the slower of the two is the bound. ``fused`` (default M <= FUSED_MAX_M): x quantized
    inside the GEMM, so no int8 codes / scales round trip through memory (x re-reads hit L2)."""
    fused = M <= FUSED_MAX_M if fused is None else fused
    weights = N * K + 4 * N + (4 * K if smooth else 0) + (act_bytes * N if bias else 0)
    acts = act_bytes * M * K + (0 if fused else 2 * (M * K + 4 * M)) + act_bytes * M * N
    total = weights + acts
    mem_us = total / (HBM_TBPS * 1e12) * 1e6
    compute_us = 2 * M * N * K / (INT8_TOPS * 1e12) * 1e6
    return {"format": "w8a8", "N": N, "K": K, "M": M, "fused": fused, "weight_bytes": weights, "act_bytes": acts,
            "total_bytes": total, "expected_us": max(mem_us, compute_us), "memory_us": mem_us,
            "compute_us": compute_us, "bound": "memory" if mem_us >= compute_us else "compute"}


# ---------------------------------------------------------------------------------------------- configs
def quantize_configs(M: int, K: int, interpreted: bool) -> list[dict]:
    """Activation-quantization launch configs, default first: BLOCK_M rows per program, BLOCK_K per step."""
    if interpreted:
        return [{"BLOCK_M": min(next_pow2(max(M, 1)), 16), "BLOCK_K": 64}]
    bk = min(next_pow2(K), 2048)
    return [{"BLOCK_M": 1, "BLOCK_K": bk, "num_warps": 4}, {"BLOCK_M": 4, "BLOCK_K": min(bk, 1024), "num_warps": 8},
            {"BLOCK_M": 1, "BLOCK_K": min(bk, 1024), "num_warps": 2}]


SMEM_LIMIT = 232448  # bytes of shared memory per block on the H100 (227 KB)


def smem_bytes(cfg: dict, fused: bool) -> int:
    """Shared memory of the GEMM's pipelined operand tiles: num_stages x (x tile + weight tile); the fused
    kernel stages x in its 16-bit dtype, the unfused one int8 codes. (H100: 128 x 128 x 256 at 4 stages
    needed 262144 B, over the limit: it failed with OutOfResources for M > 64.)"""
    a = cfg["BLOCK_M"] * cfg["BLOCK_K"] * (2 if fused else 1)
    return cfg["num_stages"] * (a + cfg["BLOCK_N"] * cfg["BLOCK_K"])


def gemm_configs(M: int, N: int, K: int, interpreted: bool, fused: bool | None = None) -> list[dict]:
    """Tensor-core configs, default first (int8 tl.dot needs BLOCK_M, BLOCK_N >= 16 and BLOCK_K >= 32).
    On the GPU each config's stages are cut until its tiles fit in shared memory (``smem_bytes``, for the
    fused kernel when ``fused``; None: as w8a8_linear_apply decides, M <= FUSED_MAX_M)."""
    if interpreted:
        return [{"BLOCK_M": 16 if M <= 16 else 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}]
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    bn = 32 if M <= 64 else 128  # small M: more N tiles to fill the SMs
    out = []
    # M <= 64 (one M tile): 4096 / 32 = 128 programs, 256-byte K steps (the first H100 list had 64 x 64
    # tiles at M = 64: 64 programs for 132 SMs); narrower still (16) as the last small-M option
    cands = ((bm, bn, 256, 4, 4), (bm, bn, 128, 4, 4), (bm, 2 * bn, 128, 4, 3), (bm, max(bn // 2, 16), 256, 4, 4),
             (max(bm, 64), 128, 128, 8, 3))
    fused = M <= FUSED_MAX_M if fused is None else fused
    for m_, n_, k_, w, st in cands:
        cfg = {"BLOCK_M": m_, "BLOCK_N": n_, "BLOCK_K": k_, "GROUP_M": 8, "num_warps": w, "num_stages": st}
        while cfg["num_stages"] > 2 and smem_bytes(cfg, fused) > SMEM_LIMIT:
            cfg["num_stages"] -= 1
        if smem_bytes(cfg, fused) <= SMEM_LIMIT and cfg not in out:
            out.append(cfg)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -------------------------------------------------------------------------------------------- checking
def check_inputs(x, w_codes, w_scale, smooth, bias) -> None:
    """ValueError naming what does not match the op's layout."""
    for name, t in (("x", x), ("w_codes", w_codes), ("w_scale", w_scale), ("smooth", smooth), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"w8a8_linear: {name} must be a tensor, got {type(t).__name__}")
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"w8a8_linear: x dtype {x.dtype} not supported (float16, bfloat16, float32)")
    if w_codes.dim() != 2 or w_codes.dtype != torch.int8:
        raise ValueError(f"w8a8_linear: w_codes must be int8 [N, K], got {w_codes.dtype} {tuple(w_codes.shape)}")
    n, k = w_codes.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"w8a8_linear: x must be [..., K={k}], got shape {tuple(x.shape)}")
    if k > MAX_K:
        raise ValueError(f"w8a8_linear: K={k} exceeds {MAX_K}, where the int32 accumulator could overflow")
    if tuple(w_scale.shape) != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"w8a8_linear: w_scale must be float32 [{n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if smooth is not None and (tuple(smooth.shape) != (k,) or smooth.dtype != torch.float32):
        raise ValueError(f"w8a8_linear: smooth must be float32 [{k}], got {smooth.dtype} {tuple(smooth.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.is_floating_point()):
        raise ValueError(f"w8a8_linear: bias must be a float [{n}] vector, got {bias.dtype} {tuple(bias.shape)}")
    devs = {t.device for t in (x, w_codes, w_scale, smooth, bias) if t is not None}
    if len(devs) > 1:
        raise ValueError(f"w8a8_linear: tensors on different devices {sorted(map(str, devs))}")


# ------------------------------------------------------------------------------------------- references
def reference_quantize_activations(x2: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes [M, K] and fp32 scales [M] of ``x2 [M, K]``, in fp32 exactly as the kernel rounds
    (IEEE products and reciprocals, round half to even), so codes are bit-identical to the kernels'."""
    xs = x2.float()
    if smooth is not None:
        xs = xs * (torch.ones_like(smooth, dtype=torch.float32) / smooth.float())  # a true division, as the kernel
    amax = xs.abs().amax(dim=1) if xs.shape[1] else xs.new_zeros(xs.shape[0])
    # a tensor divisor: torch's CUDA division by a Python scalar multiplies by its reciprocal (last-ulp
    # differences from the kernel's IEEE division, seen on the H100); by a tensor it divides
    scale = amax / torch.full_like(amax, 127.0)
    # 127 / amax as a true division: Python-scalar / tensor is reciprocal(tensor) * scalar in torch (two
    # roundings: a code differed from the kernel's in ~1 of 1.2M elements on the H100)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    q = torch.round(xs * inv[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale


def reference(x, w_codes, w_scale, smooth, bias) -> torch.Tensor:
    """The op's math: activations quantized in fp32 (``reference_quantize_activations``), then the integer
    matmul, the rescale and the bias in float64 (exact products and sums up to the final cast); x's dtype."""
    n, k = w_codes.shape
    x2 = x.reshape(-1, k)
    codes, scale = reference_quantize_activations(x2, smooth)
    y = reference_float64(codes, scale, w_codes, w_scale, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def reference_float64(codes, x_scale, w_codes, w_scale, bias) -> torch.Tensor:
    """``(codes @ w_codes^T) * x_scale[:, None] * w_scale[None, :] + bias`` in float64, [M, N]."""
    acc = codes.double() @ w_codes.double().T  # integers below 2^53: exact
    y = acc * x_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y


# -------------------------------------------------------------------------------------------- launching
def quantize_activations(x2: torch.Tensor, smooth: torch.Tensor | None, *, config: dict | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``w8a8_quantize_act`` on ``x2 [M, K]``: (int8 codes [M, K], fp32 scales [M])."""
    M, K = x2.shape
    codes = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    scales = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return codes, scales
    if K == 0:
        return codes, scales.zero_()
    interpreted = x2.device.type == "cpu"
    cfg = dict(config or quantize_configs(M, K, interpreted)[0])
    if interpreted:
        cfg.pop("num_warps", None)
    smooth_arg = smooth.contiguous() if smooth is not None else scales
    kernels_for(x2.device.type)["w8a8_quantize_act"][(_cdiv(M, cfg["BLOCK_M"]),)](
        x2, smooth_arg, codes, scales, M, K, x2.stride(0), x2.stride(1), codes.stride(0),
        HAS_SMOOTH=smooth is not None, INTERPRETED=interpreted, **cfg)
    return codes, scales


def w8a8_linear_apply(x, w_codes, w_scale, smooth=None, bias=None, *, config: dict | None = None,
                      quant_config: dict | None = None, fuse: bool | None = None, check: bool = True) -> torch.Tensor:
    """Run the kernels. ``config``: a dict from ``gemm_configs`` (default: its first); ``quant_config``: one
    from ``quantize_configs``; ``fuse``: quantize x inside the GEMM (one launch) instead of a separate
    ``w8a8_quantize_act`` launch (None: for M <= FUSED_MAX_M). Benchmarks call this directly to try both."""
    if check:
        check_inputs(x, w_codes, w_scale, smooth, bias)
    n, k = w_codes.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    M = x2.shape[0]
    out = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if M == 0 or n == 0:
        return out.reshape(*lead, n)
    if x.device.type == "cpu" and not interpreter_active():
        return reference(x, w_codes, w_scale, smooth, bias)
    interpreted = x.device.type == "cpu"
    fuse = M <= FUSED_MAX_M if fuse is None else fuse
    if fuse:
        codes, x_scale = torch.empty((1, 1), dtype=torch.int8, device=x.device), w_scale  # unused placeholders
    else:
        codes, x_scale = quantize_activations(x2, smooth, config=quant_config)
    w_codes, w_scale = w_codes.contiguous(), w_scale.contiguous()
    smooth = smooth.contiguous() if smooth is not None else None
    bias = bias.contiguous() if bias is not None else None
    cfg = dict(config or gemm_configs(M, n, k, interpreted, fused=fuse)[0])
    if interpreted:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"w8a8_linear: {key} must be a power of two >= 16 (int8 tl.dot), got {v}")
    grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]),)
    kernels_for(x.device.type)["w8a8_gemm"][grid](
        codes, x_scale, x2, smooth if smooth is not None else w_scale, w_codes, w_scale,
        bias if bias is not None else w_scale, out, M, n, k, codes.stride(0), x2.stride(0), x2.stride(1),
        w_codes.stride(0), out.stride(0), out.stride(1), FUSE_QUANT=fuse, HAS_SMOOTH=smooth is not None,
        HAS_BIAS=bias is not None, OUT_BF16=x.dtype == torch.bfloat16, INTERPRETED=interpreted, **cfg)
    return out.reshape(*lead, n)


# ------------------------------------------------------------------------------------------- the graph op
@torch.library.custom_op("fxforge::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, smooth: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 ``x @ W^T + bias`` (module docstring); W = w_codes * w_scale[:, None] / smooth[None, :]."""
    return w8a8_linear_apply(x, w_codes, w_scale, smooth, bias)


@w8a8_linear.register_fake
def _(x, w_codes, w_scale, smooth, bias):
    check_inputs(x, w_codes, w_scale, smooth, bias)
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]))
