# fxforge dequant-GEMV template fed by TMA: y = x @ dequant(W)^T (+ bias) for one row of x per program
# (decode, M <= 4) and an int8 per-row-scaled weight (w8a16, passes/quant/formats.py), its codes read as int32
# words [N, K / 4] through a host tensor descriptor. Launched by runtime/quant_gemv_tma.py for TMA configs
# (runtime/quant_linear.py gemv_configs: second for w8a16 at M <= 4 and N < 8192 on sm_90+: with programmatic
# dependent launch the words GEMV, which fetches its first code words before griddepcontrol.wait, is faster --
# 7.74 against this kernel's 8.06 us with WAIT, probe_pdl_chain_sweep.md; Triton's loop pipeliner issues a step's x
# with its codes, so here WAIT only hides the launch gap).
#
# Kernel
#   dequant_gemv_tma8     Each program owns BLOCK_N rows and a K range (K splits: fp32 partials [SPLITS, M, N]
#                         for dequant_splitk_reduce; a split is whole boxes). A step is one TMA box of
#                         [BLOCK_N, BW] words (BW <= 256: the box limit), pipelined over STAGES shared-memory
#                         buffers by Triton's loop pipeliner (tl.range num_stages): the copy engine keeps STAGES
#                         boxes in flight per program without registers or per-thread address math, where the
#                         words GEMV (dequant_gemv_words.py) holds one step ahead in registers. x [4·BW] of the
#                         step comes either through its own descriptor (X_DESC) or as a cp.async-pipelined
#                         pointer load; both land in shared memory and are read in the decode's layout (no
#                         register-layout conversion, which costs the words kernel 6 barriers a step).
#                         Out-of-range boxes are zero-filled by the TMA unit (K tail, N tail): no masks on the
#                         codes; a zero word decodes to codes 0.
#                         DEC 0 (default), exact: the word XOR 0x80808080 makes the signed bytes offset-binary
#                         u = c + 128; byte j's plane (word >> 16·(j // 2)) & (0xFF << 8·(j % 2)) ORed with the
#                         exponent of 2^(23 - 8·(j % 2)) is the float 2^(23 - 8·(j % 2)) + u (one LOP3), minus
#                         2^(23 - 8·(j % 2)) + 128 (FADD) the code c, times x as loaded (FFMA): exact products.
#                         DEC 2 (offset decode, probe option): one PRMT per element builds 2^15 + u and the FFMA
#                         takes it as is; (2^15 + 128)·sum(x) is subtracted once at the end. Each product then
#                         rounds at 2^-24 of x·2^15 (interpreter, K = 4096: 7e-5 relative error for zero-mean x,
#                         5e-4 with mean 3, against 5e-8 exact); 1% faster on the H100 (probe_gemv_tma_r4.md), so
#                         not a default. DEC 1 is its interpreter twin (shift + mask instead of PRMT).
#                         Per-row scale (and bias) in the epilogue.
#                         H100 (probe_gemv_tma_r3.md / _r4.md, M = 1, 16 rows x 128 words x 4 stages, 4 warps):
#                         4096^2 8.38-8.46 us against the words GEMV's 8.73-8.88 (bf16 cuBLAS 15.9-16.9);
#                         4096 x 14336 23.4-23.7 us against 22.7-23.1 (the words kernel stays there).
#                         The TMA read alone (probe_gemv_tma.md) takes 7.83-7.88 us at 4096^2 (2.02x bf16), plain
#                         loads 8.67-8.83; sm_90 loop (triton 3.6, 16 x 256 words): 591 instructions per 128
#                         elements per thread (words kernel: 5.5 per element, this one 4.6).
#
# Bytes model: N * K (codes) + 2 * N (bf16 scales) + 2 * M * K (x) + 2 * M * N (y); 4096 x 4096, M = 1:
# 16.80 MB, 5.60 us at 3.0 TB/s (runtime/quant_linear.py bytes_model, format w8a16).
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import (
    pdl_launch_dependents as _pdl_launch_dependents,
)
from fxforge.codegen.quant_helpers import pdl_wait as _pdl_wait
from fxforge.codegen.quant_helpers import plane_code as _plane_code
from fxforge.codegen.quant_helpers import store_out as _store_out


@triton.jit
def _prmt_planes(wd):
    # the 4 bytes u_j of each word as the floats 2^15 + u_j: one PRMT each (byte 1 <- u_j, byte 3 <- 0x47)
    return tl.inline_asm_elementwise(
        "{ .reg .b32 e; mov.b32 e, 0x47000000; prmt.b32 $0, $4, e, 0x7404; prmt.b32 $1, $4, e, 0x7414;"
        " prmt.b32 $2, $4, e, 0x7424; prmt.b32 $3, $4, e, 0x7434; }",
        "=r,=r,=r,=r,r", [wd], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _shift_planes(wd):
    # the interpreter's twin of _prmt_planes (same floats): byte j moved to bits 8..15, exponent of 2^15
    f0 = ((wd << 8) & 0xFF00) | 0x47000000
    f1 = (wd & 0xFF00) | 0x47000000
    f2 = ((wd >> 8) & 0xFF00) | 0x47000000
    f3 = ((wd >> 16) & 0xFF00) | 0x47000000
    return (f0.to(tl.float32, bitcast=True), f1.to(tl.float32, bitcast=True), f2.to(tl.float32, bitcast=True),
            f3.to(tl.float32, bitcast=True))


@triton.jit
def _tma8_step(acc, xs, x, w_desc, n0, k, m, K, s_xm, mask0, BW: tl.constexpr, X_DESC: tl.constexpr,
               DEC: tl.constexpr):
    # acc += x[4k .. 4k + 4BW) * the codes of words k .. k + BW of rows n0 .. n0 + BLOCK_N (one TMA box).
    # DEC 0: exact products (LOP3 + FADD + FFMA per element). DEC 1 / 2 (offset decode): acc += x * (2^15 + u)
    # with u = c + 128 (FFMA only after the plane: PRMT with DEC 2, shift + LOP3 with DEC 1), xs += x per word,
    # and the caller subtracts (2^15 + 128) * sum(xs) once; each product then rounds at 2^-24 of x * 2^15
    # instead of being exact (about 1e-4 relative on a K = 4096 dot, 40x under a bf16 output's half ulp).
    wd = w_desc.load([n0, k]) ^ -2139062144  # 0x80808080: signed bytes -> offset binary c + 128
    if X_DESC:
        xv = tl.reshape(x.load([m, k * 4]), (BW, 2, 2)).to(tl.float32)
    else:
        i2 = tl.arange(0, 2)
        kx = (k + tl.arange(0, BW))[:, None, None] * 4 + i2[None, :, None] * 2 + i2[None, None, :]
        xv = tl.load(x + m * s_xm + kx, mask=kx < K, other=0.0).to(tl.float32)
    xe, xo = tl.split(xv)  # elements 0 2 | 1 3 of each word
    x0, x2 = tl.split(xe)
    x1, x3 = tl.split(xo)
    if DEC == 0:
        wh = wd >> 16
        # the words GEMV's mask decode: minus 2^(23 - 8J) + 128 the plane's float is the signed code
        acc += x0[None, :] * _plane_code(wd, mask0, 0x4B000000, 8388736.0)
        acc += x1[None, :] * _plane_code(wd, mask0 << 8, 0x47000000, 32896.0)
        acc += x2[None, :] * _plane_code(wh, mask0, 0x4B000000, 8388736.0)
        acc += x3[None, :] * _plane_code(wh, mask0 << 8, 0x47000000, 32896.0)
    else:
        if DEC == 2:
            f0, f1, f2, f3 = _prmt_planes(wd)
        else:
            f0, f1, f2, f3 = _shift_planes(wd)
        acc += x0[None, :] * f0
        acc += x1[None, :] * f1
        acc += x2[None, :] * f2
        acc += x3[None, :] * f3
        xs += (x0 + x1) + (x2 + x3)
    return acc, xs


@triton.jit
def dequant_gemv_tma8(x, w_desc, scales, bias, out, partials, M, N, K, KW_PER_SPLIT, s_xm, s_om, mask0,
                      BLOCK_N: tl.constexpr, BW: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr,
                      X_DESC: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
                      INTERPRETED: tl.constexpr, DEC: tl.constexpr = 0, WAIT: tl.constexpr = False):
    # x: a descriptor over x [M, K] with box [1, 4·BW] (X_DESC) or its pointer (row stride s_xm, unit column
    # stride); w_desc: box [BLOCK_N, BW] over the int32 words [N, K / 4]; scales [N] (any float dtype).
    # WAIT: launched with PDL after the kernel that writes x (Triton's loop pipeliner issues the first boxes with x's,
    # so everything waits here: only the launch gap hides); the next kernel is signalled after the wait
    _pdl_wait(WAIT)
    _pdl_launch_dependents(WAIT)
    n0 = tl.program_id(0) * BLOCK_N
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    KW = K // 4
    k_start = pid_k * KW_PER_SPLIT
    k_end = tl.minimum(k_start + KW_PER_SPLIT, KW)
    acc = tl.zeros([BLOCK_N, BW], tl.float32)
    xs = tl.zeros([BW], tl.float32)
    for k in tl.range(k_start, k_end, BW, num_stages=STAGES):
        acc, xs = _tma8_step(acc, xs, x, w_desc, n0, k, m, K, s_xm, mask0, BW, X_DESC, DEC)
    if DEC:
        acc -= 32896.0 * xs[None, :]  # (2^15 + 128) * x: the offset of every plane float
    rn = n0 + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    y = tl.sum(acc, 1) * tl.load(scales + rn, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT:
        tl.store(partials + (pid_k * M + m) * N + rn, y, mask=n_ok)
    else:  # (+ bias, cast; the interpreter rounds to bf16 as the GPU does)
        _store_out(out, bias, y[None, :], m + tl.arange(0, 1), rn, M, N, s_om, 1, HAS_BIAS, OUT_BF16, INTERPRETED)
