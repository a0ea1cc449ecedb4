# fxforge dequant-GEMV template on 32-bit words: y = x @ dequant(W)^T (+ bias) for M <= 4 rows of x (decode)
# and a weight W [N, K] packed by passes/quant/formats.py, its codes read as int32 words. Loaded by
# runtime/quant_linear.py for WORDS configs (first for M <= 4 on the GPU, every format; dequant_matmul.py has the
# byte-tile GEMV, the tensor-core GEMM and the split-K reduce this kernel's partials go through).
#
# Kernel
#   dequant_gemv_words    BITS 4 or 8 (constexpr). Codes viewed as int32 [N, KW] (KW = code bytes / 4): word
#                         w of a row holds EPW = 32 / BITS consecutive elements k = EPW·w .. EPW·w + EPW - 1,
#                         element EPW·w + i in bits BITS·i .. BITS·i + BITS - 1 (the formats.py byte layout
#                         read little-endian: no repacking). A step loads a [BLOCK_G, BLOCK_N, GW] tile of
#                         words (group, row, word: BLOCK_G whole scale groups of GW words per row; per-row
#                         formats: GW is just the tile shape) and x[EPW·w .. EPW·w + EPW) for every word with
#                         one 16-byte (4-bit) / 8-byte (8-bit) load, split in registers. With the rows in the
#                         middle, Triton gives the lanes to the words and groups of one row and the warps to
#                         the rows, so a thread holds several rows of the same words and converts each x
#                         element once for all of them (rows first put them on the lanes: each thread
#                         converted its own x, 7.4 instead of 5.4 instructions per element on triton 3.6).
#                         Integer codes (int8, uint4 + zero point, int4) use the mask decode (_plane_fma):
#                         element i is read in place at plane J(i) (4-bit: J = i for i <= 4, i - 3 after one
#                         shift of the word by 12; 8-bit: J = i % 2 after one shift by 16): (word & mask_J) |
#                         exponent(2^(23 - BITS·J)) is the float 2^(23 - BITS·J) + c (one LOP3), minus
#                         2^(23 - BITS·J) + z (FADD; int8 / int4 made offset-binary by one XOR of the word),
#                         times x_i as loaded (FFMA): products bit-identical to a shift-and-mask decode. fp
#                         codes (e2m1, e4m3) keep a shift decode. POST (grouped formats): the group scale
#                         multiplies each word's partial sum once; per-row scales, the tensor scale and the
#                         MXINT8 step are applied in the epilogue. PREFETCH (1, 2): the words of the next
#                         step(s) are loaded before this step's math; PREFETCH_X: x and the group scales /
#                         zero points of the next step(s) too (their L2 latency was on every step's critical
#                         path: 5-15% on the H100). XT: x loaded as [word, group, element] (its lanes then
#                         follow the codes' order: 126 -> 96 registers, 343 -> 326 instructions per w4a16
#                         step on triton 3.6; 2-5% for integer codes). Triton's cp.async pipeline of the
#                         loop's loads (tl.range num_stages) was measured slower everywhere and dropped.
#                         One row of x per program: grid (N tiles, K splits, M); with K splits each writes fp32
#                         partials [SPLITS, M, N] for dequant_splitk_reduce.
#                         WAIT (the default configs on sm_90+): launched with programmatic dependent launch; the
#                         first step's (PREFETCH 2: two steps') code words are loaded before griddepcontrol.wait,
#                         i.e. while the kernel before it (a norm, an activation, another GEMV) still runs, and x,
#                         the scales and every store come after it; the kernel after this one is signalled after
#                         the wait (before it, a chain of PDL kernels piled up resident, spinning in their waits:
#                         8.8 -> 11.4 us per GEMV). H100, 20 launches in one CUDA graph, each GEMV's prefetch
#                         overlapping the one before (results/quant_gpu_s19.md `time`, session 19; bf16 cuBLAS 15.9 /
#                         42.0 us; `time_chain`, x_{i+1} = y_i, within 0.1-0.8 us of it): 4096^2 / 4096 x 14336,
#                         M = 1: w4a16 5.66 / 16.3 us (7.39 / 18.0 without PDL), w8a16 7.36 / 22.1 (8.70 / 22.8),
#                         nvint4 6.14 / 17.3, mxfp4 6.69 / 18.6, nvfp4 6.76 / 20.3, mxint8 7.32 / 22.3; the first
#                         steps moved to 16 rows x 1024 code bytes at 4096^2 (probe_pdl_chain_sweep.md).
#                         H100 (results/quant_gpu.md, session 11; bf16 cuBLAS 15.8 / 42.2 us): 4096^2 /
#                         4096 x 14336, M = 1: w4a16 7.1 / 17.5 us (session 10: 8.4 / 18.8), w8a16 9.0 / 23.2
#                         (9.5 / 25.0), nvint4 7.1 / 18.3, mxfp4 8.0 / 20.5, nvfp4 8.4 / 21.1, mxint8 9.0 / 23.5.
#                         sm_90 loop (triton 3.6): 5.5 instructions per element (w4a16 16 x 256 B: 3 decode +
#                         FMA, the rest x's conversion through shared memory -- 6 barriers per step -- and
#                         addressing). ncu (14336 rows, w4a16): 96 registers, 5 CTAs per SM, 1.36 waves, issue
#                         slots 58% busy, 34% of stalls on global-load scoreboards (before PREFETCH_X).
#
# Bytes model: as dequant_matmul.py (runtime/quant_linear.py bytes_model()): N * K * bytes_per_weight(fmt, K,
# N) + M * K * act_bytes + M * N * out_bytes + 2 * SPLITS * M * N * 4 with K splits; 4096 x 4096, M = 1, bf16:
# w4a16_g128 8.80 MB (2.93 us at 3.0 TB/s), w8a16 16.80 MB (5.60 us).
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import epilogue_scale as _epilogue_scale
from fxforge.codegen.quant_helpers import (
    pdl_launch_dependents as _pdl_launch_dependents,
)
from fxforge.codegen.quant_helpers import pdl_wait as _pdl_wait
from fxforge.codegen.quant_helpers import plane_code as _plane_code
from fxforge.codegen.quant_helpers import scale_value as _scale_value
from fxforge.codegen.quant_helpers import store_out as _store_out
from fxforge.codegen.quant_helpers import u2f as _u2f
from fxforge.codegen.quant_helpers import word_code_at as _word_code_at


@triton.jit
def _word_fma(part, wd, xi, SHIFT: tl.constexpr, z3, s3, BITS: tl.constexpr, ELEM: tl.constexpr,
              PER_ROW: tl.constexpr, POST: tl.constexpr):
    # Shift decode: part += x_i * (the code at bit SHIFT of every word, decoded; group-scaled per element
    # unless POST). fp codes always; integer codes when scaled per element (POST off). z3: the code's
    # offset (zero point; 8 / 128 after the int4 / int8 XOR), subtracted with 2^23 by the bit trick.
    v = _word_code_at(wd, SHIFT, BITS, ELEM, z3)
    if not PER_ROW and not POST:
        v = v * s3
    return part + xi[:, None, :] * v


@triton.jit
def _plane_fma(part, src, xi, mask, EXP: tl.constexpr, zf):
    # Mask decode (integer codes, scaled after the partial dot; quant_helpers.plane_code): minus zf =
    # 2^(23 - BITS·J) + z the code is c - z exactly, and x_i is used as loaded.
    return part + xi[:, None, :] * _plane_code(src, mask, EXP, zf)


@triton.jit
def _x_step(xr, rw, ie, s_xk, K, EPW: tl.constexpr, XT: tl.constexpr = 0):
    # x[EPW·w .. EPW·w + EPW) for every word w of a step, as stored: one contiguous 16 / 8-byte load per word
    # ([BLOCK_G, GW, EPW]; XT: [GW, BLOCK_G, EPW])
    if XT:
        kx = tl.trans(rw)[:, :, None] * EPW + ie[None, None, :]
    else:
        kx = rw[:, :, None] * EPW + ie[None, None, :]
    return tl.load(xr + kx * s_xk, mask=kx < K, other=0.0)


@triton.jit
def _group_step(ptr, rn, n_ok, g, NB, stride):
    # one value per (group g, row rn) of a step: [BLOCK_G, BLOCK_N], as stored
    return tl.load(ptr + rn[None, :] * stride + g[:, None], mask=(g[:, None] < NB) & n_ok[None, :], other=0)


@triton.jit
def dequant_gemv_words(x, codes, scales, zeros, tensor_scale, bias, out, partials,
                       M, N, K, KW, NB, KW_PER_SPLIT, s_xm, s_xk, s_cn, s_sn, s_zn, s_om, s_on, mask0,
                       BITS: tl.constexpr, ELEM: tl.constexpr, SCALE: tl.constexpr, PER_ROW: tl.constexpr,
                       HAS_ZERO: tl.constexpr, HAS_TS: tl.constexpr, HAS_BIAS: tl.constexpr, STEP: tl.constexpr,
                       GW: tl.constexpr, SPLIT: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_G: tl.constexpr, INTERPRETED: tl.constexpr, POST: tl.constexpr = True,
                       PREFETCH: tl.constexpr = 1,
                       PREFETCH_X: tl.constexpr = 0, XT: tl.constexpr = 0, PDL: tl.constexpr = False,
                       WAIT: tl.constexpr = False):
    # codes: int32 words [N, KW]; ELEM / SCALE / PER_ROW / HAS_ZERO / HAS_TS / STEP as in dequant_matmul.py
    # (runtime/quant_linear.py kernel_format); KW_PER_SPLIT a multiple of BLOCK_G * GW; mask0 = 2^BITS - 1.
    # PREFETCH (0, 1, 2): the words of the next 1 or 2 steps are loaded before this step's math (register
    # buffering: Triton does not pipeline loads that feed no tl.dot), so each warp keeps loads in flight
    # while it decodes.
    # Tiles are [BLOCK_G, BLOCK_N, GW] (group, row, word): with the words contiguous and the other two axes
    # tied, Triton's coalescing gives the lanes to the words and then the groups of one row, and the warps
    # (and register repeats) to the rows, so each thread holds several rows of the same words and converts
    # each x element once for all of them (rows on the lanes made every thread convert its own copy of x:
    # 7.4 instead of 5.4 instructions per element on triton 3.6).
    EPW: tl.constexpr = 32 // BITS  # elements per word
    # integer codes: mask decode (_plane_fma), unless scaled per element (POST off on a grouped format);
    # fp codes: shift decode (_word_fma)
    MASKED: tl.constexpr = ELEM <= 2 and (POST or PER_ROW)
    # WAIT: launched with PDL after the kernel that writes x. The first steps' code words (which no kernel writes)
    # are loaded before griddepcontrol.wait, x and everything else after it; the kernel after this one is signalled
    # only after the wait (signalled before it, a chain of PDL kernels would all become resident at once, each
    # spinning in its wait on SM slots the running one needs: 8.8 -> 11.4 us per GEMV, probe_pdl_chain_r2.md).
    if SPLIT and not WAIT:  # the split-K reduce may be scheduled now (it waits for this grid: quant_helpers.pdl_*)
        _pdl_launch_dependents(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rg = tl.arange(0, BLOCK_G)
    rt = tl.arange(0, GW)
    TW: tl.constexpr = BLOCK_G * GW
    acc3 = tl.zeros((BLOCK_G, BLOCK_N, GW), dtype=tl.float32)
    w_start = pid_k * KW_PER_SPLIT
    w_end = tl.minimum(w_start + KW_PER_SPLIT, KW)
    xr = x + m * s_xm
    c_rows = codes + rn[None, :, None] * s_cn
    n_ok3 = n_ok[None, :, None]
    ie = tl.arange(0, EPW)
    rw0 = rg[:, None] * GW + rt[None, :]  # [BLOCK_G, GW] word offsets of a step
    if PREFETCH >= 1:
        rw = w_start + rw0
        wd_next = tl.load(c_rows + rw[:, None, :], mask=n_ok3 & (rw < w_end)[:, None, :], other=0)
    if PREFETCH >= 2:
        rw2 = w_start + TW + rw0
        wd_next2 = tl.load(c_rows + rw2[:, None, :], mask=n_ok3 & (rw2 < w_end)[:, None, :], other=0)
    _pdl_wait(WAIT)
    _pdl_launch_dependents(WAIT)
    if PREFETCH >= 1 and PREFETCH_X:  # x and the group scales / zero points of the next step too (their L2 latency)
        x_next = _x_step(xr, rw, ie, s_xk, K, EPW, XT)
        if not PER_ROW:
            s_next = _group_step(scales, rn, n_ok, w_start // GW + rg, NB, s_sn)
            if HAS_ZERO:
                z_next = _group_step(zeros, rn, n_ok, w_start // GW + rg, NB, s_zn)
    if PREFETCH >= 2 and PREFETCH_X:
        x_next2 = _x_step(xr, rw2, ie, s_xk, K, EPW, XT)
        if not PER_ROW:
            s_next2 = _group_step(scales, rn, n_ok, w_start // GW + BLOCK_G + rg, NB, s_sn)
            if HAS_ZERO:
                z_next2 = _group_step(zeros, rn, n_ok, w_start // GW + BLOCK_G + rg, NB, s_zn)
    for w0 in range(w_start, w_end, TW):
        rw = w0 + rw0
        if PREFETCH == 2:
            wd = wd_next
            wd_next = wd_next2
            rwn = rw + 2 * TW
            wd_next2 = tl.load(c_rows + rwn[:, None, :], mask=n_ok3 & (rwn < w_end)[:, None, :], other=0)
        elif PREFETCH == 1:
            wd = wd_next
            rwn = rw + TW
            wd_next = tl.load(c_rows + rwn[:, None, :], mask=n_ok3 & (rwn < w_end)[:, None, :], other=0)
        else:
            wd = tl.load(c_rows + rw[:, None, :], mask=n_ok3 & (rw < w_end)[:, None, :], other=0)
        g = w0 // GW + rg
        if PREFETCH_X and PREFETCH == 2:
            x_raw = x_next
            x_next = x_next2
            x_next2 = _x_step(xr, rw + 2 * TW, ie, s_xk, K, EPW, XT)
            if not PER_ROW:
                s_raw = s_next
                s_next = s_next2
                s_next2 = _group_step(scales, rn, n_ok, g + 2 * BLOCK_G, NB, s_sn)
                if HAS_ZERO:
                    z_raw = z_next
                    z_next = z_next2
                    z_next2 = _group_step(zeros, rn, n_ok, g + 2 * BLOCK_G, NB, s_zn)
        elif PREFETCH_X and PREFETCH == 1:
            x_raw = x_next
            x_next = _x_step(xr, rw + TW, ie, s_xk, K, EPW, XT)
            if not PER_ROW:
                s_raw = s_next
                s_next = _group_step(scales, rn, n_ok, g + BLOCK_G, NB, s_sn)
                if HAS_ZERO:
                    z_raw = z_next
                    z_next = _group_step(zeros, rn, n_ok, g + BLOCK_G, NB, s_zn)
        else:
            x_raw = _x_step(xr, rw, ie, s_xk, K, EPW, XT)
            if not PER_ROW:
                s_raw = _group_step(scales, rn, n_ok, g, NB, s_sn)
                if HAS_ZERO:
                    z_raw = _group_step(zeros, rn, n_ok, g, NB, s_zn)
        if BITS == 8 and ELEM != 4:
            wd = wd ^ -2139062144  # 0x80808080: signed bytes -> offset binary c + 128
        if ELEM == 2:
            wd = wd ^ -2004318072  # 0x88888888: int4 two's complement -> offset binary c + 8
        # zq: the code's offset (zero point, 8 for int4, 128 for int8); z3 its float per (group, row)
        if PER_ROW:  # scales in the epilogue; s3 is not read
            s3 = tl.zeros((BLOCK_G, BLOCK_N, 1), dtype=tl.float32)
            z3 = s3 + (8.0 if ELEM == 2 else (128.0 if BITS == 8 else 0.0))
        else:
            s3 = _scale_value(s_raw, SCALE)[:, :, None]
            if HAS_ZERO:
                z3 = _u2f(z_raw.to(tl.int32))[:, :, None]
            else:
                z3 = tl.zeros((BLOCK_G, BLOCK_N, 1), dtype=tl.float32) + (8.0 if ELEM == 2 else (128.0 if BITS == 8 else 0.0))
        xv = x_raw.to(tl.float32)  # split into the words' elements in registers below
        if PER_ROW:  # no per-group factor: accumulate straight into acc3 (saves one FADD per word)
            part = acc3
        else:
            part = tl.zeros((BLOCK_G, BLOCK_N, GW), dtype=tl.float32)
        if BITS == 4:
            if XT:
                xe, xo = tl.split(tl.reshape(xv, (GW, BLOCK_G, 4, 2)))  # elements 0 2 4 6 | 1 3 5 7
                xee, xeo = tl.split(tl.reshape(xe, (GW, BLOCK_G, 2, 2)))  # 0 4 | 2 6
                xoe, xoo = tl.split(tl.reshape(xo, (GW, BLOCK_G, 2, 2)))  # 1 5 | 3 7
            else:
                xe, xo = tl.split(tl.reshape(xv, (BLOCK_G, GW, 4, 2)))  # elements 0 2 4 6 | 1 3 5 7
                xee, xeo = tl.split(tl.reshape(xe, (BLOCK_G, GW, 2, 2)))  # 0 4 | 2 6
                xoe, xoo = tl.split(tl.reshape(xo, (BLOCK_G, GW, 2, 2)))  # 1 5 | 3 7
            x0, x4 = tl.split(xee)
            x2, x6 = tl.split(xeo)
            x1, x5 = tl.split(xoe)
            x3, x7 = tl.split(xoo)
            if XT:
                x0, x1, x2, x3 = tl.trans(x0), tl.trans(x1), tl.trans(x2), tl.trans(x3)
                x4, x5, x6, x7 = tl.trans(x4), tl.trans(x5), tl.trans(x6), tl.trans(x7)
            if MASKED:
                # planes J = 0..4 of the word (bits 0..19) and, after one shift by 12, J = 2..4 for
                # elements 5..7 (bits 20..31); the float of plane J is 2^(23 - 4J) + c
                zf0 = z3 + 8388608.0
                zf1 = z3 + 524288.0
                zf2 = z3 + 32768.0
                zf3 = z3 + 2048.0
                zf4 = z3 + 128.0
                wh = wd >> 12
                part = _plane_fma(part, wd, x0, mask0, 0x4B000000, zf0)
                part = _plane_fma(part, wd, x1, mask0 << 4, 0x49000000, zf1)
                part = _plane_fma(part, wd, x2, mask0 << 8, 0x47000000, zf2)
                part = _plane_fma(part, wd, x3, mask0 << 12, 0x45000000, zf3)
                part = _plane_fma(part, wd, x4, mask0 << 16, 0x43000000, zf4)
                part = _plane_fma(part, wh, x5, mask0 << 8, 0x47000000, zf2)
                part = _plane_fma(part, wh, x6, mask0 << 12, 0x45000000, zf3)
                part = _plane_fma(part, wh, x7, mask0 << 16, 0x43000000, zf4)
            else:
                part = _word_fma(part, wd, x0, 0, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x1, 4, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x2, 8, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x3, 12, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x4, 16, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x5, 20, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x6, 24, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x7, 28, z3, s3, BITS, ELEM, PER_ROW, POST)
        else:
            if XT:
                xe, xo = tl.split(tl.reshape(xv, (GW, BLOCK_G, 2, 2)))  # elements 0 2 | 1 3
            else:
                xe, xo = tl.split(tl.reshape(xv, (BLOCK_G, GW, 2, 2)))  # elements 0 2 | 1 3
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            if XT:
                x0, x1, x2, x3 = tl.trans(x0), tl.trans(x1), tl.trans(x2), tl.trans(x3)
            if MASKED:  # bytes 0, 1 at planes J = 0, 1 (floats 2^23 + c, 2^15 + c); bytes 2, 3 after a shift by 16
                zf0 = z3 + 8388608.0
                zf1 = z3 + 32768.0
                wh = wd >> 16
                part = _plane_fma(part, wd, x0, mask0, 0x4B000000, zf0)
                part = _plane_fma(part, wd, x1, mask0 << 8, 0x47000000, zf1)
                part = _plane_fma(part, wh, x2, mask0, 0x4B000000, zf0)
                part = _plane_fma(part, wh, x3, mask0 << 8, 0x47000000, zf1)
            else:
                part = _word_fma(part, wd, x0, 0, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x1, 8, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x2, 16, z3, s3, BITS, ELEM, PER_ROW, POST)
                part = _word_fma(part, wd, x3, 24, z3, s3, BITS, ELEM, PER_ROW, POST)
        if PER_ROW:
            acc3 = part
        elif POST:
            acc3 += part * s3
        else:
            acc3 += part
    acc = tl.sum(tl.sum(acc3, 2), 0)[None, :]  # [1, BLOCK_N]
    acc = _epilogue_scale(acc, scales, tensor_scale, rn, N, s_sn, SCALE, PER_ROW, HAS_TS, STEP)
    rm = m + tl.arange(0, 1)
    if SPLIT:
        tl.store(partials + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=n_ok[None, :])
    else:
        _store_out(out, bias, acc, rm, rn, M, N, s_om, s_on, HAS_BIAS, OUT_BF16, INTERPRETED)
