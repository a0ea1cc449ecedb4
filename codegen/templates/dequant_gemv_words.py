# fxforge dequant-GEMV template on 32-bit words: y = x @ dequant(W)^T (+ bias) for M <= 4 rows of x (decode)
# and a weight W [N, K] packed by passes/quant/formats.py, its codes read as int32 words. Loaded by
# runtime/quant_linear.py for WORDS configs (first for M <= 4 on the GPU; dequant_matmul.py has the byte-tile
# GEMV, the tensor-core GEMM and the split-K reduce this kernel's partials go through).
#
# Kernel
#   dequant_gemv_words    BITS 4 or 8 (constexpr). Codes viewed as int32 [N, KW] (KW = code bytes / 4): word
#                         w of a row holds EPW = 32 / BITS consecutive elements k = EPW·w .. EPW·w + EPW - 1,
#                         element EPW·w + i in bits BITS·i .. BITS·i + BITS - 1 (the formats.py byte layout
#                         read little-endian: no repacking). A step loads a [BLOCK_N, BLOCK_G, GW] tile of
#                         words (BLOCK_G whole scale groups of GW words per row; per-row formats: GW is just
#                         the tile shape) and x[EPW·w .. EPW·w + EPW) for every word with one 16-byte (4-bit)
#                         / 8-byte (8-bit) load, split in registers: x arrives in the words' layout, so no
#                         layout conversion and no even / odd split as in the byte-tile GEMV. Element i of
#                         every word: one shift + mask, the bit-trick decode (OR + FADD; zero points folded
#                         into the subtracted constant, int8 made offset-binary by one XOR of the word with
#                         0x80808080) and one FMA with x_i, i = 0 .. EPW - 1 in order. POST (grouped formats):
#                         the group scale multiplies each word's partial sum once (1/EPW of a multiply per
#                         element) instead of every element; per-row scales, the tensor scale and the MXINT8
#                         step are applied in the epilogue. One row of x per program: grid (N tiles, K splits,
#                         M); with K splits each writes fp32 partials [SPLITS, M, N] for dequant_splitk_reduce.
#                         Why: second H100 probe (benchmarks/results/probe_quant.md, M = 1, 4096^2 / 4096 x
#                         14336): 4-bit 10.3 / 22.3 us (byte tiles 14.9 / 43.4), 8-bit 10.1 / 26.7 us (byte
#                         tiles 9.9 / 27.8: on par, ahead on the larger shape).
#
# Bytes model: as dequant_matmul.py (runtime/quant_linear.py bytes_model()): N * K * bytes_per_weight(fmt, K,
# N) + M * K * act_bytes + M * N * out_bytes + 2 * SPLITS * M * N * 4 with K splits; 4096 x 4096, M = 1, bf16:
# w4a16_g128 8.80 MB (2.93 us at 3.0 TB/s), w8a16 16.80 MB (5.60 us).
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import e4m3_value as _e4m3_value
from fxforge.codegen.quant_helpers import epilogue_scale as _epilogue_scale
from fxforge.codegen.quant_helpers import nibble_value as _nibble_value
from fxforge.codegen.quant_helpers import scale_value as _scale_value
from fxforge.codegen.quant_helpers import store_out as _store_out
from fxforge.codegen.quant_helpers import u2f as _u2f


@triton.jit
def _word_fma(part, wd, xi, SHIFT: tl.constexpr, zf3, s3, BITS: tl.constexpr, ELEM: tl.constexpr,
              PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr, POST: tl.constexpr):
    # part += x_i * (the code at bit SHIFT of every word, decoded; group-scaled per element unless POST).
    # uint4: (2^23 + q) - (2^23 + z) with zf3 = 2^23 + z. int8: the words were XORed with 0x80808080, so
    # the byte is c + 128 and (2^23 + c + 128) - (2^23 + 128) = c.
    if BITS == 4:
        c = (wd >> SHIFT) & 15
        if HAS_ZERO:
            v = (c | 0x4B000000).to(tl.float32, bitcast=True) - zf3
        else:
            v = _nibble_value(c, ELEM)
    else:
        c = (wd >> SHIFT) & 255
        if ELEM == 4:
            v = _e4m3_value(c)
        else:
            v = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    if not PER_ROW and not POST:
        v = v * s3
    return part + xi[None, :, :] * v


@triton.jit
def dequant_gemv_words(x, codes, scales, zeros, tensor_scale, bias, out, partials,
                       M, N, K, KW, NB, KW_PER_SPLIT, s_xm, s_xk, s_cn, s_sn, s_zn, s_om, s_on,
                       BITS: tl.constexpr, ELEM: tl.constexpr, SCALE: tl.constexpr, PER_ROW: tl.constexpr,
                       HAS_ZERO: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr, STEP: tl.constexpr,
                       GW: tl.constexpr, SPLIT: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_G: tl.constexpr, INTERPRETED: tl.constexpr, POST: tl.constexpr = True):
    # codes: int32 words [N, KW]; ELEM / SCALE / PER_ROW / HAS_ZERO / HAS_TS / STEP as in dequant_matmul.py
    # (runtime/quant_linear.py kernel_format); KW_PER_SPLIT a multiple of BLOCK_G * GW.
    EPW: tl.constexpr = 32 // BITS  # elements per word
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rg = tl.arange(0, BLOCK_G)
    rt = tl.arange(0, GW)
    TW: tl.constexpr = BLOCK_G * GW
    acc3 = tl.zeros((BLOCK_N, BLOCK_G, GW), dtype=tl.float32)
    w_start = pid_k * KW_PER_SPLIT
    w_end = tl.minimum(w_start + KW_PER_SPLIT, KW)
    xr = x + m * s_xm
    c_rows = codes + rn[:, None, None] * s_cn
    n_ok3 = n_ok[:, None, None]
    for w0 in range(w_start, w_end, TW):
        rw = w0 + rg[:, None] * GW + rt[None, :]  # [BLOCK_G, GW] word indices
        wd = tl.load(c_rows + rw[None, :, :], mask=n_ok3 & (rw < w_end)[None, :, :], other=0)
        if BITS == 8 and ELEM != 4:
            wd = wd ^ -2139062144  # 0x80808080: signed bytes -> offset binary
        if PER_ROW:  # scales in the epilogue; s3 / zf3 are not read
            s3 = tl.zeros((BLOCK_N, BLOCK_G, 1), dtype=tl.float32)
            zf3 = s3
        else:
            g = w0 // GW + rg
            g_ok = n_ok[:, None] & (g[None, :] < NB)
            s3 = _scale_value(tl.load(scales + rn[:, None] * s_sn + g[None, :], mask=g_ok, other=0), SCALE)[:, :, None]
            zf3 = s3
            if HAS_ZERO:  # 2^23 + z, the constant the decode subtracts
                zf = _u2f(tl.load(zeros + rn[:, None] * s_zn + g[None, :], mask=g_ok, other=0).to(tl.int32))
                zf3 = (zf + 8388608.0)[:, :, None]
        # x[EPW·w .. EPW·w + EPW) for every word w: one contiguous 16 / 8-byte load per word, split in registers
        kx = rw[:, :, None] * EPW + tl.arange(0, EPW)[None, None, :]
        xv = tl.load(xr + kx * s_xk, mask=kx < K, other=0.0).to(tl.float32)
        part = tl.zeros((BLOCK_N, BLOCK_G, GW), dtype=tl.float32)
        if BITS == 4:
            xe, xo = tl.split(tl.reshape(xv, (BLOCK_G, GW, 4, 2)))  # elements 0 2 4 6 | 1 3 5 7
            xee, xeo = tl.split(tl.reshape(xe, (BLOCK_G, GW, 2, 2)))  # 0 4 | 2 6
            xoe, xoo = tl.split(tl.reshape(xo, (BLOCK_G, GW, 2, 2)))  # 1 5 | 3 7
            x0, x4 = tl.split(xee)
            x2, x6 = tl.split(xeo)
            x1, x5 = tl.split(xoe)
            x3, x7 = tl.split(xoo)
            part = _word_fma(part, wd, x0, 0, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x1, 4, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x2, 8, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x3, 12, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x4, 16, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x5, 20, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x6, 24, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x7, 28, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
        else:
            xe, xo = tl.split(tl.reshape(xv, (BLOCK_G, GW, 2, 2)))  # elements 0 2 | 1 3
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            part = _word_fma(part, wd, x0, 0, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x1, 8, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x2, 16, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
            part = _word_fma(part, wd, x3, 24, zf3, s3, BITS, ELEM, PER_ROW, HAS_ZERO, POST)
        if POST and not PER_ROW:
            acc3 += part * s3
        else:
            acc3 += part
    acc = tl.sum(tl.sum(acc3, 2), 1)[None, :]  # [1, BLOCK_N]
    acc = _epilogue_scale(acc, scales, tensor_scale, rn, N, s_sn, SCALE, PER_ROW, HAS_TS, STEP)
    rm = m + tl.arange(0, 1)
    if SPLIT:
        tl.store(partials + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=n_ok[None, :])
    else:
        _store_out(out, bias, acc, rm, rn, M, N, s_om, s_on, HAS_BIAS, OUT_BF16, INTERPRETED)
