# fxforge attention template: FlashAttention-2 style forward (online softmax in base 2) over a
# block layout. Per query block the key blocks are either FULL (no element mask needed) or PARTIAL
# (bounds / causal / sink+window / user mask checked per element); blocks in neither list are
# skipped. Without an explicit layout the lists are derived in-kernel: dense = all full but the
# ragged last block, causal = full below the diagonal, partial on it, nothing above.
#
# Bytes/FLOPs model per (batch, head): 4·Lq·Lk·D FLOPs dense (half that causal); bytes =
# (Lq + 2·Lk·ceil(Lq/BLOCK_M))·D·elt — compute-bound for Lq ≥ a few hundred on the H100.
#
# Launch options (constexprs, chosen per config by runtime/attention.py):
# - TMA: 0 pointer loads; 1 tensor descriptors built in-kernel; 2 descriptors built on the host.
#   Descriptors view q/k/v as 2-D [rows, D] (row = (b·sb + h·sh)/sm + position), so they need
#   D == HEAD_DIM, unit last stride, 16-byte row stride and sb, sh multiples of sm; otherwise the
#   host falls back to TMA=0. Rows past a head's length then belong to the next head (or are
#   zero-filled past the tensor): key rows past LK lie only in PARTIAL blocks, which mask them;
#   query rows past LQ are computed and never stored (the output is a masked pointer store).
# - LPT: grid (B·H, query blocks) with the query block index reversed, so the longest causal rows
#   of every head start first and the short ones fill the tail (FA3's longest-processing-time order).
# - WS: Triton's automatic warp specialization of the key loops (Hopper: needs TMA=1).
# - SCALE_POS: full blocks fold the softmax scale into the exp2 argument as one FMA
#   (p = exp2(qk·c − m)) with m taken from max(qk)·c, valid for c > 0.
import triton
import triton.language as tl
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
               offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
               BLOCK_N: tl.constexpr, CHECK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               MASK_BOOL: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
               SCALE_POS: tl.constexpr, INTERPRETED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < LK
    if TMA:  # k_src/v_src are descriptors: rows past LK are another head's or zeros, masked below
        k = k_src.load([k_row + start_n, 0])
        v = v_src.load([v_row + start_n, 0])
    else:
        d_ok = offs_d < D
        k_ptrs = k_src + offs_n[:, None] * k_sn + offs_d[None, :] * k_sd
        v_ptrs = v_src + offs_n[:, None] * v_sn + offs_d[None, :] * v_sd
        if CHECK or not EVEN_D:  # ragged key block or padded head dim: masked loads
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:  # full block, exact head dim: unmasked (vectorized) loads
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    if INTERPRETED:  # the CPU interpreter's low-precision dot is unreliable; upcast there
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:  # fp32 inputs: full-precision dot, as eager (Triton's default would be TF32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if CHECK or HAS_MASK or not SCALE_POS:
        s = qk * qk_scale
        if HAS_MASK:
            mv = tl.load(mask_rows + offs_n[None, :] * m_sn, mask=(offs_m[:, None] < LQ) & n_ok[None, :], other=0)
            if MASK_BOOL:
                s = tl.where(mv != 0, s, float("-inf"))
            else:
                s = s + mv.to(tl.float32) * 1.4426950408889634
        if CHECK:
            ok = n_ok[None, :] & (offs_m[:, None] >= 0)
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if WINDOW > 0:
                ok = ok & ((offs_m[:, None] - offs_n[None, :] < WINDOW) | (offs_n[None, :] < SINK))
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
    else:  # full block, no mask: every score is finite, so m_new is too (no -inf guard needed)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = m_new
        p = tl.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:  # accumulate in place: no second accumulator tile and add
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def FXFORGE_KERNEL_NAME(Q, K, V, MASK, O, QD, KD, VD, sm_scale,
                        q_sb, q_sh, q_sm, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
                        m_sb, m_sh, m_sm, m_sn, o_sb, o_sh, o_sm, o_sd,
                        H, H_KV, LQ, LK, D, SINK, WINDOW, Q_ROWS, K_ROWS, V_ROWS,
                        FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, MAX_BLOCKS,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                        USE_LAYOUT: tl.constexpr, OUT_BF16: tl.constexpr, IEEE: tl.constexpr, D_CONST: tl.constexpr,
                        TMA: tl.constexpr, LPT: tl.constexpr, WS: tl.constexpr, SCALE_POS: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    if LPT:  # heavy (late, for causal) query blocks of all heads first
        bh = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // H_KV)  # GQA/MQA: query heads share key/value heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    EVEN_D: tl.constexpr = HEAD_DIM == D_CONST
    if TMA:
        if TMA == 1:
            q_src = tl.make_tensor_descriptor(Q, shape=[Q_ROWS, HEAD_DIM], strides=[q_sm, 1], block_shape=[BLOCK_M, HEAD_DIM])
            k_src = tl.make_tensor_descriptor(K, shape=[K_ROWS, HEAD_DIM], strides=[k_sn, 1], block_shape=[BLOCK_N, HEAD_DIM])
            v_src = tl.make_tensor_descriptor(V, shape=[V_ROWS, HEAD_DIM], strides=[v_sn, 1], block_shape=[BLOCK_N, HEAD_DIM])
        else:
            q_src = QD
            k_src = KD
            v_src = VD
        k_row = (b * k_sb + hk * k_sh) // k_sn
        v_row = (b * v_sb + hk * v_sh) // v_sn
        q = q_src.load([(b * q_sb + h * q_sh) // q_sm + pid_m * BLOCK_M, 0])
    else:
        k_src = K + b * k_sb + hk * k_sh
        v_src = V + b * v_sb + hk * v_sh
        k_row = 0
        v_row = 0
        q = tl.load(Q + b * q_sb + h * q_sh + offs_m[:, None] * q_sm + offs_d[None, :] * q_sd,
                    mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    mask_rows = MASK + b * m_sb + h * m_sh + offs_m[:, None] * m_sm
    if USE_LAYOUT:
        n_full = tl.load(FULL_CNT + pid_m)
        for i in tl.range(0, n_full, warp_specialize=WS):
            start_n = tl.load(FULL_IDX + pid_m * MAX_BLOCKS + i) * BLOCK_N
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                       start_n, offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, False, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, EVEN_D, TMA, SCALE_POS, INTERPRETED)
        n_part = tl.load(PART_CNT + pid_m)
        for i in range(n_part):
            start_n = tl.load(PART_IDX + pid_m * MAX_BLOCKS + i) * BLOCK_N
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                       start_n, offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, EVEN_D, TMA, SCALE_POS, INTERPRETED)
    else:
        if CAUSAL:  # off-band blocks (entirely at or below the diagonal) run unmasked
            full_end = tl.minimum(((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N, (LK // BLOCK_N) * BLOCK_N)
            part_end = tl.minimum((pid_m + 1) * BLOCK_M, LK)
        else:
            full_end = (LK // BLOCK_N) * BLOCK_N
            part_end = LK
        for start_n in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                       start_n, offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, False, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, EVEN_D, TMA, SCALE_POS, INTERPRETED)
        for start_n in range(full_end, part_end, BLOCK_N):
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                       start_n, offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, EVEN_D, TMA, SCALE_POS, INTERPRETED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if INTERPRETED and OUT_BF16:
        out = _round_bf16(out)
    tl.store(O + b * o_sb + h * o_sh + offs_m[:, None] * o_sm + offs_d[None, :] * o_sd, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
