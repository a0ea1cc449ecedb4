# fxforge decode-attention template: split-KV ("flash-decoding") attention for a few query tokens
# against a long key/value cache, SDPA semantics with GQA/MQA (query head h reads kv head
# h // (H // H_KV)), no causal mask, optional bool / additive user mask.
#
# Kernel 1 (FXFORGE_KERNEL_NAME_split), grid (SPLITS, B·H_KV, ceil(G / BLOCK_M)): one program owns
# every query row of one kv head group, G = (H // H_KV)·LQ rows (query head × query token) packed
# into one BLOCK_M tile (rows ≥ G masked), and one contiguous chunk of the keys (CHUNK keys, a
# multiple of BLOCK_N). Each K/V block is loaded once for the whole group (GQA reuse), scores go
# through an online softmax in base 2, and the program writes its unnormalized partial output
# acc [B, H, LQ, SPLITS, D] plus the per-row running max m and sum l [B, H, LQ, SPLITS] (fp32,
# m in log2 units). With SPLITS == 1 (SINGLE) it normalizes and writes the output directly.
# Kernel 2 (FXFORGE_KERNEL_NAME_combine), grid (B·H·LQ, HEAD_DIM / BLOCK_D): merges the splits of one row
# with the log-sum-exp rescale for BLOCK_D channels and writes them in the output's dtype (each program
# recomputes the row's (m, l) merge: a few hundred bytes; chunks of D give a single decode row (B·H = 32
# rows) enough programs to read the 2 MB workspace in parallel). Rows that see no key give 0. PDL (sm_90+):
# kernel 1 lets it launch early and it waits for kernel 1's writes in griddepcontrol.wait (its launch gap
# hidden, as for the quantized GEMV's split-K reduce).
#
# Bytes model (memory-bound; ~4·H·LQ·S·D FLOPs are negligible at LQ ≤ 16): bytes = K + V cache read
# once, B·H_KV·S·D·2·elt, + q and out (B·H·LQ·D·elt each) + workspace (B·H·LQ·SPLITS·(D + 2)·4,
# written once and read once). Expected time at ~3.0 TB/s HBM (H100 SXM): B=1, H_KV=8, S=32768,
# D=128 bf16 → 134 MB → ~45 µs; the 853M decoder's layer at S=2048, H_KV=8, D=64 bf16 → 4.2 MB →
# ~1.4 µs plus two launches (~1.2 µs each inside a CUDA graph, several µs each without one).
# Measured on an H100 (CUDA-graph replay, default config, automatic splits): the first case 50.0 µs
# (2.7 TB/s; eager SDPA 50.8), with Tq=4 51.6 µs (SDPA 365); the 853M layer 7.6 µs (kernel 1 alone
# 5.0; SDPA 7.3): latency-bound, not bandwidth-bound, at that size.
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import (
    pdl_launch_dependents as _pdl_launch_dependents,
)
from fxforge.codegen.quant_helpers import pdl_wait as _pdl_wait
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16


@triton.jit
def _decode_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn, start_n,
                 row_ok, offs_d, LK, D, qk_scale,
                 BLOCK_N: tl.constexpr, CHECK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 IEEE: tl.constexpr, EVEN_D: tl.constexpr, INTERPRETED: tl.constexpr):
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
        mv = tl.load(mask_rows[:, None] + offs_n[None, :] * m_sn, mask=row_ok[:, None] & n_ok[None, :], other=0)
        if MASK_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if CHECK:
        s = tl.where(n_ok[None, :] & row_ok[:, None], s, float("-inf"))
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
def FXFORGE_KERNEL_NAME_split(Q, K, V, MASK, O, ACC, ML, sm_scale,
                              q_sb, q_sh, q_sm, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
                              m_sb, m_sh, m_sm, m_sn, o_sb, o_sh, o_sm, o_sd,
                              H, H_KV, LQ, LK, D, CHUNK, SPLITS,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SINGLE: tl.constexpr,
                              OUT_BF16: tl.constexpr, IEEE: tl.constexpr, D_CONST: tl.constexpr,
                              INTERPRETED: tl.constexpr, PDL: tl.constexpr = False):
    if not SINGLE:  # the combine kernel may be scheduled now (it waits for this grid in pdl_wait)
        _pdl_launch_dependents(PDL)
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // H_KV).to(tl.int64)
    hk = (bhk % H_KV).to(tl.int64)
    grp = H // H_KV
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (query head in group, token)
    row_ok = rows < grp * LQ
    h = hk * grp + rows // LQ
    t = rows % LQ
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    q = tl.load(Q + b * q_sb + h[:, None] * q_sh + t[:, None] * q_sm + offs_d[None, :] * q_sd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * k_sb + hk * k_sh
    v_base = V + b * v_sb + hk * v_sh
    mask_rows = MASK + b * m_sb + h * m_sh + t * m_sm
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, LK)
    full_end = lo + ((hi - lo) // BLOCK_N) * BLOCK_N  # CHUNK is a multiple of BLOCK_N: only the last block is ragged
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _decode_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                     start_n, row_ok, offs_d, LK, D, qk_scale,
                                     BLOCK_N, False, HAS_MASK, MASK_BOOL, IEEE, HEAD_DIM == D_CONST, INTERPRETED)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _decode_step(acc, l_i, m_i, q, k_base, v_base, k_sn, k_sd, v_sn, v_sd, mask_rows, m_sn,
                                     start_n, row_ok, offs_d, LK, D, qk_scale,
                                     BLOCK_N, True, HAS_MASK, MASK_BOOL, IEEE, HEAD_DIM == D_CONST, INTERPRETED)
    if SINGLE:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if INTERPRETED and OUT_BF16:
            out = _round_bf16(out)
        tl.store(O + b * o_sb + h[:, None] * o_sh + t[:, None] * o_sm + offs_d[None, :] * o_sd,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        ws_row = ((b * H + h) * LQ + t) * SPLITS + split  # workspace row of (b, h, t, split)
        tl.store(ACC + ws_row[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(ML + ws_row * 2, m_i, mask=row_ok)
        tl.store(ML + ws_row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def FXFORGE_KERNEL_NAME_combine(ACC, ML, O, o_sb, o_sh, o_sm, o_sd, H, LQ, D, SPLITS,
                                BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, OUT_BF16: tl.constexpr,
                                INTERPRETED: tl.constexpr, BLOCK_D: tl.constexpr = 0, PDL: tl.constexpr = False):
    _pdl_wait(PDL)  # launched with PDL after the split kernel that wrote the workspace
    row = tl.program_id(0).to(tl.int64)  # (b, h, t) flattened
    t = row % LQ
    h = (row // LQ) % H
    b = row // (LQ * H)
    BD: tl.constexpr = HEAD_DIM if BLOCK_D == 0 else BLOCK_D  # channels of this program
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs_d < D
    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    l_run = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([BD], tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < SPLITS
        ws_row = row * SPLITS + offs_s
        m_s = tl.load(ML + ws_row * 2, mask=s_ok, other=float("-inf"))
        l_s = tl.load(ML + ws_row * 2 + 1, mask=s_ok, other=0.0)
        a_s = tl.load(ACC + ws_row[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split of this row saw a key yet
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m_s - m_safe)
        l_run = l_run * alpha + tl.sum(w * l_s, 0)
        acc = acc * alpha + tl.sum(w[:, None] * a_s, 0)
        m_run = m_new
    l_safe = tl.where(l_run == 0.0, 1.0, l_run)
    out = acc / l_safe
    if INTERPRETED and OUT_BF16:
        out = _round_bf16(out)
    tl.store(O + b * o_sb + h * o_sh + t * o_sm + offs_d * o_sd, out.to(O.dtype.element_ty), mask=d_ok)
