# fxforge dequant template on the tensor cores, nibble planes: y = x @ dequant(W)^T (+ bias) for a 4-bit
# integer weight W [N, K] -- the w4a16 family (uint4 + zero point, 16/32-bit float scales per group of 32 /
# 64 / 128) and nvint4 (int4, E4M3 scales per 16, tensor scale) -- codes packed by passes/quant/formats.py
# (byte j of a row: element 2j in bits 0-3, element 2j + 1 in bits 4-7); x in BLOCK_M-row tiles (16 for the
# GEMV, 64 above). Loaded by runtime/quant_linear.py for PLANES configs (opt-in).
# H100 (session 15; results/probe_gemv_planes.md, probe_gemm_m64_planes.md): slower than the defaults at every
# point, despite ~half the loop instructions: M = 1, 4096 x 14336 w4a16 g128 best 19.1 us vs the words GEMV's
# 17.6 (4096^2: 9.8 vs 7.0), nvint4 / mxfp4 / nvfp4 23-24 vs 18.4-21.3; M = 64 (4096^2) 15.1-16.5 vs the
# SWAP defaults' 14.4-15.1. So it stays opt-in: a tested tensor-core 4-bit path, not a default anywhere.
#
# Kernel
#   dequant_gemv_planes   "Swap AB": out^T [BLOCK_N weight rows, BLOCK_M rows of x] accumulated in fp32 by
#                         tl.dot on the tensor cores (mma M = weight rows: one real x row of 16 costs the
#                         MMA unit, not the CUDA cores). One step = one scale group of GB code bytes per row.
#                         The bytes are split into two "nibble planes" without interleaving (as KIVI's bit
#                         planes): the low nibbles are the even elements 2j, the high nibbles the odd ones
#                         2j + 1, so the group's dot is plane_lo @ x[2j]^T + plane_hi @ x[2j + 1]^T over the
#                         same [BLOCK_N, GB] byte tile -- no join / reshape of decoded codes, and the uint8
#                         tile reaches the MMA operand layout through Triton's cp.async + ldmatrix path.
#                         Decode (GPU, bf16 / fp16 x): one inline-PTX block per 4 code bytes (pack=4: one
#                         register) PRMTs bytes 0/1 and 2/3 into the two 16-bit halves, then per plane and
#                         pair one LOP3 ((t & 0xF) | base, shifted by 4 for the high plane; int4 codes XORed
#                         to offset binary in the same LOP3) gives base + c exactly (bf16 base 128, ulp 1;
#                         fp16 base 1024, ulp 1): ~1 instruction per code; minus base + z (the group's zero
#                         point, packed subtract) the code is c - z exactly, products with x exact, fp32 MMA
#                         accumulation, the group scale applied to the [BLOCK_N, BLOCK_M] partial (POST),
#                         the same math as the words GEMV up to the summation order. 16-element E4M3 groups
#                         (nvint4): STEP_B bytes per step (32 / 64), each element times its group's scale
#                         before the dot (int4 x E4M3 has at most 7 significant bits: exact in bf16 / fp16).
#                         Interpreter: the same values in fp32 (its low-precision dots are unreliable).
#                         Grid (N tiles, K splits, M tiles); with splits each writes fp32 partials [SPLITS,
#                         M, N] for dequant_splitk_reduce (dequant_matmul.py).
#                         Offline sm_90 loops (triton 3.6, instructions per weight element per thread):
#                         w4a16 g128 BLOCK_M 16: 32 rows x 1 warp 3.0, 64 x 1 2.7, 64 x 4 (wgmma) 4.7 --
#                         the words GEMV 5.4; nvint4 32-64 byte steps 4.4-4.9; BLOCK_M 64: w4a16 5.7-6.4.
#
# Bytes model: as the words GEMV (runtime/quant_linear.py bytes_model): 4096 x 14336, w4a16 g128, M = 1:
# 30.7 MB of codes, scales and zero points -> 10.3 us at 3.0 TB/s (measured: 19.1 us best, see above).
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import asm_byte_planes as _asm_byte_planes
from fxforge.codegen.quant_helpers import nibble_value as _nibble_value
from fxforge.codegen.quant_helpers import (
    pdl_launch_dependents as _pdl_launch_dependents,
)
from fxforge.codegen.quant_helpers import scale_value as _scale_value
from fxforge.codegen.quant_helpers import store_out as _store_out
from fxforge.codegen.quant_packed import group_bcast as _group_bcast


def _nibble_planes_asm(base: int, xor: int) -> str:
    """PTX: 4 code bytes ($4) -> low-nibble plane ($0, $1) and high-nibble plane ($2, $3), 16-bit pairs of
    base + c (c XOR-ed with xor first: int4 -> offset binary)."""
    lut = f"{(base | xor) * 0x10001:#010x}"
    return "\n".join([
        "{", ".reg .b32 t0, t1, u0, u1;",
        "prmt.b32 t0, $4, 0, 0x4140;", "prmt.b32 t1, $4, 0, 0x4342;",
        "shr.b32 u0, t0, 4;", "shr.b32 u1, t1, 4;",
        # (t & 0x000F000F) ^ (base | xor): the mask leaves base's bits zero, so XOR sets them (LOP3 0x6a: (a & b) ^ c)
        f"lop3.b32 $0, t0, 0x000f000f, {lut}, 0x6a;", f"lop3.b32 $1, t1, 0x000f000f, {lut}, 0x6a;",
        f"lop3.b32 $2, u0, 0x000f000f, {lut}, 0x6a;", f"lop3.b32 $3, u1, 0x000f000f, {lut}, 0x6a;", "}"])


_PLANES_BF16_U4 = tl.constexpr(_nibble_planes_asm(0x4300, 0))  # 128 + c
_PLANES_BF16_I4 = tl.constexpr(_nibble_planes_asm(0x4300, 8))  # 128 + (c ^ 8) = 136 + c (two's complement)
_PLANES_F16_U4 = tl.constexpr(_nibble_planes_asm(0x6400, 0))  # 1024 + c
_PLANES_F16_I4 = tl.constexpr(_nibble_planes_asm(0x6400, 8))


def _e2m1_planes_asm() -> str:
    """PTX: 4 e2m1 code bytes ($4) -> low / high nibble planes ($0, $1 / $2, $3) as bf16 pairs whose bits
    hold the code's exponent and mantissa at bits 7-8 / 6 and its sign at bit 15: 2^(e - 127)·(1 + m/2), or
    the subnormal m·2^-127 for e = 0 -- times 2^126 (done after) the e2m1 value exactly, as
    quant_packed.decode_e2m1_scaled_packed (the M = 64 SWAP decode, GPU-tested) does."""
    lines = ["{", ".reg .b32 t<2>, a, b;", "prmt.b32 t0, $4, 0, 0x4140;", "prmt.b32 t1, $4, 0, 0x4342;"]
    for out, (mag, sign) in enumerate([(6, 12), (6, 12), (2, 8), (2, 8)]):  # low nibbles of t0, t1; high ones
        t = f"t{out % 2}"
        lines += [f"shl.b32 a, {t}, {mag};", f"shl.b32 b, {t}, {sign};", "and.b32 b, b, 0x80008000;",
                  f"lop3.b32 ${out}, a, 0x01c001c0, b, 0xea;"]  # (a & magnitude mask) | sign
    return "\n".join(lines + ["}"])


_PLANES_BF16_E2M1 = tl.constexpr(_e2m1_planes_asm())


@triton.jit
def _nibble_planes(cb, ELEM: tl.constexpr, ACT: tl.constexpr, INTERPRETED: tl.constexpr):
    """uint8 code tile -> (low plane, high plane) as base + c' (c' = c, or c ^ 8 for int4): in the dot dtype
    on the GPU (bf16 base 128, fp16 base 1024; exact), in fp32 with base 0 in the interpreter; e2m1 codes
    (ELEM 3, bf16 only): their values exactly."""
    if INTERPRETED:
        c = cb.to(tl.int32)
        lo = c & 15
        hi = (c >> 4) & 15
        if ELEM == 3:
            return _nibble_value(lo, 3), _nibble_value(hi, 3)
        if ELEM == 2:
            lo = lo ^ 8
            hi = hi ^ 8
        return lo.to(tl.float32), hi.to(tl.float32)
    if ELEM == 3:
        lo, hi = _asm_byte_planes(cb, _PLANES_BF16_E2M1, True)
        return lo * 8.507059173023462e37, hi * 8.507059173023462e37  # 2^126 (exact, bf16 subnormals kept)
    if ACT == 2:
        lo, hi = _asm_byte_planes(cb, _PLANES_BF16_I4 if ELEM == 2 else _PLANES_BF16_U4, True)
    else:
        lo, hi = _asm_byte_planes(cb, _PLANES_F16_I4 if ELEM == 2 else _PLANES_F16_U4, False)
    return lo, hi


@triton.jit
def dequant_gemv_planes(x, codes, scales, zeros, tensor_scale, bias, out, partials,
                        M, N, K, KB, NB, KB_PER_SPLIT, s_xm, s_xk, s_cn, s_sn, s_zn, s_om, s_on,
                        ELEM: tl.constexpr, SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_TS: tl.constexpr,
                        STEP: tl.constexpr, GB: tl.constexpr, STEP_B: tl.constexpr, ACT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERPRETED: tl.constexpr,
                        PDL: tl.constexpr = False):
    # codes uint8 [N, KB] (KB = padded K / 2); scales [N, NB], one per group of GB bytes (SCALE 0: bf16 /
    # fp16 / fp32 values, 2: E4M3 bits); zeros uint8 [N, NB] (HAS_ZERO); ELEM 1: uint4 (minus the zero
    # point), 2: int4 two's complement; ACT 1: fp16 x, 2: bf16 x (the dot dtype). STEP_B code bytes per
    # step: GB (one group: its scale applied to the partial, POST) or a multiple of it (smaller groups: each
    # element scaled before the dot -- c·s is exact in bf16 for int4 times E4M3). Grid (N tiles, K splits,
    # M tiles); KB_PER_SPLIT a multiple of STEP_B.
    POST: tl.constexpr = STEP_B == GB
    if SPLIT:  # the split-K reduce may be scheduled now (it waits for this grid: quant_helpers.pdl_*)
        _pdl_launch_dependents(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rj = tl.arange(0, STEP_B)
    # base + offset of the planes' values: c - z = value - (BASE + z), int4: value - (BASE + 8)
    if INTERPRETED:
        BASE: tl.constexpr = 0.0
    elif ACT == 2:
        BASE: tl.constexpr = 128.0
    else:
        BASE: tl.constexpr = 1024.0
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    b_start = pid_k * KB_PER_SPLIT
    b_end = tl.minimum(b_start + KB_PER_SPLIT, KB)
    for b0 in range(b_start, b_end, STEP_B):
        g = b0 // GB
        cb = tl.load(codes + rn[:, None] * s_cn + (b0 + rj)[None, :], mask=n_ok[:, None] & (b0 + rj < b_end)[None, :],
                     other=0)  # [BLOCK_N, STEP_B]; a step past the row's last group (per-element path) reads 0
        # x[:, 2·b0 .. 2·b0 + 2·STEP_B) as stored (contiguous, vector loads), split in registers into the
        # even (low-nibble) and odd (high-nibble) elements, transposed to the dot's [STEP_B, BLOCK_M]
        kx = 2 * b0 + tl.arange(0, 2 * STEP_B)
        xv = tl.load(x + rm[:, None] * s_xm + kx[None, :] * s_xk, mask=m_ok[:, None] & (kx < K)[None, :], other=0.0)
        xe, xo = tl.split(tl.reshape(xv, (BLOCK_M, STEP_B, 2)))
        xe = tl.trans(xe)
        xo = tl.trans(xo)
        lo, hi = _nibble_planes(cb, ELEM, ACT, INTERPRETED)
        if HAS_ZERO:
            zq = tl.load(zeros + rn * s_zn + g, mask=n_ok, other=0).to(tl.float32) + BASE
        elif ELEM != 3:
            zq = tl.zeros((BLOCK_N,), dtype=tl.float32) + (BASE + (8.0 if ELEM == 2 else 0.0))
        if POST:
            s = _scale_value(tl.load(scales + rn * s_sn + g, mask=n_ok, other=0), SCALE)
        else:  # the step's STEP_B // GB groups, each scale repeated over its GB bytes of both planes
            gs = g + tl.arange(0, STEP_B // GB)
            s = _scale_value(tl.load(scales + rn[:, None] * s_sn + gs[None, :], mask=n_ok[:, None] & (gs < NB)[None, :],
                                     other=0), SCALE)
            s_el = _group_bcast(s, BLOCK_N, STEP_B, GB)
        if INTERPRETED:  # fp32 values and an IEEE dot: exact products, as the GPU's
            if ELEM == 3:  # e2m1 values as decoded
                wl = lo
                wh = hi
            else:
                wl = lo - zq[:, None]
                wh = hi - zq[:, None]
            if not POST:
                wl = wl * s_el
                wh = wh * s_el
            part = tl.dot(wl, xe.to(tl.float32), input_precision="ieee")
            part = tl.dot(wh, xo.to(tl.float32), part, input_precision="ieee")
        else:  # c - z exactly in the dot dtype (base + z is an integer below 2^8 / 2^11: exact)
            if ELEM == 3:
                wl = lo
                wh = hi
            else:
                zd = zq.to(lo.dtype)[:, None]
                wl = lo - zd
                wh = hi - zd
            if not POST:  # int4 / e2m1 times E4M3: at most 7 significant bits, exact in bf16
                wl = wl * s_el.to(lo.dtype)
                wh = wh * s_el.to(lo.dtype)
            part = tl.dot(wl, xe.to(lo.dtype))
            part = tl.dot(wh, xo.to(lo.dtype), part)
        if POST:
            acc += part * s[:, None]
        else:
            acc += part
    if HAS_TS:
        acc = acc * tl.load(tensor_scale)
    if STEP != 1.0:
        acc = acc * STEP
    res = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if SPLIT:
        tl.store(partials + (pid_k * M + rm[:, None]) * N + rn[None, :], res, mask=m_ok[:, None] & n_ok[None, :])
    else:
        _store_out(out, bias, res, rm, rn, M, N, s_om, s_on, HAS_BIAS, OUT_BF16, INTERPRETED)
