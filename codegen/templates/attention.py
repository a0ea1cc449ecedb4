# fxforge attention template: FlashAttention-2 style forward (online softmax in base 2) over a
# block layout. Per query block the key blocks are either FULL (no element mask needed) or PARTIAL
# (bounds / causal / sink+window / user mask checked per element); blocks in neither list are
# skipped. Without an explicit layout the lists are derived in-kernel: dense = all full but the
# ragged last block, causal = full below the diagonal, partial on it, nothing above.
#
# Bytes/FLOPs model per (batch, head): 4·Lq·Lk·D FLOPs dense (half that causal); bytes =
# (Lq + 2·Lk·ceil(Lq/BLOCK_M))·D·elt — compute-bound for Lq ≥ a few hundred on the H100.
import triton
import triton.language as tl
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
               offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
               BLOCK_N: tl.constexpr, CHECK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               MASK_BOOL: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr, INTERPRETED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < LK
    d_ok = offs_d < D
    k_ptrs = k_base + offs_n[:, None] * k_sn + offs_d[None, :] * k_sd
    v_ptrs = v_base + offs_n[:, None] * v_sn + offs_d[None, :] * v_sd
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
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
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
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def FXFORGE_KERNEL_NAME(Q, K, V, MASK, O, sm_scale,
                        q_sb, q_sh, q_sm, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
                        m_sb, m_sh, m_sm, m_sn, o_sb, o_sh, o_sm, o_sd,
                        H, H_KV, LQ, LK, D, SINK, WINDOW,
                        FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, MAX_BLOCKS,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                        USE_LAYOUT: tl.constexpr, OUT_BF16: tl.constexpr, IEEE: tl.constexpr, D_CONST: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // H_KV)  # GQA/MQA: query heads share key/value heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * q_sb + h * q_sh + offs_m[:, None] * q_sm + offs_d[None, :] * q_sd,
                mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * k_sb + hk * k_sh
    v_base = V + b * v_sb + hk * v_sh
    mask_rows = MASK + b * m_sb + h * m_sh + offs_m[:, None] * m_sm
    if USE_LAYOUT:
        n_full = tl.load(FULL_CNT + pid_m)
        for i in range(0, n_full):
            start_n = tl.load(FULL_IDX + pid_m * MAX_BLOCKS + i) * BLOCK_N
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
                                       offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, False, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, HEAD_DIM == D_CONST, INTERPRETED)
        n_part = tl.load(PART_CNT + pid_m)
        for i in range(0, n_part):
            start_n = tl.load(PART_IDX + pid_m * MAX_BLOCKS + i) * BLOCK_N
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
                                       offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, HEAD_DIM == D_CONST, INTERPRETED)
    else:
        if CAUSAL:  # off-band blocks (entirely at or below the diagonal) run unmasked
            full_end = tl.minimum(((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N, (LK // BLOCK_N) * BLOCK_N)
            part_end = tl.minimum((pid_m + 1) * BLOCK_M, LK)
        else:
            full_end = (LK // BLOCK_N) * BLOCK_N
            part_end = LK
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
                                       offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, False, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, HEAD_DIM == D_CONST, INTERPRETED)
        for start_n in range(full_end, part_end, BLOCK_N):
            acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
                                       offs_m, offs_d, LQ, LK, D, qk_scale, SINK, WINDOW,
                                       BLOCK_N, True, CAUSAL, HAS_MASK, MASK_BOOL, IEEE, HEAD_DIM == D_CONST, INTERPRETED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if INTERPRETED and OUT_BF16:
        out = _round_bf16(out)
    tl.store(O + b * o_sb + h * o_sh + offs_m[:, None] * o_sm + offs_d[None, :] * o_sd, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D))
