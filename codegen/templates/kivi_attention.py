# fxforge KIVI decode-attention template: split-KV ("flash-decoding") attention for a few query tokens
# against a KIVI-quantized KV cache (passes/quant/kv.py), decoding the 2/4-bit codes in registers.
# SDPA semantics with GQA (query head h reads kv head h // (H // H_KV)), no mask, no causal masking.
#
# Cache segments: tokens [0, NQ) are quantized (keys per channel in groups of G tokens, values per
# token in groups of GV channels, code·scale + min), tokens [NQ, S) are the full-precision residual
# window (S - NQ < R + G tokens, all S when S ≤ R; read as ordinary tiles in its own dtype).
#
# Kernel 1 (FXFORGE_KERNEL_NAME_split), grid (SPLITS, B·H_KV, ceil(Gq / BLOCK_M)): one program owns the
# Gq = (H // H_KV)·LQ query rows of one kv head packed into one BLOCK_M tile (GQA reuse: each code tile
# is decoded once for the whole group) and one chunk [split·CHUNK, min(split·CHUNK + CHUNK, NQ)) of the
# quantized tokens (CHUNK a multiple of BLOCK_N). The last split also reads the residual window after
# its chunk, so both segments meet in one online softmax (base 2). Per BLOCK_N tokens it loads
#   K: the packed bytes k_codes[d, t0/PER : t0/PER + BLOCK_N/PER] as a [HEAD_DIM, BLOCK_N/PER] uint8
#      tile, unpacks it (shift + mask, tl.join tree, reshape) into a [HEAD_DIM, BLOCK_N] K^T tile in
#      token order, applies k_scale/k_min [d, t // G] (loaded once per group and broadcast when G is a
#      power of two dividing BLOCK_N, else gathered per element) and computes q @ K^T directly;
#   V: the bytes v_codes[t, 0 : D/PER] as [BLOCK_N, HEAD_DIM/PER], unpacked along channels to
#      [BLOCK_N, HEAD_DIM], v_scale/v_min [t, d // GV] (broadcast when GV is a power of two, else
#      gathered), then P @ V.
# Variants (constexprs; runtime/kivi_attention.kivi_configs lists them, first = default):
#   FOLD_K  (BLOCK_N == G, one key group per tile) the per-channel key scales are folded into q and the
#           key mins into one per-row term: q·k_t = (q∘s_g)·c_t + q·m_g; the K tile is only decoded codes.
#   K_MAGIC (bf16 q with FOLD_K) codes become bf16 straight from their bits (0x4300 | c = 128 + c) with
#           the 128 offset removed in the per-row term: no float conversion of K at all.
#   V_TF32  P @ V as a TF32 dot on fp32 P / V (no fp32 -> bf16 conversions of the V tile).
# Code -> float decoding everywhere is bit arithmetic (2^23 + c minus 2^23): int -> float and
# fp32 -> bf16 conversions run at 1/8 of the FP32 rate on the H100, and the first GPU run (BLOCK_N 128,
# 16 splits: one 4-warp program per SM) was ALU/latency-bound at 0.09-0.16 of HBM; on CUDA the runtime
# now picks ~4 programs per SM (kivi_attention.auto_splits: 64 splits at B=1, Hkv=8, 32K).
# It writes the unnormalized partial output and (m, l) to the workspace; with SPLITS == 1 (SINGLE) it
# normalizes and writes the output itself. Kernel 2 is decode_attention's combine kernel (the
# workspace layout is the same: acc [B, H, LQ, SPLITS, D] then (m, l) [B, H, LQ, SPLITS, 2], fp32).
#
# Bytes model (memory-bound; the dequant is ~4 integer/fp ops per cached element, the dots ~4·H·LQ·S·D
# FLOPs): bytes = B·H_KV·(NQ·kivi_bytes_per_token(bits, D, G, GV) + (S - NQ)·2·D·elt_residual)
#   + q and out (B·H·LQ·D·elt each) + workspace (B·H·LQ·SPLITS·(D + 2)·4, written once, read once),
# kivi_bytes_per_token = 2·D·bits/8 (codes) + 2·D·sb/G (key scale+min) + 2·(D/GV)·sb (value scale+min).
# B=1, H_KV=8, S=32768, D=128, G=GV=32, R=32, fp16 scales (sb=2), bf16 residual, H=32, LQ=1, 16 splits:
#   bf16 cache (plain decode_attention): 2·S·D·2·H_KV = 134.2 MB → 44.7 µs at 3.0 TB/s;
#   KIVI-2: 96 B/token/head (64 codes + 16 + 16) → NQ = 32736 tokens: 25.14 MB + residual 32 tokens
#           0.13 MB = 25.27 MB (5.31× smaller than bf16) + 0.55 MB q/out/workspace → 25.8 MB → 8.6 µs;
#   KIVI-4: 160 B/token/head (128 + 16 + 16) → 42.03 MB (3.19× smaller) → 42.6 MB total → 14.2 µs.
# At that size two launches (~1.2 µs each in a CUDA graph) and the in-register unpacking matter: the
# issue's target is ≥ 2× faster than bf16 SDPA decode (64.7 µs on the H100) — not yet measured.
import triton
import triton.language as tl
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16


@triton.jit
def _unpack_codes(b, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """uint8 [ROWS, COLS] packed codes -> int32 codes [ROWS, COLS·8/BITS], element j·PER + i of a row taken
    from bits i·BITS of byte j (pack_bits' order)."""
    bi = b.to(tl.int32)
    if BITS == 4:
        c = tl.join(bi & 15, bi >> 4)  # [ROWS, COLS, 2]: sub-index i
    else:  # join(join(c0, c2), join(c1, c3)) flattens to c0 c1 c2 c3 per byte
        c = tl.join(tl.join(bi & 3, (bi >> 4) & 3), tl.join((bi >> 2) & 3, bi >> 6))
    return tl.reshape(c, (ROWS, COLS * (8 // BITS)))


@triton.jit
def _unpack(b, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """The codes of _unpack_codes as float32. The int -> float step is bit arithmetic (the float 2^23 + c
    minus 2^23), not an I2F conversion (1/8 of the FP32 rate on the H100)."""
    c = _unpack_codes(b, ROWS, COLS, BITS)
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _group_param(base, s_row, s_grp, offs_r, r_ok, offs_c, c_ok, g0, lim, GRP: tl.constexpr, BCAST: tl.constexpr,
                 ROWS: tl.constexpr, COLS: tl.constexpr, FULL: tl.constexpr):
    """A [ROWS, COLS] float32 tile of ``base[r, c // GRP]`` (0 where masked), groups along the columns.
    BCAST (GRP a power of two dividing COLS, offs_c = g0·GRP + arange(COLS)): one load per group,
    broadcast over its GRP members, groups starting at or after ``lim`` masked. Else one (cached)
    load per element, for any group size. FULL: every element is in range (unmasked loads)."""
    if BCAST:
        NG: tl.constexpr = COLS // GRP
        g = g0 + tl.arange(0, NG)
        ptrs = base + offs_r[:, None] * s_row + g[None, :] * s_grp
        if FULL:
            x = tl.load(ptrs).to(tl.float32)
        else:
            x = tl.load(ptrs, mask=r_ok[:, None] & (g * GRP < lim)[None, :], other=0.0).to(tl.float32)
        x = tl.reshape(tl.broadcast_to(x[:, :, None], (ROWS, NG, GRP)), (ROWS, COLS))
    else:
        x = tl.load(base + offs_r[:, None] * s_row + (offs_c // GRP)[None, :] * s_grp,
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    return x


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, v, n_ok, DOT_DTYPE, CHECK: tl.constexpr, IEEE: tl.constexpr,
                V_TF32: tl.constexpr = False):
    """One online-softmax step (base 2) from scaled scores s [BLOCK_M, BLOCK_N] and a [BLOCK_N, HEAD_DIM] V tile.
    V_TF32: P @ V as a TF32 dot of the fp32 P and decoded V (10-bit mantissas, finer than bf16's 7): no
    fp32 -> bf16 conversions of the V tile (those run at 1/8 of the FP32 rate on the H100)."""
    if CHECK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    elif V_TF32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
    return acc, l_i, m_new


@triton.jit
def _update(acc, l_i, m_i, q, kt, v, n_ok, qk_scale, CHECK: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step (base 2) over a [HEAD_DIM, BLOCK_N] K^T tile and a [BLOCK_N, HEAD_DIM] V tile."""
    if IEEE:  # fp32 q: full-precision dots, as eager (Triton's default would be TF32)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, kt.to(q.dtype)) * qk_scale
    return _softmax_pv(acc, l_i, m_i, s, v, n_ok, q.dtype, CHECK, IEEE)


@triton.jit
def _quant_step(acc, l_i, m_i, q, q32, kc_base, kc_sd, kc_st, ks_base, km_base, ks_sd, ks_sg,
                vc_base, vc_st, vc_sd, vs_base, vm_base, vs_st, vs_sg, t0, hi, offs_d, d_ok, D, qk_scale,
                BITS: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, K_BCAST: tl.constexpr, V_BCAST: tl.constexpr, CHECK: tl.constexpr,
                EVEN_D: tl.constexpr, IEEE: tl.constexpr, FOLD_K: tl.constexpr, K_MAGIC: tl.constexpr,
                INTERPRETED: tl.constexpr, V_TF32: tl.constexpr):
    """Tokens [t0, min(t0 + BLOCK_N, hi)) of the quantized segment (t0 a multiple of BLOCK_N and of G).
    CHECK: a ragged block (token masks); with neither CHECK nor a padded head dim the loads are unmasked.
    FOLD_K (BLOCK_N == G: one key group per tile): the per-channel key scales go into q and the key mins
    into one term per query row, q·k_t = (q∘s)·c_t + q·m, so the K tile is only the decoded codes."""
    PER: tl.constexpr = 8 // BITS
    FULL: tl.constexpr = EVEN_D and not CHECK
    offs_t = t0 + tl.arange(0, BLOCK_N)
    t_ok = offs_t < hi
    # K^T: packed along tokens; hi is a multiple of G (so of PER): a byte is all valid or all padding
    offs_kb = t0 // PER + tl.arange(0, BLOCK_N // PER)
    kb_ptrs = kc_base + offs_d[:, None] * kc_sd + offs_kb[None, :] * kc_st
    if FULL:
        kb = tl.load(kb_ptrs)
    else:
        kb = tl.load(kb_ptrs, mask=d_ok[:, None] & (offs_kb * PER < hi)[None, :], other=0)
    if not K_MAGIC:
        kt = _unpack(kb, HEAD_DIM, BLOCK_N // PER, BITS)
    g0 = t0 // G
    if FOLD_K:
        # t0 < hi inside the loops and hi is a multiple of G = BLOCK_N: the group is always in range
        k_sc = tl.load(ks_base + offs_d * ks_sd + g0 * ks_sg, mask=d_ok, other=0.0).to(tl.float32)
        k_mn = tl.load(km_base + offs_d * ks_sd + g0 * ks_sg, mask=d_ok, other=0.0).to(tl.float32)
        qs = q32 * k_sc[None, :]
        if K_MAGIC:
            # bf16 q: the codes become bf16 straight from their bits, 0x4300 | c = 128 + c (no float
            # conversion at all), and the offset leaves through the per-row term: with qs rounded to bf16
            # once, q·k_t = qs·(128 + c_t) - 128·sum(qs) + q·m, the 128·sum(qs) parts cancelling exactly
            # up to fp32 accumulation error (~2^-24·128·sum|qs|, far below bf16 rounding).
            kc = _unpack_codes(kb, HEAD_DIM, BLOCK_N // PER, BITS)
            if INTERPRETED:  # the interpreter's bf16 dot is unreliable: the same values in fp32
                qs16 = _round_bf16(qs)
                s = tl.dot(qs16, ((kc + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0)
            else:
                qs_b = qs.to(tl.bfloat16)
                qs16 = qs_b.to(tl.float32)
                s = tl.dot(qs_b, (kc | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True))
            qm = tl.sum(q32 * k_mn[None, :] - 128.0 * qs16, 1)
        else:
            qm = tl.sum(q32 * k_mn[None, :], 1)
            if IEEE:
                s = tl.dot(qs, kt, input_precision="ieee")
            else:
                s = tl.dot(qs.to(q.dtype), kt.to(q.dtype))
        s = (s + qm[:, None]) * qk_scale
    else:
        k_sc = _group_param(ks_base, ks_sd, ks_sg, offs_d, d_ok, offs_t, t_ok, g0, hi, G, K_BCAST, HEAD_DIM, BLOCK_N,
                            FULL)
        k_mn = _group_param(km_base, ks_sd, ks_sg, offs_d, d_ok, offs_t, t_ok, g0, hi, G, K_BCAST, HEAD_DIM, BLOCK_N,
                            FULL)
        kt = kt * k_sc + k_mn
        if IEEE:  # fp32 q: full-precision dots, as eager (Triton's default would be TF32)
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt.to(q.dtype)) * qk_scale
    # V: packed along channels (D is a multiple of PER)
    offs_vb = tl.arange(0, HEAD_DIM // PER)
    vb_ptrs = vc_base + offs_t[:, None] * vc_st + offs_vb[None, :] * vc_sd
    if FULL:
        vb = tl.load(vb_ptrs)
    else:
        vb = tl.load(vb_ptrs, mask=t_ok[:, None] & (offs_vb * PER < D)[None, :], other=0)
    v = _unpack(vb, BLOCK_N, HEAD_DIM // PER, BITS)
    v_sc = _group_param(vs_base, vs_st, vs_sg, offs_t, t_ok, offs_d, d_ok, 0, D, GV, V_BCAST, BLOCK_N, HEAD_DIM, FULL)
    v_mn = _group_param(vm_base, vs_st, vs_sg, offs_t, t_ok, offs_d, d_ok, 0, D, GV, V_BCAST, BLOCK_N, HEAD_DIM, FULL)
    v = v * v_sc + v_mn
    return _softmax_pv(acc, l_i, m_i, s, v, t_ok, q.dtype, CHECK, IEEE, V_TF32)


@triton.jit
def _residual_step(acc, l_i, m_i, q, kr_base, kr_sn, kr_sd, vr_base, vr_sn, vr_sd, n0, NR, offs_d, d_ok, qk_scale,
                   BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Tokens [n0, min(n0 + BLOCK_N, NR)) of the full-precision residual window."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NR
    kt = tl.load(kr_base + offs_d[:, None] * kr_sd + offs_n[None, :] * kr_sn, mask=d_ok[:, None] & n_ok[None, :],
                 other=0.0).to(tl.float32)
    v = tl.load(vr_base + offs_n[:, None] * vr_sn + offs_d[None, :] * vr_sd, mask=n_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    return _update(acc, l_i, m_i, q, kt, v, n_ok, qk_scale, True, IEEE)


@triton.jit
def FXFORGE_KERNEL_NAME_split(Q, KC, KS, KM, VC, VS, VM, KR, VR, O, ACC, ML, sm_scale,
                              q_sb, q_sh, q_sm, q_sd, kc_sb, kc_sh, kc_sd, kc_st, ks_sb, ks_sh, ks_sd, ks_sg,
                              vc_sb, vc_sh, vc_st, vc_sd, vs_sb, vs_sh, vs_st, vs_sg,
                              kr_sb, kr_sh, kr_sn, kr_sd, vr_sb, vr_sh, vr_sn, vr_sd, o_sb, o_sh, o_sm, o_sd,
                              H, H_KV, LQ, NQ, NR, D, CHUNK, SPLITS,
                              BITS: tl.constexpr, G: tl.constexpr, GV: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                              K_BCAST: tl.constexpr, V_BCAST: tl.constexpr, SINGLE: tl.constexpr,
                              OUT_BF16: tl.constexpr, IEEE: tl.constexpr, D_CONST: tl.constexpr,
                              INTERPRETED: tl.constexpr, FOLD_K: tl.constexpr = False,
                              K_MAGIC: tl.constexpr = False, V_TF32: tl.constexpr = False):
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
    if INTERPRETED:  # the CPU interpreter's low-precision dot is unreliable; compute in fp32 there
        q = q.to(tl.float32)
    q32 = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kc_base = KC + b * kc_sb + hk * kc_sh
    ks_base, km_base = KS + b * ks_sb + hk * ks_sh, KM + b * ks_sb + hk * ks_sh
    vc_base = VC + b * vc_sb + hk * vc_sh
    vs_base, vm_base = VS + b * vs_sb + hk * vs_sh, VM + b * vs_sb + hk * vs_sh
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, NQ)
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N  # only the chunk's last block is ragged
    EVEN_D: tl.constexpr = HEAD_DIM == D_CONST
    for t0 in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _quant_step(acc, l_i, m_i, q, q32, kc_base, kc_sd, kc_st, ks_base, km_base, ks_sd, ks_sg,
                                    vc_base, vc_st, vc_sd, vs_base, vm_base, vs_st, vs_sg, t0, hi, offs_d, d_ok, D,
                                    qk_scale, BITS, G, GV, BLOCK_N, HEAD_DIM, K_BCAST, V_BCAST, False, EVEN_D, IEEE, FOLD_K,
                                    K_MAGIC, INTERPRETED, V_TF32)
    for t0 in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _quant_step(acc, l_i, m_i, q, q32, kc_base, kc_sd, kc_st, ks_base, km_base, ks_sd, ks_sg,
                                    vc_base, vc_st, vc_sd, vs_base, vm_base, vs_st, vs_sg, t0, hi, offs_d, d_ok, D,
                                    qk_scale, BITS, G, GV, BLOCK_N, HEAD_DIM, K_BCAST, V_BCAST, True, EVEN_D, IEEE, FOLD_K,
                                    K_MAGIC, INTERPRETED, V_TF32)
    # the last split also reads the full-precision residual window [NQ, S)
    r_hi = tl.where(split == SPLITS - 1, NR, 0)
    kr_base = KR + b * kr_sb + hk * kr_sh
    vr_base = VR + b * vr_sb + hk * vr_sh
    for n0 in range(0, r_hi, BLOCK_N):
        acc, l_i, m_i = _residual_step(acc, l_i, m_i, q, kr_base, kr_sn, kr_sd, vr_base, vr_sn, vr_sd, n0, NR,
                                       offs_d, d_ok, qk_scale, BLOCK_N, IEEE)
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
