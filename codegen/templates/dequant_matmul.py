# fxforge dequant-matmul template: y = x @ dequant(W)^T (+ bias) for a weight W [N, K] stored in a packed
# layout of passes/quant/formats.py (codes [N, Kp * bits / 8], scales [N, nb], optional zero points
# [N, nb] and per-tensor fp32 scale). Loaded by runtime/quant_linear.py; the kernels never materialize
# the dequantized weight in memory: each K tile of codes is decoded in registers.
#
# Kernels
#   dequant_gemv          M = 1..16 rows (decode). CUDA-core dot products, as the GEMV branch of
#                         codegen/emit_matmul.py: each program streams BLOCK_N weight rows along K (BLOCK_KB
#                         bytes of codes per row per step), decodes them and accumulates x·w in fp32 (a
#                         [BLOCK_M, BLOCK_N, BLOCK_KB] accumulator reduced once at the end for M <= 4, a
#                         per-step reduction above). PREFETCH (default): the next step's code bytes and x
#                         are loaded before the current step is decoded (two tiles in flight per program:
#                         Triton's pipeliner leaves this loop alone, num_stages changes nothing in its SASS).
#                         Grid (N tiles, K splits, M tiles). With K splits > 1
#                         each split writes fp32 partials [SPLITS, M, N] and dequant_splitk_reduce sums
#                         them in split order (deterministic), adds the bias and casts.
#   dequant_gemm          larger M: tensor cores (tl.dot). Grid (M tiles x N tiles, K splits; split-K
#                         partials reduced as for the GEMV). The B tile is decoded once per K step for all
#                         BLOCK_M rows, cast to the activation dtype (bf16 / fp16; fp32 stays fp32 with IEEE
#                         dots) and fed to tl.dot against x; fp32 accumulation, grouped tile order;
#                         PREFETCH as in the GEMV (code tiles only: x feeds tl.dot and is pipelined).
#                         SWAP ("swap AB"): acc^T [BLOCK_N, BLOCK_M] += w @ x^T, the decoded weight tile is
#                         the register A operand of wgmma (no shared-memory round trip; BLOCK_N >= 64 is the
#                         wgmma M side), x^T the cp.async-pipelined B operand, transposed once at the end.
#                         ptxas sm_90 (Triton 3.9, M=64, 128 x 128 / 64 x 64 bytes): 103-200 registers, no
#                         spills for every format; PREFETCH=False lets Triton pipeline the code tiles too.
#                         On the GPU with 16-bit activations the SWAP tile of uint4 + zero point (POST),
#                         int4 (nvint4) and e2m1 (mxfp4 / nvfp4, bf16) codes is decoded straight to the dot
#                         dtype in packed pairs (codegen/quant_packed.py: BASE | c minus BASE + z; e2m1 via a
#                         bf16 subnormal and one multiply by 2^126), the same values as the fp32 decode;
#                         the per-element-scaled ones (MXINT8 too) load their group scales a K step ahead.
#                         DECODE_AHEAD (per-element scales, no zero points): the next step's tile is decoded
#                         in this step; wgmma then reads the loop-carried tile from shared memory. Offline
#                         sm_90 SASS (triton 3.6): the 4-warp SWAP tiles of these formats otherwise issue
#                         their wgmmas one at a time (ptxas reuses one A-register quad and waits after each),
#                         with DECODE_AHEAD not, and their loops are ~20% shorter; not yet timed on a GPU.
#                         H100, M = 64, 4096^2 (results/quant_gpu.md; bf16 cuBLAS 14.95 us): w8a16 13.9,
#                         w4a16 14.7, mxfp4 14.5, nvfp4 15.2, nvint4 15.5, mxint8 17.1 us (session 11).
#   dequant_splitk_reduce sums split-K partials, adds the bias, casts to the output dtype (also for
#                         dequant_gemv_words). Launched with programmatic dependent launch (PDL config key,
#                         default on): the kernel before it lets it be scheduled at once and it waits in
#                         griddepcontrol.wait, hiding its launch gap (H100, M = 64: 0.2-0.6 us of 14-17). It
#                         signals its own dependents before that wait, so a GEMV with WAIT after it starts
#                         loading its first code words while the GEMV before the reduce still runs.
#                         A reduce fused into the GEMM (last split of a tile sums, Marlin-style counters)
#                         was slower (results/probe_gemm_m64_fused.md).
# The GEMV on int32 words of codes (WORDS configs, first for M <= 4 on the GPU) is dequant_gemv_words.py;
# the decode / scale / epilogue helpers both templates use are in codegen/quant_helpers.py.
#
# Work is indexed in "byte columns" j of the codes: one byte holds EPB elements (1 for 8-bit codes, 2 for
# 4-bit: element k = 2j in the low nibble, k = 2j + 1 in the high nibble). x is loaded contiguously per K
# step ([BLOCK_M, EPB * BLOCK_KB]) and, for 4-bit codes, split into even / odd elements (GEMV) or the
# decoded nibbles are joined back into element order (GEMM: one tl.dot of K = 2 * BLOCK_KB). A scale group
# of G elements is GB = G / EPB byte columns; BLOCK_KB <= GB: the tile lies inside one group (one scale per
# row), else the tile is viewed as [BLOCK_N, BLOCK_KB / GB, GB] (BLOCK_KB a multiple of GB).
#
# Group scales (POST, default): applied after the partial dot of the *unscaled* codes, once per (row,
# group): GEMV sum over each group then x scale; GEMM (tile inside one group) acc += dot(x, q - z) * s. A
# zero point z is folded into the bit-trick decode's constant, (2^23 + q) - (2^23 + z): free per element.
# POST=False scales every element before the dot.
#
# Decoding (exact, integer bit operations only: int -> float conversions are 1/8 of the FP32 rate on the
# H100, so codes become floats as the bits of 2^23 + c minus 2^23):
#   elements  int8 (w8a16, mxint8) signed byte (one XOR of the zero-extended byte with 0x4B000080; MXINT8
#             scaled per element: one FFMA, (2^23 + c + 128)·2^e - (2^23 + 128)·2^e, exact for e <= 104);
#             uint4 nibble (minus the group's integer zero point); int4 (nvint4) two's complement nibble;
#             e2m1 (mxfp4, nvfp4) and e4m3 (w8a16_fp8, mxfp8): the code's bits moved into an fp32 whose
#             zero exponent is a subnormal, times 2^126 / 2^120 (exact, no selects; mul.f32 keeps
#             subnormals).
#   scales    bf16 / fp32 loaded as floats; E8M0 code c -> 2^(c - 127) built as the fp32 bits c << 23
#             (c = 0 -> 2^-127); E4M3 decoded in-kernel from the stored uint8 bits (1 byte per scale,
#             the storage counted by metrics.bytes_per_weight: nothing is pre-decoded at pack time).
#   per-output-channel scales (w8a16), the per-tensor scale (NV formats) and the MXINT8 element step
#   2^-6 are applied once to the fp32 accumulator, not per element.
#
# Bytes model (M rows, weight N x K): bytes = N * K * bytes_per_weight(fmt, K, N) (codes with K padded to
# the block, scales, zero points, tensor scale; passes/quant/metrics.py) + M * K * act_bytes (x) + M * N *
# out_bytes (y) + split-K partials 2 * SPLITS * M * N * 4. Weight-only formats are bandwidth-bound up to
# M ~ 16 on the H100 (dequant costs a few integer ops per byte). Expected time at 3.0 TB/s, M = 1, bf16 x / y:
#   format        4096 x 4096           N x K = 14336 x 4096 (the 4096 x 14336 down projection: +-0.1%)
#   bf16 (ref)    33.57 MB  11.19 us    117.48 MB  39.16 us
#   w8a16         16.80 MB   5.60 us     58.79 MB  19.60 us
#   w4a16_g128     8.80 MB   2.93 us     30.77 MB  10.26 us     (0.5 + 3/128 bytes per weight)
#   w4a16_g64      9.19 MB   3.06 us     32.15 MB  10.72 us
#   w4a16_g32      9.98 MB   3.33 us     34.90 MB  11.63 us
#   mxint8        17.32 MB   5.77 us     60.59 MB  20.20 us     (mxfp8 identical)
#   mxfp4          8.93 MB   2.98 us     31.23 MB  10.41 us
#   nvfp4 / nvint4 9.45 MB   3.15 us     33.07 MB  11.02 us
# runtime/quant_linear.py bytes_model() computes these for any shape.
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import e2m1_at as _e2m1_at
from fxforge.codegen.quant_helpers import e4m3_value as _e4m3_value
from fxforge.codegen.quant_helpers import epilogue_scale as _epilogue_scale
from fxforge.codegen.quant_helpers import nibble_value as _nibble_value
from fxforge.codegen.quant_helpers import (
    pdl_launch_dependents as _pdl_launch_dependents,
)
from fxforge.codegen.quant_helpers import pdl_wait as _pdl_wait
from fxforge.codegen.quant_helpers import scale_value as _scale_value
from fxforge.codegen.quant_helpers import store_out as _store_out
from fxforge.codegen.quant_helpers import u2f as _u2f
from fxforge.codegen.quant_packed import (
    decode_e2m1_scaled_packed as _decode_e2m1_scaled_packed,
)
from fxforge.codegen.quant_packed import (
    decode_int4_scaled_packed as _decode_int4_scaled_packed,
)
from fxforge.codegen.quant_packed import decode_int8_e8m0 as _decode_int8_e8m0
from fxforge.codegen.quant_packed import decode_zero_packed as _decode_zero_packed
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16


@triton.jit
def _apply_group(w, s, z, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, GB: tl.constexpr,
                 HAS_ZERO: tl.constexpr):
    # w [BLOCK_N, BLOCK_KB]; s, z: one value per row ([BLOCK_N], tile inside one group) or per group
    # ([BLOCK_N, BLOCK_KB // GB]).
    if BLOCK_KB <= GB:
        if HAS_ZERO:
            w = w - z[:, None]
        w = w * s[:, None]
    else:
        w3 = tl.reshape(w, (BLOCK_N, BLOCK_KB // GB, GB))
        if HAS_ZERO:
            w3 = w3 - z[:, :, None]
        w = tl.reshape(w3 * s[:, :, None], (BLOCK_N, BLOCK_KB))
    return w


@triton.jit
def _decode(b, ELEM: tl.constexpr, EPB: tl.constexpr):
    # Raw code bytes [BLOCK_N, BLOCK_KB] -> fp32 *unscaled* element values (lo, hi): elements k = EPB * j
    # and (4-bit only) k = 2j + 1.
    if EPB == 2:
        bi = b.to(tl.int32)
        if ELEM == 3:  # e2m1 straight from the byte (no nibble extraction)
            lo = _e2m1_at(bi, 0)
            hi = _e2m1_at(bi, 4)
        else:
            lo = _nibble_value(bi & 15, ELEM)
            hi = _nibble_value((bi >> 4) & 15, ELEM)
    else:
        if ELEM == 4:
            lo = _e4m3_value(b.to(tl.int32))
        else:  # signed bytes: 2^23 + (c + 128) built from bits, minus 2^23 + 128 (no I2F). The byte
            # zero-extended is c + 256·[c < 0], so one XOR with 0x4B000080 flips its bit 7 (c + 128) and
            # sets the exponent bits of 2^23 (was an add, an OR and a sign extension)
            lo = (b.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        hi = lo
    return lo, hi


@triton.jit
def _decode_zero(b, z, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, GB: tl.constexpr):
    # uint4 code bytes minus their group's zero point, unscaled: the zero point is folded into the constant
    # of the bit-trick decode, (2^23 + q) - (2^23 + z), so it costs nothing per element (exact: |q - z| < 16).
    bi = b.to(tl.int32)
    zf = z + 8388608.0
    if BLOCK_KB <= GB:
        zb = zf[:, None]
    else:
        zb = tl.reshape(tl.broadcast_to(zf[:, :, None], (BLOCK_N, BLOCK_KB // GB, GB)), (BLOCK_N, BLOCK_KB))
    lo = ((bi & 15) | 0x4B000000).to(tl.float32, bitcast=True) - zb
    hi = (((bi >> 4) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - zb
    return lo, hi


@triton.jit
def _scaled_decode(b, s, ELEM: tl.constexpr, SCALE: tl.constexpr, EPB: tl.constexpr, PACKED_INT4: tl.constexpr,
                   PACKED_E2M1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, GB: tl.constexpr,
                   KE: tl.constexpr, ACT: tl.constexpr):
    # Code bytes [BLOCK_N, BLOCK_KB] times their group scales s (fp32; formats without zero points) ->
    # the [BLOCK_N, KE] tile in element order: the packed 16-bit decodes of nvint4 / mxfp4 / nvfp4 on the
    # GPU, the one-FFMA MXINT8 decode, else the fp32 decode scaled per element (the interpreter's path).
    if PACKED_INT4:
        w = _decode_int4_scaled_packed(b, s, BLOCK_N, GB, KE, ACT)
    elif PACKED_E2M1:
        w = _decode_e2m1_scaled_packed(b, s, BLOCK_N, GB, KE)
    elif ELEM == 0 and SCALE == 1 and EPB == 1:
        w = _decode_int8_e8m0(b, s, BLOCK_N, BLOCK_KB, GB)
    else:
        lo, hi = _decode(b, ELEM, EPB)
        lo = _apply_group(lo, s, s, BLOCK_N, BLOCK_KB, GB, False)
        if EPB == 2:
            hi = _apply_group(hi, s, s, BLOCK_N, BLOCK_KB, GB, False)
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, KE))
        else:
            w = lo
    return w


@triton.jit
def _group_raw(scales, zeros, rn, j0, N, NB, s_sn, s_zn, HAS_ZERO: tl.constexpr, GB: tl.constexpr,
               BLOCK_KB: tl.constexpr):
    # The stored scale (and zero point) of the groups a K tile touches, undecoded: [BLOCK_N] when the tile
    # lies inside one group (BLOCK_KB <= GB), else [BLOCK_N, BLOCK_KB // GB]; groups past NB read 0.
    n_ok = rn < N
    if BLOCK_KB <= GB:
        g = j0 // GB
        g_ok = n_ok & ((rn * 0 + g) < NB)
        s = tl.load(scales + rn * s_sn + g, mask=g_ok, other=0)
        z = s
        if HAS_ZERO:
            z = tl.load(zeros + rn * s_zn + g, mask=g_ok, other=0)
    else:
        rg = j0 // GB + tl.arange(0, BLOCK_KB // GB)
        g_ok = n_ok[:, None] & (rg[None, :] < NB)
        s = tl.load(scales + rn[:, None] * s_sn + rg[None, :], mask=g_ok, other=0)
        z = s
        if HAS_ZERO:
            z = tl.load(zeros + rn[:, None] * s_zn + rg[None, :], mask=g_ok, other=0)
    return s, z


@triton.jit
def _group_decode(s, z, SCALE: tl.constexpr, HAS_ZERO: tl.constexpr):
    # _group_raw's values -> (scale as fp32, zero point as fp32; the uint8 zero point by the bit trick)
    sv = _scale_value(s, SCALE)
    zv = sv
    if HAS_ZERO:
        zv = _u2f(z.to(tl.int32))
    return sv, zv


@triton.jit
def _group_params(scales, zeros, rn, j0, N, NB, s_sn, s_zn, SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
                  GB: tl.constexpr, BLOCK_KB: tl.constexpr):
    # Scale (decoded, fp32) and zero point of the groups a K tile touches (see _group_raw).
    s, z = _group_raw(scales, zeros, rn, j0, N, NB, s_sn, s_zn, HAS_ZERO, GB, BLOCK_KB)
    return _group_decode(s, z, SCALE, HAS_ZERO)


@triton.jit
def _decode_tile(b, scales, zeros, rn, j0, N, NB, s_sn, s_zn, ELEM: tl.constexpr, SCALE: tl.constexpr,
                 PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_EACH: tl.constexpr, EPB: tl.constexpr,
                 GB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
    # Raw code bytes of one K tile -> (lo, hi, s): the decoded fp32 elements (_decode; a zero point folded
    # into the decode), scaled per element by their group scale when SCALE_EACH, and the tile's group
    # scales for the POST path (per-row formats: none here, the epilogue scales; lo stands in for s).
    if PER_ROW:
        lo, hi = _decode(b, ELEM, EPB)
        s = lo
    else:
        s, z = _group_params(scales, zeros, rn, j0, N, NB, s_sn, s_zn, SCALE, HAS_ZERO, GB, BLOCK_KB)
        if SCALE_EACH and ELEM == 0 and SCALE == 1 and EPB == 1:
            lo = _decode_int8_e8m0(b, s, BLOCK_N, BLOCK_KB, GB)
            return lo, lo, s
        if HAS_ZERO:
            lo, hi = _decode_zero(b, z, BLOCK_N, BLOCK_KB, GB)
        else:
            lo, hi = _decode(b, ELEM, EPB)
        if SCALE_EACH:  # zero points already folded
            lo = _apply_group(lo, s, z, BLOCK_N, BLOCK_KB, GB, False)
            if EPB == 2:
                hi = _apply_group(hi, s, z, BLOCK_N, BLOCK_KB, GB, False)
            else:
                hi = lo
    return lo, hi, s


@triton.jit
def _load_x(x_rows, m_ok, j0, K, s_xk, EPB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KB: tl.constexpr):
    # x [BLOCK_M, EPB * BLOCK_KB] for byte columns j0 .. j0 + BLOCK_KB, loaded contiguously; for 4-bit codes
    # split into the even (low nibble) and odd (high nibble) elements. fp32.
    rk = EPB * j0 + tl.arange(0, EPB * BLOCK_KB)
    xv = tl.load(x_rows + rk[None, :] * s_xk, mask=m_ok[:, None] & (rk[None, :] < K), other=0.0).to(tl.float32)
    if EPB == 2:
        xe, xo = tl.split(tl.reshape(xv, (BLOCK_M, BLOCK_KB, 2)))
    else:
        xe = xv
        xo = xv
    return xe, xo


@triton.jit
def dequant_gemv(x, codes, scales, zeros, tensor_scale, bias, out, partials,
                 M, N, K, KB, NB, KB_PER_SPLIT, s_xm, s_xk, s_cn, s_sn, s_zn, s_om, s_on,
                 ELEM: tl.constexpr, SCALE: tl.constexpr, PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr, STEP: tl.constexpr, EPB: tl.constexpr,
                 GB: tl.constexpr, SPLIT: tl.constexpr, ACC3: tl.constexpr, OUT_BF16: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, INTERPRETED: tl.constexpr,
                 POST: tl.constexpr = True, PREFETCH: tl.constexpr = True, PDL: tl.constexpr = False):
    # POST (grouped formats): the group scale is applied once per (row, group) to the partial dot of the
    # unscaled codes, and a zero point z through sum(x·(q - z)) = sum(x·q) - z·sum(x): per element only
    # the decode and one FMA remain. Else the tile is scaled per element before the dot (old path).
    if SPLIT:  # the split-K reduce may be scheduled now (it waits for this grid: quant_helpers.pdl_*)
        _pdl_launch_dependents(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    x_rows = x + rm[:, None] * s_xm
    GROUPED_POST: tl.constexpr = POST and not PER_ROW
    NG: tl.constexpr = BLOCK_KB // GB if BLOCK_KB > GB else 1
    if ACC3:  # M <= 4: reduce over K once, at the end (no per-step shuffles)
        if GROUPED_POST:
            acc3 = tl.zeros((BLOCK_M, BLOCK_N, NG), dtype=tl.float32)
        else:
            acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KB), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    j_start = pid_k * KB_PER_SPLIT  # KB_PER_SPLIT is a multiple of BLOCK_KB: tiles never straddle splits
    j_end = tl.minimum(j_start + KB_PER_SPLIT, KB)
    # PREFETCH: the next step's code bytes and x are loaded before this step's decode, so every program
    # keeps two tiles in flight (Triton does not software-pipeline this loop: no tl.dot consumes the loads)
    rjb = tl.arange(0, BLOCK_KB)
    c_rows = codes + rn[:, None] * s_cn
    nk_ok = (rn < N)[:, None]
    if PREFETCH:
        b_nxt = tl.load(c_rows + (j_start + rjb)[None, :], mask=nk_ok & ((j_start + rjb)[None, :] < j_end), other=0)
        xe_nxt, xo_nxt = _load_x(x_rows, m_ok, j_start, K, s_xk, EPB, BLOCK_M, BLOCK_KB)
    for j0 in range(j_start, j_end, BLOCK_KB):
        if PREFETCH:
            b = b_nxt
            xe = xe_nxt
            xo = xo_nxt
            j1 = j0 + BLOCK_KB
            b_nxt = tl.load(c_rows + (j1 + rjb)[None, :], mask=nk_ok & ((j1 + rjb)[None, :] < j_end), other=0)
            xe_nxt, xo_nxt = _load_x(x_rows, m_ok, j1, K, s_xk, EPB, BLOCK_M, BLOCK_KB)
        else:
            b = tl.load(c_rows + (j0 + rjb)[None, :], mask=nk_ok & ((j0 + rjb)[None, :] < j_end), other=0)
            xe, xo = _load_x(x_rows, m_ok, j0, K, s_xk, EPB, BLOCK_M, BLOCK_KB)
        lo, hi, s = _decode_tile(b, scales, zeros, rn, j0, N, NB, s_sn, s_zn, ELEM, SCALE, PER_ROW, HAS_ZERO,
                                 not GROUPED_POST and not PER_ROW, EPB, GB, BLOCK_N, BLOCK_KB)
        if EPB == 2:
            prod = xe[:, None, :] * lo[None, :, :] + xo[:, None, :] * hi[None, :, :]
        else:
            prod = xe[:, None, :] * lo[None, :, :]
        if GROUPED_POST:
            if BLOCK_KB <= GB:
                acc += tl.sum(prod, 2) * s[None, :]
            else:
                part = tl.sum(tl.reshape(prod, (BLOCK_M, BLOCK_N, NG, GB)), 3) * s[None, :, :]
                if ACC3:
                    acc3 += part
                else:
                    acc += tl.sum(part, 2)
        elif ACC3:
            acc3 += prod
        else:
            acc += tl.sum(prod, 2)
    if ACC3:
        acc += tl.sum(acc3, 2)
    acc = _epilogue_scale(acc, scales, tensor_scale, rn, N, s_sn, SCALE, PER_ROW, HAS_TS, STEP)
    if SPLIT:
        tl.store(partials + (pid_k * M + rm[:, None]) * N + rn[None, :], acc,
                 mask=m_ok[:, None] & (rn[None, :] < N))
    else:
        _store_out(out, bias, acc, rm, rn, M, N, s_om, s_on, HAS_BIAS, OUT_BF16, INTERPRETED)


@triton.jit
def dequant_splitk_reduce(partials, bias, out, M, N, SPLITS, s_om, s_on, HAS_BIAS: tl.constexpr,
                          OUT_BF16: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
                          PDL: tl.constexpr = False):
    # launched with PDL after the GEMM / GEMV that wrote the partials. The kernel after this one (if launched with
    # PDL it waits for this grid itself; the GEMVs with WAIT prefetch their codes first) may be scheduled now: the
    # look-ahead stays bounded because the GEMVs and GEMMs signal their dependents only after their own wait
    _pdl_launch_dependents(PDL)
    _pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):  # fixed order: the result does not depend on scheduling
        acc += tl.load(partials + s * M * N + offs, mask=ok, other=0.0)
    rm = offs // N
    rn = offs % N
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=ok, other=0.0).to(tl.float32)
    if INTERPRETED and OUT_BF16:
        acc = _round_bf16(acc)
    tl.store(out + rm * s_om + rn * s_on, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _dot_wt(a, w, acc, ACT: tl.constexpr, INTERPRETED: tl.constexpr):
    # acc += a @ w^T with a [BLOCK_M, BLOCK_KB] activations, w [BLOCK_N, BLOCK_KB] dequantized fp32.
    # ACT 0: fp32 (IEEE dot, as eager: no TF32); 1: fp16; 2: bf16 (w rounded to the activation dtype,
    # tensor cores). The interpreter's low-precision dot is unreliable: there w is rounded exactly as on
    # the GPU and the dot runs in fp32.
    if ACT == 0:
        acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    elif INTERPRETED:
        if ACT == 2:
            wr = _round_bf16(w)
        else:
            wr = w.to(tl.float16).to(tl.float32)
        acc = tl.dot(a.to(tl.float32), tl.trans(wr), acc)
    else:
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
    return acc


@triton.jit
def _dot_w_xt(w, a, acc, ACT: tl.constexpr, INTERPRETED: tl.constexpr):
    # acc^T += w @ a^T (SWAP): w [BLOCK_N, KE] dequantized fp32, a [BLOCK_M, KE] activations; rounding as
    # _dot_wt (each product is the same; only the fp32 accumulation order may differ).
    if ACT == 0:
        acc = tl.dot(w, tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
    elif INTERPRETED:
        if ACT == 2:
            wr = _round_bf16(w)
        else:
            wr = w.to(tl.float16).to(tl.float32)
        acc = tl.dot(wr, tl.trans(a.to(tl.float32)), acc)
    else:
        acc = tl.dot(w.to(a.dtype), tl.trans(a), acc)
    return acc


@triton.jit
def dequant_gemm(x, codes, scales, zeros, tensor_scale, bias, out, partials,
                 M, N, K, KB, NB, KB_PER_SPLIT, s_xm, s_xk, s_cn, s_sn, s_zn, s_om, s_on,
                 ELEM: tl.constexpr, SCALE: tl.constexpr, PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr, STEP: tl.constexpr, EPB: tl.constexpr,
                 GB: tl.constexpr, ACT: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, GROUP_M: tl.constexpr, INTERPRETED: tl.constexpr,
                 SPLIT: tl.constexpr = False, POST: tl.constexpr = True, PREFETCH: tl.constexpr = True,
                 SWAP: tl.constexpr = False, PDL: tl.constexpr = False, DECODE_AHEAD: tl.constexpr = False):
    # Grid (M tiles x N tiles, K splits). 4-bit tiles are interleaved back to element order (tl.join) so
    # one dot of K = 2 * BLOCK_KB runs against contiguous x. POST with a tile inside one scale group
    # (BLOCK_KB <= GB): the dot runs on the unscaled codes (exact in bf16 / fp16) and the group's scale
    # (and zero point, via sum(x)) is applied to the [BLOCK_M, BLOCK_N] partial: no per-element scaling.
    if SPLIT:  # the split-K reduce may be scheduled now (it waits for this grid: quant_helpers.pdl_*)
        _pdl_launch_dependents(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-blocks share a weight tile in L2
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_m)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    x_rows = x + rm[:, None] * s_xm
    GROUPED_POST: tl.constexpr = POST and (not PER_ROW) and BLOCK_KB <= GB
    KE: tl.constexpr = EPB * BLOCK_KB  # elements of K per step
    # PACKED: uint4 + zero point, tile inside one group, 16-bit activations, on the GPU: decode straight to
    # the dot dtype (_decode_zero_packed); the interpreter keeps the fp32 decode (same values)
    PACKED: tl.constexpr = SWAP and HAS_ZERO and EPB == 2 and GROUPED_POST and ACT != 0 and not INTERPRETED
    # PACKED_INT4: int4 codes scaled per element (nvint4), same conditions otherwise
    PACKED_INT4: tl.constexpr = (SWAP and ELEM == 2 and not GROUPED_POST and not PER_ROW and ACT != 0
                                 and not INTERPRETED)
    # PACKED_E2M1: e2m1 codes scaled per element (mxfp4, nvfp4), bf16 activations (the scales' range)
    PACKED_E2M1: tl.constexpr = (SWAP and ELEM == 3 and not GROUPED_POST and not PER_ROW and ACT == 2
                                 and not INTERPRETED)
    # SWAP ("swap AB"): acc^T [BLOCK_N, BLOCK_M] += w [BLOCK_N, KE] @ x^T: the decoded weight tile is the
    # register A operand of wgmma (no shared-memory round trip of the decoded tile; BLOCK_N >= 64 is the
    # wgmma M side), x^T the pipelined shared-memory B operand; transposed back once after the K loop.
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    j_start = pid_k * KB_PER_SPLIT
    j_end = tl.minimum(j_start + KB_PER_SPLIT, KB)
    rjb = tl.arange(0, BLOCK_KB)
    c_rows = codes + rn[:, None] * s_cn
    nk_ok = (rn < N)[:, None]
    # per-element-scaled packed paths: group params one step ahead (Triton does not pipeline these small
    # loads). H100, M = 64: mxfp4 18.0 -> 16.5 us, nvint4 19.4 -> 18.2, nvfp4 18.3 -> 17.7; the uint4 POST
    # path got slower with it (14.7 -> 17.9) and loads them in step
    # SWAP_MX8: MXINT8 (int8 x E8M0, _decode_int8_e8m0) in the SWAP tile, its scales also a step ahead: in
    # step, their global-load latency was exposed every step (sm_90 SASS: LDG then a barrier in the loop)
    SWAP_MX8: tl.constexpr = (SWAP and ELEM == 0 and SCALE == 1 and EPB == 1 and not GROUPED_POST
                              and not PER_ROW)
    SCALES_AHEAD: tl.constexpr = PACKED_INT4 or PACKED_E2M1 or SWAP_MX8
    if SCALES_AHEAD:
        gs_nxt, gz_nxt = _group_raw(scales, zeros, rn, j_start, N, NB, s_sn, s_zn, HAS_ZERO, GB, BLOCK_KB)
    if PREFETCH:  # the next code tile is loaded before this one is decoded (as in dequant_gemv)
        b_nxt = tl.load(c_rows + (j_start + rjb)[None, :], mask=nk_ok & ((j_start + rjb)[None, :] < j_end), other=0)
    # DECODE_AHEAD (per-element-scaled formats without zero points, SWAP): the next step's tile is decoded
    # in this step, so the dot's operand is a loop-carried tile; Triton then stages it in shared memory for
    # wgmma (sm_90 SASS of the 4-bit formats, triton 3.6: no serialized wgmmas, loops 20% shorter)
    AHEAD: tl.constexpr = DECODE_AHEAD and SWAP and not GROUPED_POST and not PER_ROW and not HAS_ZERO
    if AHEAD and not SCALES_AHEAD:
        gs_nxt, gz_nxt = _group_raw(scales, zeros, rn, j_start, N, NB, s_sn, s_zn, HAS_ZERO, GB, BLOCK_KB)
    if AHEAD:
        b0 = tl.load(c_rows + (j_start + rjb)[None, :], mask=nk_ok & ((j_start + rjb)[None, :] < j_end), other=0)
        s0 = _group_decode(gs_nxt, gz_nxt, SCALE, HAS_ZERO)[0]
        gs_nxt, gz_nxt = _group_raw(scales, zeros, rn, j_start + BLOCK_KB, N, NB, s_sn, s_zn, HAS_ZERO, GB, BLOCK_KB)
        w_nxt = _scaled_decode(b0, s0, ELEM, SCALE, EPB, PACKED_INT4, PACKED_E2M1, BLOCK_N, BLOCK_KB, GB, KE, ACT)
    for j0 in range(j_start, j_end, BLOCK_KB):
        if AHEAD:
            w = w_nxt
            j1 = j0 + BLOCK_KB
            b1 = tl.load(c_rows + (j1 + rjb)[None, :], mask=nk_ok & ((j1 + rjb)[None, :] < j_end), other=0)
            s1 = _group_decode(gs_nxt, gz_nxt, SCALE, HAS_ZERO)[0]
            gs_nxt, gz_nxt = _group_raw(scales, zeros, rn, j1 + BLOCK_KB, N, NB, s_sn, s_zn, HAS_ZERO, GB, BLOCK_KB)
            w_nxt = _scaled_decode(b1, s1, ELEM, SCALE, EPB, PACKED_INT4, PACKED_E2M1, BLOCK_N, BLOCK_KB, GB, KE,
                                   ACT)
        elif PREFETCH:
            b = b_nxt
            j1 = j0 + BLOCK_KB
            b_nxt = tl.load(c_rows + (j1 + rjb)[None, :], mask=nk_ok & ((j1 + rjb)[None, :] < j_end), other=0)
        else:
            b = tl.load(c_rows + (j0 + rjb)[None, :], mask=nk_ok & ((j0 + rjb)[None, :] < j_end), other=0)
        if SCALES_AHEAD and not AHEAD:  # this step's group params were loaded a step ahead; the next's now
            s, z = _group_decode(gs_nxt, gz_nxt, SCALE, HAS_ZERO)
            gs_nxt, gz_nxt = _group_raw(scales, zeros, rn, j0 + BLOCK_KB, N, NB, s_sn, s_zn, HAS_ZERO, GB, BLOCK_KB)
        if AHEAD:
            pass
        elif PACKED:
            s, z = _group_params(scales, zeros, rn, j0, N, NB, s_sn, s_zn, SCALE, HAS_ZERO, GB, BLOCK_KB)
            w = _decode_zero_packed(b, z, BLOCK_N, KE, ACT)
        elif SCALES_AHEAD:
            w = _scaled_decode(b, s, ELEM, SCALE, EPB, PACKED_INT4, PACKED_E2M1, BLOCK_N, BLOCK_KB, GB, KE, ACT)
        else:
            lo, hi, s = _decode_tile(b, scales, zeros, rn, j0, N, NB, s_sn, s_zn, ELEM, SCALE, PER_ROW, HAS_ZERO,
                                     not GROUPED_POST and not PER_ROW, EPB, GB, BLOCK_N, BLOCK_KB)
            if EPB == 2:
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, KE))
            else:
                w = lo
        rk = EPB * j0 + tl.arange(0, KE)
        xv = tl.load(x_rows + rk[None, :] * s_xk, mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
        if SWAP:
            if GROUPED_POST:
                part = _dot_w_xt(w, xv, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), ACT, INTERPRETED)
                acc += part * s[:, None]
            else:
                acc = _dot_w_xt(w, xv, acc, ACT, INTERPRETED)
        elif GROUPED_POST:
            part = _dot_wt(xv, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), ACT, INTERPRETED)
            acc += part * s[None, :]
        else:
            acc = _dot_wt(xv, w, acc, ACT, INTERPRETED)
    if SWAP:
        acc = tl.trans(acc)
    acc = _epilogue_scale(acc, scales, tensor_scale, rn, N, s_sn, SCALE, PER_ROW, HAS_TS, STEP)
    if SPLIT:
        tl.store(partials + (pid_k * M + rm[:, None]) * N + rn[None, :], acc,
                 mask=m_ok[:, None] & (rn[None, :] < N))
    else:
        _store_out(out, bias, acc, rm, rn, M, N, s_om, s_on, HAS_BIAS, OUT_BF16, INTERPRETED)
