# fxforge W8A8 template (issue 4): dynamic per-token int8 activation quantization and an int8 x int8 -> int32
# tensor-core GEMM with a per-token / per-channel rescale epilogue. Run by runtime/w8a8.py as the custom op
# fxforge::w8a8_linear(x, w_codes, w_scale, smooth, bias).
#
#   w8a8_quantize_act  x [M, K] (fp16 / bf16 / fp32) -> codes int8 [M, K] + scale fp32 [M]. Per row m:
#                      xs = x * (1 / smooth) (fp32, only with SmoothQuant factors s [K]),
#                      scale = amax|xs| / 127, code = clamp(rint(xs * (127 / amax)), -127, 127) (symmetric
#                      range, no -128, as formats.py's int8). Multiplying by reciprocals keeps the per-element
#                      work at two fp32 products (a correctly rounded division is ~10 instructions); the
#                      reciprocals themselves are IEEE divisions (tl.div_rn, once per row / per channel).
#                      An all-zero row gets scale 0 and codes 0 (its output is then just the bias).
#                      Two passes over the row (amax, then codes): x is read twice but stays in L2.
#                      rint is round-half-even (libdevice on the GPU: cvt.rni, never contracted into an FMA),
#                      so codes are bit-identical to runtime/w8a8.py's reference.
#   w8a8_gemm          (FUSE_QUANT, small M: each program first quantizes its own x rows with the same code
#                      as w8a8_quantize_act, reading x from L2, so one launch does it all.)
#                      acc[m, n] = sum_k a[m, k] * w[n, k] in int32 (tl.dot on int8 tiles: exact up to K =
#                      2^31 / 127^2 = 133,000), then y = acc * x_scale[m] * w_scale[n] (+ bias[n]) in fp32,
#                      cast to the output dtype (x's). Grouped tile order for L2 reuse of the weight tiles.
#
# Bytes model (runtime/w8a8.py bytes_model computes it for any shape), M tokens, weight N x K, bf16 x / y:
#   weights  N*K (int8 codes) + 4*N (fp32 per-channel scales) [+ 4*K SmoothQuant factors, + 2*N bias]
#   acts     2*M*K (x read) + 2*M*N (y written); M > 16 (separate quantize launch) adds the int8 codes and
#            fp32 scales written and read back: + 2*(M*K + 4*M). For M <= 16 the GEMM quantizes x itself
#            (FUSE_QUANT); every program re-reads the x rows, but from L2 (8 KB per row at K = 4096).
#   compute  2*M*N*K int8 ops against the H100 SXM dense int8 tensor-core peak (~1,979 TOPS spec sheet with
#            boost clocks; ~1,500 TOPS is the achievable figure used here).
#   shape                  bytes       @ 3.0 TB/s   int8 ops @ 1,500 TOPS   bound
#   4096 x 4096, M = 1     16.81 MB    5.60 us      0.022 us                HBM (weights: 16.79 MB)
#   4096 x 4096, M = 64    18.37 MB    6.12 us      1.43 us                 HBM (weights); 4.3x headroom
#   14336 x 4096, M = 1    58.81 MB   19.60 us      0.078 us                HBM (4096 x 14336: 58.77 MB)
# (smooth + bias add 24.6 KB: +0.15%). Against bf16 (33.57 MB, 11.19 us at M = 1) that is 2.0x less
# traffic. W8A8 turns compute-bound only near M ~ 400 (2*M*N*K / 1.5e15 s = bytes / 3e12 s), where the
# per-token quantize pass (3 bytes per activation element) starts to matter too.
import triton
import triton.language as tl
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16
from triton.language.extra import libdevice


@triton.jit
def _rint(v, INTERPRETED: tl.constexpr):
    # Round half to even. libdevice.rint has no interpreter implementation; there, adding 1.5 * 2^23 pushes
    # the fraction bits out of the fp32 mantissa (round to nearest even, |v| < 2^22) and subtracting it is
    # exact. Not used on the GPU, where the add could be contracted with the preceding product into an FMA.
    if INTERPRETED:
        r = (v + 12582912.0) - 12582912.0
    else:
        r = libdevice.rint(v)
    return r


@triton.jit
def _scaled_row_tile(x, smooth, rm, rk, M, K, s_xm, s_xk, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr):
    ok = (rm[:, None] < M) & (rk[None, :] < K)
    v = tl.load(x + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=ok, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        s = tl.load(smooth + rk, mask=rk < K, other=1.0)
        v = v * tl.div_rn(tl.full((BLOCK_K,), 1.0, tl.float32), s)[None, :]
    return v, ok


@triton.jit
def _row_scales(x, smooth, rm, M, K, s_xm, s_xk, HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # per-row scale = amax|xs| / 127 and its inverse 127 / amax (0 for all-zero rows), IEEE divisions
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        v, ok = _scaled_row_tile(x, smooth, rm, rk, M, K, s_xm, s_xk, HAS_SMOOTH, BLOCK_K)
        amax = tl.maximum(amax, tl.max(tl.abs(v), 1))
    scale = tl.div_rn(amax, tl.full((BLOCK_M,), 127.0, tl.float32))
    inv = tl.div_rn(tl.full((BLOCK_M,), 127.0, tl.float32), tl.where(amax > 0, amax, 1.0))
    inv = tl.where(amax > 0, inv, 0.0)  # all-zero rows: codes 0, scale 0 (no 0 / 0)
    return scale, inv


@triton.jit
def _codes(v, inv, INTERPRETED: tl.constexpr):
    # v [BLOCK_M, BLOCK_K] smoothed fp32 activations -> int8 codes (round half even, symmetric clamp)
    q = _rint(v * inv[:, None], INTERPRETED)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return q.to(tl.int8)


@triton.jit
def w8a8_quantize_act(x, smooth, codes, scales, M, K, s_xm, s_xk, s_cm, HAS_SMOOTH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale, inv = _row_scales(x, smooth, rm, M, K, s_xm, s_xk, HAS_SMOOTH, BLOCK_M, BLOCK_K)
    tl.store(scales + rm, scale, mask=rm < M)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        v, ok = _scaled_row_tile(x, smooth, rm, rk, M, K, s_xm, s_xk, HAS_SMOOTH, BLOCK_K)
        tl.store(codes + rm[:, None] * s_cm + rk[None, :], _codes(v, inv, INTERPRETED), mask=ok)


@triton.jit
def w8a8_gemm(a, a_scale, x, smooth, w, w_scale, bias, out, M, N, K, s_am, s_xm, s_xk, s_wn, s_om, s_on,
              FUSE_QUANT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
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
    n_ok = rn < N
    if FUSE_QUANT:  # small M: quantize x rows in this program (x is tiny and L2-resident; no codes round trip)
        xs, inv = _row_scales(x, smooth, rm, M, K, s_xm, s_xk, HAS_SMOOTH, BLOCK_M, BLOCK_K)
    else:
        xs = tl.load(a_scale + rm, mask=m_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        # masked lanes hold code 0, which adds nothing to the integer sum
        if FUSE_QUANT:
            v, ok = _scaled_row_tile(x, smooth, rm, rk, M, K, s_xm, s_xk, HAS_SMOOTH, BLOCK_K)
            at = _codes(v, inv, INTERPRETED)
        else:
            at = tl.load(a + rm[:, None] * s_am + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        # the weight tile read as [BLOCK_K, BLOCK_N] (w is [N, K] row-major: K-contiguous columns)
        wt = tl.load(w + rn[None, :] * s_wn + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(at, wt, acc, out_dtype=tl.int32)
    ws = tl.load(w_scale + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if INTERPRETED and OUT_BF16:
        y = _round_bf16(y)
    tl.store(out + rm[:, None] * s_om + rn[None, :] * s_on, y.to(out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
