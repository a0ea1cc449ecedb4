# fxforge dequant-GEMV template, "K-span" layout: y = x @ dequant(W)^T (+ bias) for M <= 4 rows of x (decode)
# and a weight W [N, K] packed by passes/quant/formats.py, its codes read as int32 words (the layout of
# dequant_gemv_words.py: word w of a row holds EPW = 32 / BITS consecutive elements, element EPW·w + i at bits
# BITS·i). Loaded by runtime/quant_linear.py for WORDS configs with KSPAN; split-K partials go through
# dequant_matmul.py's dequant_splitk_reduce.
#
# Kernel
#   dequant_gemv_kspan    A step is a [TW, BLOCK_N] tile of words (word, row): the lanes and warps span the TW
#                         words (K), the BLOCK_N rows are register repeats. `one` is a runtime 1 multiplying
#                         the word index: Triton's coalescing then cannot vectorize the word loads (one 4-byte
#                         load per word and row; a warp's 32 lanes still read 128 contiguous bytes) and, with
#                         no axis contiguous, orders the axes as given (words first), so a thread holds word
#                         t of every row, and x [TW, EPW] (one 16 / 8-byte load per word) lands in the
#                         same layout over its words: no layout conversion of x (the words kernel converts
#                         x through shared memory every step, 6 barriers on triton 3.6), each x element
#                         converted once for BLOCK_N rows, and no cross-thread reduction until the end (one
#                         tl.sum over the words of each row). Integer codes use the mask decode of the
#                         words kernel (plane J of the word OR-ed with the exponent of 2^(23 - BITS·J) is
#                         the float 2^(23 - BITS·J) + c; minus that constant plus the code's offset -- 8 for
#                         int4, 128 for int8 after one XOR of the word -- it is c exactly) and one FFMA with
#                         x as loaded; a zero point z (uint4) is applied per word as z·sum(x of the word),
#                         the sum computed once per step for all rows; fp codes (e2m1, e4m3) the shift
#                         decode. Group scales (POST) multiply each word's partial sum once, loaded per
#                         (row, word) (a thread's words lie in different groups). Per-row scales, the tensor
#                         scale and the MXINT8 step are applied in the epilogue. PREFETCH: the next step's
#                         words, x, scales and zero points are loaded before this step's math.
#                         Grid (N tiles, K splits, M); K splits write fp32 partials [SPLITS, M, N].
#                         Per element (w4a16, sm_90): LOP3 + FADD + FFMA, plus per (row, word) the scale
#                         and zero-point loads, conversions and two FFMAs (~0.9 / element at 8 per word).
#                         Not yet timed on a GPU (built in session 12 without one; offline SASS only).
#
# Bytes model: as dequant_matmul.py (runtime/quant_linear.py bytes_model()). x is read once per program
# (N / BLOCK_N times in all, from L2): 4096 x 4096 bf16, 16 rows per program: 256 x 8 KB.
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import epilogue_scale as _epilogue_scale
from fxforge.codegen.quant_helpers import (
    pdl_launch_dependents as _pdl_launch_dependents,
)
from fxforge.codegen.quant_helpers import plane_code as _plane_code
from fxforge.codegen.quant_helpers import scale_value as _scale_value
from fxforge.codegen.quant_helpers import store_out as _store_out
from fxforge.codegen.quant_helpers import u2f as _u2f
from fxforge.codegen.quant_helpers import word_code_at as _word_code_at


@triton.jit
def _masked(src, xi, mask, EXP: tl.constexpr, C: tl.constexpr):
    # x_i times the integer code under mask minus its offset (quant_helpers.plane_code; C: 2^(23 - BITS·J)
    # plus the offset)
    return xi[:, :, None] * _plane_code(src, mask, EXP, C)


@triton.jit
def _shifted(wd, xi, SHIFT: tl.constexpr, BITS: tl.constexpr, ELEM: tl.constexpr, OFF: tl.constexpr):
    # x_i times the code at bit SHIFT of every word: e2m1 / e4m3 decoded, integer codes minus OFF
    return xi[:, :, None] * _word_code_at(wd, SHIFT, BITS, ELEM, OFF)


@triton.jit
def _load_step(c_rows, xr, scales, zeros, rn, n_ok, rw, w_end, ie, s_xk, K, NB, s_sn, s_zn, EPW: tl.constexpr,
               GW: tl.constexpr, PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr):
    # one step: words [Q, WPT, BLOCK_N] at word offsets rw [Q, WPT], x [Q, WPT, EPW] (raw) and, for grouped
    # formats, the scale / zero point of each (word run, row) [Q, BLOCK_N] (raw; a run lies in one group);
    # words past w_end (only past the last word) read 0, with x 0
    wd = tl.load(c_rows + rw[:, :, None], mask=(rw < w_end)[:, :, None] & n_ok[None, None, :], other=0)
    kx = rw[:, :, None] * EPW + ie[None, None, :]
    xw = tl.load(xr + kx * s_xk, mask=kx < K, other=0.0)
    s = wd
    z = wd
    if not PER_ROW:
        g = tl.max(rw, 1) // GW  # (the run's last word: the same group as its first)
        g_ok = (g < NB)[:, None] & n_ok[None, :]
        s = tl.load(scales + rn[None, :] * s_sn + g[:, None], mask=g_ok, other=0)
        if HAS_ZERO:
            z = tl.load(zeros + rn[None, :] * s_zn + g[:, None], mask=g_ok, other=0)
    return wd, xw, s, z


@triton.jit(do_not_specialize=["one"])
def dequant_gemv_kspan(x, codes, scales, zeros, tensor_scale, bias, out, partials,
                       M, N, K, KW, NB, KW_PER_SPLIT, s_xm, s_xk, s_cn, s_sn, s_zn, s_om, s_on, mask0, one,
                       BITS: tl.constexpr, ELEM: tl.constexpr, SCALE: tl.constexpr, PER_ROW: tl.constexpr,
                       HAS_ZERO: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr, STEP: tl.constexpr,
                       GW: tl.constexpr, SPLIT: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                       Q: tl.constexpr, WPT: tl.constexpr, INTERPRETED: tl.constexpr, PREFETCH: tl.constexpr = 1,
                       PDL: tl.constexpr = False):
    # codes: int32 words [N, KW]; ELEM / SCALE / PER_ROW / HAS_ZERO / HAS_TS / STEP as in dequant_matmul.py;
    # a step covers TW = Q·WPT words per row (runs of WPT consecutive words; WPT divides GW, the words per
    # scale group, for grouped formats); KW_PER_SPLIT a multiple of TW; mask0 = 2^BITS - 1; one = 1 (runtime:
    # see the header).
    EPW: tl.constexpr = 32 // BITS
    TW: tl.constexpr = Q * WPT
    MASKED: tl.constexpr = ELEM <= 2  # integer codes: mask decode; fp codes: shift decode
    # the code's offset after the XOR below (int4 / int8 made offset-binary); uint4 zero points via sum(x)
    OFF: tl.constexpr = 8.0 if ELEM == 2 else (128.0 if BITS == 8 and ELEM != 4 else 0.0)
    if SPLIT:  # the split-K reduce may be scheduled now (it waits for this grid: quant_helpers.pdl_*)
        _pdl_launch_dependents(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    # word offsets of a step: run q, word v of the run -> WPT·q + v, times the runtime 1
    rj = (tl.arange(0, Q)[:, None] * WPT + tl.arange(0, WPT)[None, :]) * one
    ie = tl.arange(0, EPW)
    w_start = pid_k * KW_PER_SPLIT
    w_end = tl.minimum(w_start + KW_PER_SPLIT, KW)
    xr = x + m * s_xm
    c_rows = codes + rn[None, None, :] * s_cn
    acc = tl.zeros((Q, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        wd_n, xw_n, s_n, z_n = _load_step(c_rows, xr, scales, zeros, rn, n_ok, w_start + rj, w_end, ie, s_xk, K,
                                          NB, s_sn, s_zn, EPW, GW, PER_ROW, HAS_ZERO)
    for w0 in range(w_start, w_end, TW):
        if PREFETCH:
            wd, xw, s_raw, z_raw = wd_n, xw_n, s_n, z_n
            wd_n, xw_n, s_n, z_n = _load_step(c_rows, xr, scales, zeros, rn, n_ok, w0 + TW + rj, w_end, ie, s_xk,
                                              K, NB, s_sn, s_zn, EPW, GW, PER_ROW, HAS_ZERO)
        else:
            wd, xw, s_raw, z_raw = _load_step(c_rows, xr, scales, zeros, rn, n_ok, w0 + rj, w_end, ie, s_xk, K,
                                              NB, s_sn, s_zn, EPW, GW, PER_ROW, HAS_ZERO)
        if BITS == 8 and ELEM != 4:
            wd = wd ^ -2139062144  # 0x80808080: signed bytes -> offset binary c + 128
        if ELEM == 2:
            wd = wd ^ -2004318072  # 0x88888888: int4 two's complement -> offset binary c + 8
        xv = xw.to(tl.float32)  # [Q, WPT, EPW], split into the words' elements in registers
        if BITS == 4:
            xe, xo = tl.split(tl.reshape(xv, (Q, WPT, 4, 2)))  # elements 0 2 4 6 | 1 3 5 7
            xee, xeo = tl.split(tl.reshape(xe, (Q, WPT, 2, 2)))  # 0 4 | 2 6
            xoe, xoo = tl.split(tl.reshape(xo, (Q, WPT, 2, 2)))  # 1 5 | 3 7
            x0, x4 = tl.split(xee)
            x2, x6 = tl.split(xeo)
            x1, x5 = tl.split(xoe)
            x3, x7 = tl.split(xoo)
            if MASKED:
                # planes J = 0..4 of the word (bits 0..19) and, after one shift by 12, J = 2..4 for
                # elements 5..7 (bits 20..31); the float of plane J is 2^(23 - 4J) + c
                wh = wd >> 12
                part = _masked(wd, x0, mask0, 0x4B000000, 8388608.0 + OFF)
                part += _masked(wd, x1, mask0 << 4, 0x49000000, 524288.0 + OFF)
                part += _masked(wd, x2, mask0 << 8, 0x47000000, 32768.0 + OFF)
                part += _masked(wd, x3, mask0 << 12, 0x45000000, 2048.0 + OFF)
                part += _masked(wd, x4, mask0 << 16, 0x43000000, 128.0 + OFF)
                part += _masked(wh, x5, mask0 << 8, 0x47000000, 32768.0 + OFF)
                part += _masked(wh, x6, mask0 << 12, 0x45000000, 2048.0 + OFF)
                part += _masked(wh, x7, mask0 << 16, 0x43000000, 128.0 + OFF)
            else:
                part = _shifted(wd, x0, 0, BITS, ELEM, OFF)
                part += _shifted(wd, x1, 4, BITS, ELEM, OFF)
                part += _shifted(wd, x2, 8, BITS, ELEM, OFF)
                part += _shifted(wd, x3, 12, BITS, ELEM, OFF)
                part += _shifted(wd, x4, 16, BITS, ELEM, OFF)
                part += _shifted(wd, x5, 20, BITS, ELEM, OFF)
                part += _shifted(wd, x6, 24, BITS, ELEM, OFF)
                part += _shifted(wd, x7, 28, BITS, ELEM, OFF)
            if HAS_ZERO:
                xsum = tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), 1)
        else:
            xe, xo = tl.split(tl.reshape(xv, (Q, WPT, 2, 2)))  # elements 0 2 | 1 3
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            if MASKED:  # bytes 0, 1 at planes J = 0, 1 (floats 2^23 + c, 2^15 + c); bytes 2, 3 after a shift by 16
                wh = wd >> 16
                part = _masked(wd, x0, mask0, 0x4B000000, 8388608.0 + OFF)
                part += _masked(wd, x1, mask0 << 8, 0x47000000, 32768.0 + OFF)
                part += _masked(wh, x2, mask0, 0x4B000000, 8388608.0 + OFF)
                part += _masked(wh, x3, mask0 << 8, 0x47000000, 32768.0 + OFF)
            else:
                part = _shifted(wd, x0, 0, BITS, ELEM, OFF)
                part += _shifted(wd, x1, 8, BITS, ELEM, OFF)
                part += _shifted(wd, x2, 16, BITS, ELEM, OFF)
                part += _shifted(wd, x3, 24, BITS, ELEM, OFF)
            if HAS_ZERO:
                xsum = tl.sum((x0 + x1) + (x2 + x3), 1)
        run = tl.sum(part, 1)  # [Q, BLOCK_N]: the run's WPT words, in registers
        if HAS_ZERO:  # sum x·(c - z) = sum x·c - z·sum x, the run's sum shared by every row
            run -= _u2f(z_raw.to(tl.int32)) * xsum[:, None]
        if PER_ROW:
            acc += run
        else:
            acc += run * _scale_value(s_raw, SCALE)
    acc = tl.sum(acc, 0)[None, :]  # [1, BLOCK_N]
    acc = _epilogue_scale(acc, scales, tensor_scale, rn, N, s_sn, SCALE, PER_ROW, HAS_TS, STEP)
    rm = m + tl.arange(0, 1)
    if SPLIT:
        tl.store(partials + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=n_ok[None, :])
    else:
        _store_out(out, bias, acc, rm, rn, M, N, s_om, s_on, HAS_BIAS, OUT_BF16, INTERPRETED)
