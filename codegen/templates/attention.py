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
# - LPT: 1: grid (B·H, query blocks) with the query block index reversed, so the longest causal rows
#   of every head start first and the short ones fill the tail (FA3's longest-processing-time order).
#   2: grid (query blocks, B·H), reversed within each head: the ~132 co-resident programs belong to
#   one or two heads and stream the same K/V blocks, so at 32K (16 MB of K/V per head) L2 serves
#   most key loads; the heavy-first order still holds within each head.
# - WS: Triton's automatic warp specialization of the key loops (Hopper: needs TMA=1).
# - PIPE: full blocks software-pipelined by hand (QK of block j before softmax + PV of block j-1,
#   FA3's intra-warpgroup overlap); no user mask, scale > 0. Holds two score tiles in registers.
# - SCALE_POS: full blocks fold the softmax scale into the exp2 argument as one FMA
#   (p = exp2(qk·c − m)) with m taken from max(qk)·c, valid for c > 0.
import triton
import triton.language as tl
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16


@triton.jit
def _load_rows(src, row, sn, sd, start_n, offs_d, LK, D,
               BLOCK_N: tl.constexpr, CHECK: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """A [BLOCK_N, HEAD_DIM] key or value tile starting at key position start_n."""
    if TMA:  # src is a descriptor: rows past LK are another head's or zeros, masked by the caller
        t = src.load([row + start_n, 0])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = src + offs_n[:, None] * sn + offs_d[None, :] * sd
        if CHECK or not EVEN_D:  # ragged key block or padded head dim: masked loads
            t = tl.load(ptrs, mask=(offs_n[:, None] < LK) & (offs_d[None, :] < D), other=0.0)
        else:  # full block, exact head dim: unmasked (vectorized) loads
            t = tl.load(ptrs)
    if INTERPRETED:  # the CPU interpreter's low-precision dot is unreliable; upcast there
        t = t.to(tl.float32)
    return t


@triton.jit
def _qk(q, k, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: full-precision dot, as eager (Triton's default would be TF32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    return qk


@triton.jit
def _update(acc, l_i, m_i, p, v, m_new, m_safe, IEEE: tl.constexpr):
    """Online-softmax update with p = exp2(scores - m_safe) for the new running max m_new."""
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:  # accumulate in place: no second accumulator tile and add
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _update_full(acc, l_i, m_i, qk, v, qk_scale, IEEE: tl.constexpr):
    """Full block, no mask, scale > 0: every score is finite, so m_new is too (no -inf guard)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score
    return _update(acc, l_i, m_i, p, v, m_new, m_new, IEEE)


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
               offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
               BLOCK_N: tl.constexpr, CHECK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               MASK_BOOL: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
               SCALE_POS: tl.constexpr, INTERPRETED: tl.constexpr):
    k = _load_rows(k_src, k_row, k_sn, k_sd, start_n, offs_d, LK, D, BLOCK_N, CHECK, EVEN_D, TMA, INTERPRETED)
    v = _load_rows(v_src, v_row, v_sn, v_sd, start_n, offs_d, LK, D, BLOCK_N, CHECK, EVEN_D, TMA, INTERPRETED)
    qk = _qk(q, k, IEEE)
    if CHECK or HAS_MASK or not SCALE_POS:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < LK
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
        acc, l_i, m_i = _update(acc, l_i, m_i, tl.exp2(s - m_safe[:, None]), v, m_new, m_safe, IEEE)
    else:
        acc, l_i, m_i = _update_full(acc, l_i, m_i, qk, v, qk_scale, IEEE)
    return acc, l_i, m_i


@triton.jit
def _block_start(j, idx_row, BLOCK_N: tl.constexpr, USE_LAYOUT: tl.constexpr):
    if USE_LAYOUT:
        start = tl.load(idx_row + j) * BLOCK_N
    else:
        start = j * BLOCK_N
    return start


@triton.jit
def FXFORGE_KERNEL_NAME(Q, K, V, MASK, O, QD, KD, VD, sm_scale,
                        q_sb, q_sh, q_sm, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
                        m_sb, m_sh, m_sm, m_sn, o_sb, o_sh, o_sm, o_sd,
                        H, H_KV, LQ, LK, D, SINK, WINDOW, Q_ROWS, K_ROWS, V_ROWS,
                        FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, MAX_BLOCKS,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                        USE_LAYOUT: tl.constexpr, OUT_BF16: tl.constexpr, IEEE: tl.constexpr, D_CONST: tl.constexpr,
                        TMA: tl.constexpr, LPT: tl.constexpr, WS: tl.constexpr, SCALE_POS: tl.constexpr, PIPE: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    if LPT == 1:  # heavy (late, for causal) query blocks of all heads first
        bh = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    elif LPT == 2:  # head by head, heavy query blocks first: co-resident programs share one head's K/V in L2
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
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
        n_part = tl.load(PART_CNT + pid_m)
        full_end = 0
        part_end = 0
    else:
        if CAUSAL:  # off-band blocks (entirely at or below the diagonal) run unmasked
            full_end = tl.minimum(((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N, (LK // BLOCK_N) * BLOCK_N)
            part_end = tl.minimum((pid_m + 1) * BLOCK_M, LK)
        else:
            full_end = (LK // BLOCK_N) * BLOCK_N
            part_end = LK
        n_full = full_end // BLOCK_N
        n_part = tl.cdiv(part_end - full_end, BLOCK_N)
    full_row = FULL_IDX + pid_m * MAX_BLOCKS
    if PIPE and not HAS_MASK and SCALE_POS:
        # Software-pipelined full blocks: the QK dot of block j is issued before the softmax and
        # PV dot of block j-1, so the tensor cores can run it while the softmax of j-1 computes.
        if n_full > 0:
            start = _block_start(0, full_row, BLOCK_N, USE_LAYOUT)
            qk = _qk(q, _load_rows(k_src, k_row, k_sn, k_sd, start, offs_d, LK, D, BLOCK_N, False, EVEN_D, TMA, INTERPRETED), IEEE)
            for j in tl.range(1, n_full, warp_specialize=WS):
                nxt = _block_start(j, full_row, BLOCK_N, USE_LAYOUT)
                qk_next = _qk(q, _load_rows(k_src, k_row, k_sn, k_sd, nxt, offs_d, LK, D, BLOCK_N, False, EVEN_D, TMA,
                                            INTERPRETED), IEEE)
                v = _load_rows(v_src, v_row, v_sn, v_sd, start, offs_d, LK, D, BLOCK_N, False, EVEN_D, TMA, INTERPRETED)
                acc, l_i, m_i = _update_full(acc, l_i, m_i, qk, v, qk_scale, IEEE)
                qk = qk_next
                start = nxt
            v = _load_rows(v_src, v_row, v_sn, v_sd, start, offs_d, LK, D, BLOCK_N, False, EVEN_D, TMA, INTERPRETED)
            acc, l_i, m_i = _update_full(acc, l_i, m_i, qk, v, qk_scale, IEEE)
    else:
        for j in tl.range(0, n_full, warp_specialize=WS):
            start_n = _block_start(j, full_row, BLOCK_N, USE_LAYOUT)
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                       start_n, offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, False, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, EVEN_D, TMA, SCALE_POS, INTERPRETED)
    for j in range(n_part):  # partial blocks: element masks
        if USE_LAYOUT:
            start_n = tl.load(PART_IDX + pid_m * MAX_BLOCKS + j) * BLOCK_N
        else:
            start_n = full_end + j * BLOCK_N
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_src, v_src, k_row, v_row, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                   start_n, offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                   BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, EVEN_D, TMA, SCALE_POS, INTERPRETED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if INTERPRETED and OUT_BF16:
        out = _round_bf16(out)
    tl.store(O + b * o_sb + h * o_sh + offs_m[:, None] * o_sm + offs_d[None, :] * o_sd, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
