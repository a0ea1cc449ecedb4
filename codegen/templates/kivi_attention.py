# fxforge KIVI decode-attention template: split-KV ("flash-decoding") attention for a few query tokens
# against a KIVI-quantized KV cache (passes/quant/kv.py), reading the 2/4-bit codes directly.
# SDPA semantics with GQA (query head h reads kv head h // (H // H_KV)), no mask, no causal masking.
#
# Cache (kv.py, "channel-planar" codes): tokens [0, NQ) quantized, k_codes / v_codes [t, DP] bytes with
# DP = D / PER (PER = 8 / BITS codes per byte): channel d of token t in byte d % DP at shift (d // DP)·BITS,
# so bit plane i of a token's bytes is the contiguous channel range [i·DP, (i+1)·DP). Keys per channel in
# groups of G tokens (k_scale/k_min [t // G, d]), values per token in groups of GV channels
# (v_scale/v_min [t, d // GV]); x = code·scale + min. Tokens [NQ, NQ + NR) are the full-precision
# residual window, slot n of the residual tensors (or, with device lengths, slot (NQ + n) % RING of a ring).
#
# Kernel 1 (FXFORGE_KERNEL_NAME_split), grid (SPLITS, B·H_KV, ceil(Gq / BLOCK_M)): one program owns the
# Gq = (H // H_KV)·LQ query rows of one kv head in one BLOCK_M tile (each code tile decoded once for the
# whole GQA group) and the chunk [split·CHUNK, split·CHUNK + CHUNK) ∩ [0, NQ) of quantized tokens; the last
# split also reads the residual window, so both segments meet in one online softmax (base 2).
#
# FAST path (FAST: D = HEAD_DIM a power of two, DP >= 16, BLOCK_N = G a power of two, W = min(DP, GV)):
# per tile of one key group it loads the [G, DP] key bytes and the value bytes once and works plane by plane,
# never interleaving decoded codes in registers:
#   keys    one tl.dot per bit plane (a K-split of q·Kᵀ over the plane's channel range) on the plane's keys
#           dequantized per element, (c - MID)·s + (m + MID·s) in the dot dtype; K_FOLD instead folds the
#           group's key scales into q (q∘s per plane) and the mins into one term per query row;
#   values  out[:, chunk a] += P·V_a for each W-wide channel chunk a of a plane (inside one value group),
#           V_a dequantized per element likewise; V_FOLD folds the value scales into P per token (P∘s) and
#           the mins into one term per row. NACC = D / W ≤ 4 accumulators [BLOCK_M, W], stored side by side.
#   codes   c - MID exactly in the dot dtype from their bits (bf16 0x4280 | c << 1 = 64 + c minus 64 + MID;
#           fp16 0x6000 | c << 1 = 512 + c minus 512 + MID: a base whose ulp is 1/2, so base + MID is exact);
#           centring on MID = (2^BITS - 1)/2 keeps |c - MID|·s within half a group's range, so rounding s, m'
#           and the fma to bf16 errs like rounding the dequantized value itself. fp32 q: exact c·s + m and IEEE
#           dots. No int -> float conversions (1/4-1/8 of the FP32 rate on the H100).
#   PACKED  (GPU, bf16 / fp16 dots without folds; on in every FAST config): _planes_packed decodes 4 code
#           bytes to every plane's c - MID in 16-bit pairs with one inline-PTX block (PRMT the bytes into the
#           two halves once, then per plane and pair shift + LOP3 + packed subtract): the same values, the
#           same output bits (GPU test), ~1.6 instructions per code instead of ~4.
#   VS_WORD (on in every FAST config; the launch drops it unless 2-byte scales, 4 value groups per token,
#           contiguous and 8-byte aligned): each token's value scales and mins read as one int64 each and
#           split by shifts -- the same values; offline sm_90 2-bit loop 906 -> 785 instructions per tile (the
#           64 synchronous LDG.U16 become cp.async-pipelined 8-byte loads); H100 33.7 -> 29.2 us (2-bit).
#   KS_WORD (on in every FAST config; dropped unless 2-byte, contiguous, 4-byte aligned key scales and at
#           least 32 channels per plane): a plane's key scales and mins read as int32 channel pairs
#           (_word_pairs). For one-warp programs the 2-byte loads were plain loads the loop waited on (ncu:
#           long-scoreboard stalls 4.1 per instruction); as words they are cp.async-pipelined, which made the
#           one-warp uncapped 2-bit D = 128 config the default: 29.4 -> 25.8 us (probe_kivi_ksword.md).
#           Its loop (offline, 1212 instructions per 32-token tile): keys 382, softmax 59, values 771 -- of
#           which ~128 PRMT re-pair the decoded value planes from channel pairs to the token pairs the mma
#           B fragment takes (the next lever).
#   V_PAIRS (session 16, default): the value fma as explicit fma.rn.{bf16,f16}x2 on the token pairs the
#           decode and the mma use (_fma_token_pairs): offline 2-bit 1212 -> 1176, 4-bit 1321 -> 1278;
#           H100 2-bit 26.2 -> 25.7 us, 4-bit 29.4 -> 28.4 (probe_kivi_vpairs.md).
#   H100 (results/probe_kivi.md, offline sm_90 SASS): ~800 instructions per warp per 32-token tile with
#           4 warps, i.e. ~13 per cached element, most of them converting and broadcasting the per-channel /
#           per-token scales each thread's mma fragment needs (8 channels per thread per plane, 1 token each).
# GENERAL path (any D ≤ 256, any G / GV dividing as kv.py requires): tiles [HEAD_DIM, BLOCK_N] / [BLOCK_N,
# HEAD_DIM] gathered per element (byte d % DP, shift (d // DP)·BITS, scales per element), dequantized in fp32,
# ordinary dots; one accumulator (NACC = 1, W = HEAD_DIM).
#
# Device lengths (HAS_LENS, for CUDA graphs of a growing cache): LENS[b] = tokens cached for batch row b;
# NQ = G·floor((LENS[b] - RESID) / G) (0 when LENS[b] <= RESID), NR = LENS[b] - NQ; the code/scale tensors
# are capacity buffers, the residual a ring of RING slots. Splits past NQ write an empty partial (m = -inf).
#
# It writes the unnormalized partial output and (m, l) to the workspace; with SPLITS == 1 (SINGLE) it
# normalizes and writes the output itself. Kernel 2 is decode_attention's combine kernel (the workspace
# layout is the same: acc [B, H, LQ, SPLITS, D] then (m, l) [B, H, LQ, SPLITS, 2], fp32), launched with
# programmatic dependent launch on sm_90+ (PDL: this kernel signals it at its start).
#
# Bytes model (memory-bound in principle; in practice issue-bound, see above): bytes = B·H_KV·(NQ·kivi_bytes_per_token(bits, D, G, GV)
#   + NR·2·D·elt_residual) + q and out (B·H·LQ·D·elt each) + workspace (B·H·LQ·SPLITS·(D + 2)·4, written
#   once, read once), kivi_bytes_per_token = 2·D·bits/8 (codes) + 2·D·sb/G (key scale+min) + 2·(D/GV)·sb.
# B=1, H_KV=8, S=32768, D=128, G=GV=R=32, fp16 scales (sb=2), bf16 residual, H=32, LQ=1, 64 splits:
#   bf16 cache (plain decode_attention): 2·S·D·2·H_KV = 134.2 MB → 44.7 µs at 3.0 TB/s;
#   KIVI-2: 96 B/token/head (64 codes + 16 + 16) → 25.27 MB (5.31× smaller than bf16) + 0.55 MB q/out/
#           workspace → 25.8 MB → 8.6 µs;   KIVI-4: 160 B/token/head → 42.6 MB → 14.2 µs.
# Measured on the H100 (results/kv_decode_gpu.md and _run2.md, caches rotated past L2, CUDA graphs; session
# 16): KIVI-2 25.2 µs (2.06x SDPA's 51.9 on the bf16 cache, both runs; session 8: 0.90x, 14: 1.53x, 15:
# 1.97x), KIVI-4 28.5-28.7 µs (1.80-1.83x); the target is ≥ 2x. Session 14: the split combine per
# (row, 32 channels) in one step and PACKED; session 15: VS_WORD, KS_WORD and the one-warp 2-bit default;
# session 16: V_PAIRS. sm_90 loop (triton 3.6, 2-bit default, one warp, before V_PAIRS): 1212 instructions
# per 32-token tile (keys 382, softmax 59, values 771; with V_PAIRS 1176; see KS_WORD / V_PAIRS above),
# about 9.5 per cached element; the online softmax runs over 16 rows of which 4 are real (GQA 4, mma M 16).
import triton
import triton.language as tl
from fxforge.codegen.kivi_packed import fma_token_pairs as _fma_token_pairs
from fxforge.codegen.kivi_packed import half_of as _half_of
from fxforge.codegen.kivi_packed import planes_packed as _planes_packed
from fxforge.codegen.kivi_packed import word_pairs as _word_pairs
from fxforge.codegen.quant_helpers import (
    pdl_launch_dependents as _pdl_launch_dependents,
)
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16


@triton.jit
def _u2f(c):
    # int32 0 <= c < 2^23 -> float32 exactly from bits (2^23 + c minus 2^23): no I2F.
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _scale_ops(sc, mn, MID: tl.constexpr, DOT: tl.constexpr):
    """GPU bf16 / fp16 dots: (s, m + MID·s) in the dot dtype, so that c - MID (exact in the dot dtype)
    times s plus m + MID·s is the dequantized operand (bf16 scales with bf16 q: m + MID·s in bf16 and the
    fma in packed bf16, HFMA2, no conversions)."""
    if DOT == 2 and sc.dtype == tl.bfloat16:
        s2 = sc
        m2 = mn + MID * sc
    else:
        sc = sc.to(tl.float32)
        m2 = mn.to(tl.float32) + MID * sc
        if DOT == 2:
            s2 = sc.to(tl.bfloat16)
            m2 = m2.to(tl.bfloat16)
        else:
            s2 = sc.to(tl.float16)
            m2 = m2.to(tl.float16)
    return s2, m2


@triton.jit
def _scaled(cm, sc, mn, MID: tl.constexpr, DOT: tl.constexpr):
    """cm (c - MID exactly in the dot dtype) dequantized with scale / min broadcastable to it (_scale_ops)."""
    s2, m2 = _scale_ops(sc, mn, MID, DOT)
    return cm * s2 + m2


@triton.jit
def _round_operand(x, DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x -> the dot operand of the other side (bf16 / fp16 / fp32) and its value as fp32."""
    if DOT == 0:
        return x, x
    elif INTERPRETED:
        if DOT == 2:
            r = _round_bf16(x)
        else:
            r = x.to(tl.float16).to(tl.float32)
        return r, r
    else:
        if DOT == 2:
            r = x.to(tl.bfloat16)
        else:
            r = x.to(tl.float16)
        return r, r.to(tl.float32)


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr):
    if DOT == 0:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _pick(i: tl.constexpr, x0, x1, x2, x3):
    if i == 0:
        return x0
    elif i == 1:
        return x1
    elif i == 2:
        return x2
    return x3


@triton.jit
def _set(a: tl.constexpr, v, acc0, acc1, acc2, acc3):
    if a == 0:
        acc0 = v
    elif a == 1:
        acc1 = v
    elif a == 2:
        acc2 = v
    else:
        acc3 = v
    return acc0, acc1, acc2, acc3


@triton.jit
def _online_softmax(s, m_i, l_i, n_ok, CHECK: tl.constexpr):
    """Scores s [BLOCK_M, BLOCK_N] (base 2, scaled) -> (p, alpha, m_new, l_new)."""
    if CHECK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _centred(b, i: tl.constexpr, BITS: tl.constexpr, DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """Bit plane i of the int32 bytes b -> c - MID exactly in the dot dtype (a half-integer of at most 4
    significant bits; MID = (2^BITS - 1)/2). The codes become BASE + c from their bits with a BASE whose
    ulp is 1/2, so BASE + MID is representable too: bf16 0x4280 | c << 1 = 64 + c, fp16 0x6000 | c << 1 =
    512 + c; minus BASE + MID, exact. c << 1 comes straight from the byte: one shift by i·BITS - 1 and one
    mask (a separate shift per element cost one IMAD.SHL per code in the first sm_90 build)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    MID: tl.constexpr = ((1 << BITS) - 1) / 2
    if DOT == 0 or INTERPRETED:
        out = _u2f((b >> (i * BITS)) & MASK) - MID
    else:
        if i == 0:
            c2 = (b << 1) & (MASK << 1)
        else:
            c2 = (b >> (i * BITS - 1)) & (MASK << 1)
        if DOT == 2:
            out = (c2 | 0x4280).to(tl.int16).to(tl.bfloat16, bitcast=True) - (64.0 + MID)
        else:
            out = (c2 | 0x6000).to(tl.int16).to(tl.float16, bitcast=True) - (512.0 + MID)
    return out


@triton.jit
def _dequant(b, i: tl.constexpr, sc, mn, BITS: tl.constexpr, DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """Bit plane i of the int32 bytes b with scale / min broadcastable to it -> the dequantized dot operand.
    fp32 (DOT 0): c·s + m exactly as kv.py. bf16 / fp16: c - MID exactly (_centred), then one fma with
    s and m' = m + MID·s, both rounded to the dot dtype: centring on MID keeps |c - MID|·s within half the
    group's range, so the roundings err like rounding the dequantized value itself."""
    MID: tl.constexpr = ((1 << BITS) - 1) / 2
    if DOT == 2 and sc.dtype == tl.bfloat16:
        # bf16 scales with bf16 q: m' = m + MID·s and the fma stay in packed bf16 (HFMA2), no conversions
        # of the scales each thread's fragment replicates (fp16 scales cost ~3 ops per value there)
        if INTERPRETED:
            sb = sc.to(tl.float32)
            m2 = _round_bf16(mn.to(tl.float32) + MID * sb)
            out = _round_bf16(_centred(b, i, BITS, DOT, True) * sb + m2)
        else:
            out = _scaled(_centred(b, i, BITS, DOT, False), sc, mn, MID, DOT)
    else:
        sc = sc.to(tl.float32)
        mn = mn.to(tl.float32)
        m2 = mn + MID * sc
        if DOT == 0:
            out = _u2f((b >> (i * BITS)) & ((1 << BITS) - 1)) * sc + mn
        elif INTERPRETED:  # the GPU's values, computed in fp32 (the interpreter's bf16 / fp16 math is unreliable)
            cm = _centred(b, i, BITS, DOT, True)
            if DOT == 2:
                out = _round_bf16(cm * _round_bf16(sc) + _round_bf16(m2))
            else:
                out = (cm * sc.to(tl.float16).to(tl.float32)
                       + m2.to(tl.float16).to(tl.float32)).to(tl.float16).to(tl.float32)
        else:
            out = _scaled(_centred(b, i, BITS, DOT, False), sc, mn, MID, DOT)
    return out


@triton.jit
def _fast_step(acc0, acc1, acc2, acc3, l_i, m_i, q0, q1, q2, q3, kc_base, kc_st, kc_sj, ks_base, km_base,
               ks_sg, ks_sd, vc_base, vc_st, vc_sj, vs_base, vm_base, vs_st, vs_sg, t0, qk_scale,
               BITS: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, DP: tl.constexpr, W: tl.constexpr,
               DOT: tl.constexpr, INTERPRETED: tl.constexpr, K_FOLD: tl.constexpr, V_FOLD: tl.constexpr,
               PACKED: tl.constexpr = False, VS_WORD: tl.constexpr = False, KS_WORD: tl.constexpr = False,
               V_PAIRS: tl.constexpr = False):
    """The G tokens [t0, t0 + G) of one key group (always all in range: NQ is a multiple of G).
    K_FOLD: key scales folded into q (q∘s per plane, the mins one per-row term) instead of dequantizing
    every key element; V_FOLD: value scales folded into P per token (P∘s per chunk, mins per row).
    PACKED (GPU, bf16 / fp16 dots, no folds): the planes decoded in packed 16-bit pairs (_planes_packed).
    VS_WORD (2-byte value scales, 4 groups per token stored contiguously, 8-byte aligned): each token's
    scales and mins read as one int64 each instead of 2-byte loads per group. V_PAIRS (with PACK): the value
    fma as packed PTX on token pairs (_fma_token_pairs). KS_WORD (2-byte key scales,
    channels contiguous, 4-byte aligned): a plane's key scales and mins read as int32 pairs of channels, so
    that a one-warp program's loads are 4 bytes a thread (cp.async-pipelined) rather than 2 (plain loads
    the loop waits on)."""
    PER: tl.constexpr = 8 // BITS
    MID: tl.constexpr = ((1 << BITS) - 1) / 2
    PACK: tl.constexpr = PACKED and not INTERPRETED and DOT != 0 and not K_FOLD and not V_FOLD
    offs_t = t0 + tl.arange(0, G)
    offs_j = tl.arange(0, DP)
    # keys: one dot per bit plane (a K-split of q·Kᵀ over the plane's channel range)
    kb = tl.load(kc_base + offs_t[:, None] * kc_st + offs_j[None, :] * kc_sj)  # uint8 [G, DP]
    if PACK:
        kp0, kp1, kp2, kp3 = _planes_packed(kb, BITS, DOT)
    else:
        kb = kb.to(tl.int32)
    g = t0 // G
    s = tl.zeros([q0.shape[0], G], dtype=tl.float32)
    qm = tl.zeros([q0.shape[0], DP], dtype=tl.float32)
    for i in tl.static_range(PER):
        offs_c = i * DP + offs_j
        if KS_WORD:
            ks_w = (g * ks_sg + i * DP) // 2 + tl.arange(0, DP // 2)
            k_sc = _word_pairs(tl.load(ks_base.to(tl.pointer_type(tl.int32)) + ks_w), ks_base.dtype.element_ty)
            k_mn = _word_pairs(tl.load(km_base.to(tl.pointer_type(tl.int32)) + ks_w), km_base.dtype.element_ty)
        else:
            k_sc = tl.load(ks_base + g * ks_sg + offs_c * ks_sd)  # storage dtype: _dequant converts
            k_mn = tl.load(km_base + g * ks_sg + offs_c * ks_sd)
        qi = _pick(i, q0, q1, q2, q3)
        if K_FOLD:  # q·k = (q∘s)·(c - MID) + q·(m + MID·s)
            q32 = qi.to(tl.float32)
            k_sc = k_sc.to(tl.float32)
            qs, _ = _round_operand(q32 * k_sc[None, :], DOT, INTERPRETED)
            s = _dot(qs, tl.trans(_centred(kb, i, BITS, DOT, INTERPRETED)), s, DOT)
            qm += q32 * (k_mn.to(tl.float32) + MID * k_sc)[None, :]
        elif PACK:  # s and m + MID·s per channel once, then broadcast (same values as per element)
            k_s2, k_m2 = _scale_ops(k_sc, k_mn, MID, DOT)
            kd = _pick(i, kp0, kp1, kp2, kp3) * k_s2[None, :] + k_m2[None, :]
            s = _dot(qi, tl.trans(kd), s, DOT)
        else:
            kd = _dequant(kb, i, k_sc[None, :], k_mn[None, :], BITS, DOT, INTERPRETED)
            s = _dot(qi, tl.trans(kd), s, DOT)
    if K_FOLD:
        s += tl.sum(qm, 1)[:, None]
    m_old = m_i
    p, alpha, m_i, l_i = _online_softmax(s * qk_scale, m_i, l_i, offs_t, False)
    pr, _ = _round_operand(p, DOT, INTERPRETED)
    if tl.max(m_i - m_old, 0) > 0.0:  # a running max moved (rare after the first tiles): rescale
        acc0 = acc0 * alpha[:, None]
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        acc3 = acc3 * alpha[:, None]
    # values: per W-wide channel chunk of a plane (inside one value group: one scale / min per token)
    offs_w = tl.arange(0, W)
    vc_rows = vc_base + offs_t[:, None] * vc_st
    if VS_WORD:  # a token's 4 value groups: one 8-byte load each for its 2-byte scales and mins
        vs_w = tl.load(vs_base.to(tl.pointer_type(tl.int64)) + offs_t * (vs_st // 4))
        vm_w = tl.load(vm_base.to(tl.pointer_type(tl.int64)) + offs_t * (vs_st // 4))
    for c in tl.static_range(DP // W):
        vb = tl.load(vc_rows + (c * W + offs_w)[None, :] * vc_sj)  # uint8 [G, W]
        if PACK:
            vp0, vp1, vp2, vp3 = _planes_packed(vb, BITS, DOT)
        else:
            vb = vb.to(tl.int32)
        for i in tl.static_range(PER):
            grp = (i * DP + c * W) // GV
            if VS_WORD:
                v_sc = _half_of(vs_w, grp, vs_base.dtype.element_ty)
                v_mn = _half_of(vm_w, grp, vm_base.dtype.element_ty)
            else:
                v_sc = tl.load(vs_base + offs_t * vs_st + grp * vs_sg)
                v_mn = tl.load(vm_base + offs_t * vs_st + grp * vs_sg)
            acc_a = _pick(i * (DP // W) + c, acc0, acc1, acc2, acc3)
            if V_FOLD:  # P·v = (P∘s)·(c - MID) + P·(m + MID·s)
                v_sc = v_sc.to(tl.float32)
                ps, _ = _round_operand(p * v_sc[None, :], DOT, INTERPRETED)
                acc_a += tl.sum(p * (v_mn.to(tl.float32) + MID * v_sc)[None, :], 1)[:, None]
                acc_a = _dot(ps, _centred(vb, i, BITS, DOT, INTERPRETED), acc_a, DOT)
            elif PACK:
                v_s2, v_m2 = _scale_ops(v_sc, v_mn, MID, DOT)
                if V_PAIRS:  # (PACK: on the GPU, inline PTX available)
                    vd = _fma_token_pairs(_pick(i, vp0, vp1, vp2, vp3), tl.broadcast_to(v_s2[:, None], [G, W]),
                                          tl.broadcast_to(v_m2[:, None], [G, W]), DOT)
                else:
                    vd = _pick(i, vp0, vp1, vp2, vp3) * v_s2[:, None] + v_m2[:, None]
                acc_a = _dot(pr, vd, acc_a, DOT)
            else:
                vd = _dequant(vb, i, v_sc[:, None], v_mn[:, None], BITS, DOT, INTERPRETED)
                acc_a = _dot(pr, vd, acc_a, DOT)
            acc0, acc1, acc2, acc3 = _set(i * (DP // W) + c, acc_a, acc0, acc1, acc2, acc3)
    return acc0, acc1, acc2, acc3, l_i, m_i


@triton.jit
def _general_step(acc0, l_i, m_i, q, kc_base, kc_st, kc_sj, ks_base, km_base, ks_sg, ks_sd, vc_base, vc_st,
                  vc_sj, vs_base, vm_base, vs_st, vs_sg, t0, hi, offs_d, d_ok, qk_scale, BITS: tl.constexpr,
                  G: tl.constexpr, GV: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
                  CHECK: tl.constexpr, INTERPRETED: tl.constexpr):
    """Tokens [t0, min(t0 + BLOCK_N, hi)): codes gathered per element, dequantized in fp32."""
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_t = t0 + tl.arange(0, BLOCK_N)
    t_ok = offs_t < hi
    byte = offs_d % DP
    shift = (offs_d // DP) * BITS
    km_ok = d_ok[:, None] & t_ok[None, :]
    kb = tl.load(kc_base + offs_t[None, :] * kc_st + byte[:, None] * kc_sj, mask=km_ok, other=0).to(tl.int32)
    ksp = (offs_t // G)[None, :] * ks_sg + offs_d[:, None] * ks_sd
    kt = (_u2f((kb >> shift[:, None]) & MASK) * tl.load(ks_base + ksp, mask=km_ok, other=0.0).to(tl.float32)
          + tl.load(km_base + ksp, mask=km_ok, other=0.0).to(tl.float32))  # K^T [HEAD_DIM, BLOCK_N]
    vm_ok = t_ok[:, None] & d_ok[None, :]
    vb = tl.load(vc_base + offs_t[:, None] * vc_st + byte[None, :] * vc_sj, mask=vm_ok, other=0).to(tl.int32)
    vsp = offs_t[:, None] * vs_st + (offs_d // GV)[None, :] * vs_sg
    v = (_u2f((vb >> shift[None, :]) & MASK) * tl.load(vs_base + vsp, mask=vm_ok, other=0.0).to(tl.float32)
         + tl.load(vm_base + vsp, mask=vm_ok, other=0.0).to(tl.float32))  # [BLOCK_N, HEAD_DIM]
    return _full_step(acc0, l_i, m_i, q, kt, v, t_ok, qk_scale, DOT, CHECK, INTERPRETED)


@triton.jit
def _full_step(acc, l_i, m_i, q, kt, v, n_ok, qk_scale, DOT: tl.constexpr, CHECK: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """One online-softmax step over fp32 K^T [HEAD_DIM, BLOCK_N] and V [BLOCK_N, HEAD_DIM] tiles."""
    ktr, _ = _round_operand(kt, DOT, INTERPRETED)
    s = _dot(q, ktr, tl.zeros([q.shape[0], kt.shape[1]], dtype=tl.float32), DOT) * qk_scale
    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, n_ok, CHECK)
    pr, _ = _round_operand(p, DOT, INTERPRETED)
    vr, _ = _round_operand(v, DOT, INTERPRETED)
    return _dot(pr, vr, acc * alpha[:, None], DOT), l_i, m_i


@triton.jit
def _residual_step(acc0, acc1, acc2, acc3, l_i, m_i, q, kr_base, kr_sn, kr_sd, vr_base, vr_sn, vr_sd, n0, NQ, NR,
                   RING, offs_d, d_ok, qk_scale, BLOCK_R: tl.constexpr, W: tl.constexpr, NACC: tl.constexpr,
                   HAS_LENS: tl.constexpr, DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """Residual tokens [n0, min(n0 + BLOCK_R, NR)) (slot n, or (NQ + n) % RING in a ring)."""
    offs_n = n0 + tl.arange(0, BLOCK_R)
    n_ok = offs_n < NR
    slot = (NQ + offs_n) % RING if HAS_LENS else offs_n
    kt = tl.load(kr_base + offs_d[:, None] * kr_sd + slot[None, :] * kr_sn, mask=d_ok[:, None] & n_ok[None, :],
                 other=0.0).to(tl.float32)
    ktr, _ = _round_operand(kt, DOT, INTERPRETED)
    s = _dot(q, ktr, tl.zeros([q.shape[0], BLOCK_R], dtype=tl.float32), DOT) * qk_scale
    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, n_ok, True)
    pr, _ = _round_operand(p, DOT, INTERPRETED)
    offs_w = tl.arange(0, W)
    for a in tl.static_range(NACC):
        cols = a * W + offs_w
        v = tl.load(vr_base + slot[:, None] * vr_sn + cols[None, :] * vr_sd,
                    mask=n_ok[:, None] & _cols_ok(cols, d_ok, NACC)[None, :], other=0.0).to(tl.float32)
        vr, _ = _round_operand(v, DOT, INTERPRETED)
        if a == 0:
            acc0 = _dot(pr, vr, acc0 * alpha[:, None], DOT)
        elif a == 1:
            acc1 = _dot(pr, vr, acc1 * alpha[:, None], DOT)
        elif a == 2:
            acc2 = _dot(pr, vr, acc2 * alpha[:, None], DOT)
        else:
            acc3 = _dot(pr, vr, acc3 * alpha[:, None], DOT)
    return acc0, acc1, acc2, acc3, l_i, m_i


@triton.jit
def _cols_ok(cols, d_ok, NACC: tl.constexpr):
    # NACC == 1: one HEAD_DIM-wide chunk, padded past D (d_ok); the FAST path's chunks are never padded
    if NACC == 1:
        return d_ok
    return cols >= 0


@triton.jit
def _store_chunk(acc, a: tl.constexpr, W: tl.constexpr, out_ptrs, o_sd, ws_ptrs, ok_rows, d_ok, l_i,
                 SINGLE: tl.constexpr, OUT_BF16: tl.constexpr, INTERPRETED: tl.constexpr, NACC: tl.constexpr):
    cols = a * W + tl.arange(0, W)
    ok = ok_rows[:, None] & _cols_ok(cols, d_ok, NACC)[None, :]
    if SINGLE:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if INTERPRETED and OUT_BF16:
            out = _round_bf16(out)
        tl.store(out_ptrs + cols[None, :] * o_sd, out.to(out_ptrs.dtype.element_ty), mask=ok)
    else:
        tl.store(ws_ptrs + cols[None, :], acc, mask=ok)


@triton.jit
def FXFORGE_KERNEL_NAME_split(Q, KC, KS, KM, VC, VS, VM, KR, VR, O, ACC, ML, LENS, sm_scale,
                              q_sb, q_sh, q_sm, q_sd, kc_sb, kc_sh, kc_st, kc_sj, ks_sb, ks_sh, ks_sg, ks_sd,
                              vc_sb, vc_sh, vc_st, vc_sj, vs_sb, vs_sh, vs_st, vs_sg,
                              kr_sb, kr_sh, kr_sn, kr_sd, vr_sb, vr_sh, vr_sn, vr_sd, o_sb, o_sh, o_sm, o_sd,
                              H, H_KV, LQ, NQ, NR, RESID, RING, CHUNK, SPLITS,
                              BITS: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                              HEAD_DIM: tl.constexpr, FAST: tl.constexpr, W: tl.constexpr, NACC: tl.constexpr,
                              SINGLE: tl.constexpr, OUT_BF16: tl.constexpr, DOT: tl.constexpr,
                              HAS_LENS: tl.constexpr, INTERPRETED: tl.constexpr, K_FOLD: tl.constexpr = False,
                              V_FOLD: tl.constexpr = False, PACKED: tl.constexpr = False, PDL: tl.constexpr = False,
                              VS_WORD: tl.constexpr = False, KS_WORD: tl.constexpr = False,
                              V_PAIRS: tl.constexpr = False):
    if not SINGLE:  # the combine kernel (launched with PDL) may be scheduled now; it waits for this grid
        _pdl_launch_dependents(PDL)
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = D // PER
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
    q_rows = Q + b * q_sb + h[:, None] * q_sh + t[:, None] * q_sm
    q32 = tl.load(q_rows + offs_d[None, :] * q_sd, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q, _ = _round_operand(q32, DOT, INTERPRETED)
    if HAS_LENS:
        n_tot = tl.load(LENS + b).to(tl.int32)
        nq = tl.where(n_tot > RESID, (n_tot - RESID) // G * G, 0)
        nr = n_tot - nq
    else:
        nq = NQ
        nr = NR
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x·log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, W], tl.float32)
    acc1 = tl.zeros([BLOCK_M, W], tl.float32)
    acc2 = tl.zeros([BLOCK_M, W], tl.float32)
    acc3 = tl.zeros([BLOCK_M, W], tl.float32)
    kc_base = KC + b * kc_sb + hk * kc_sh
    ks_base, km_base = KS + b * ks_sb + hk * ks_sh, KM + b * ks_sb + hk * ks_sh
    vc_base = VC + b * vc_sb + hk * vc_sh
    vs_base, vm_base = VS + b * vs_sb + hk * vs_sh, VM + b * vs_sb + hk * vs_sh
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, nq)
    if FAST:
        # q's columns of each bit plane, fp32 (the key scales of each group multiply them)
        offs_j = tl.arange(0, DP)
        q_ok = row_ok[:, None]
        q0, _ = _round_operand(tl.load(q_rows + offs_j[None, :] * q_sd, mask=q_ok, other=0.0).to(tl.float32), DOT,
                               INTERPRETED)
        q1 = q0
        q2 = q0
        q3 = q0
        if PER > 1:
            q1, _ = _round_operand(tl.load(q_rows + (DP + offs_j)[None, :] * q_sd, mask=q_ok, other=0.0).to(tl.float32),
                                   DOT, INTERPRETED)
        if PER > 2:
            q2, _ = _round_operand(tl.load(q_rows + (2 * DP + offs_j)[None, :] * q_sd, mask=q_ok,
                                           other=0.0).to(tl.float32), DOT, INTERPRETED)
            q3, _ = _round_operand(tl.load(q_rows + (3 * DP + offs_j)[None, :] * q_sd, mask=q_ok,
                                           other=0.0).to(tl.float32), DOT, INTERPRETED)
        for t0 in range(lo, hi, G):
            acc0, acc1, acc2, acc3, l_i, m_i = _fast_step(
                acc0, acc1, acc2, acc3, l_i, m_i, q0, q1, q2, q3, kc_base, kc_st, kc_sj, ks_base, km_base, ks_sg,
                ks_sd, vc_base, vc_st, vc_sj, vs_base, vm_base, vs_st, vs_sg, t0, qk_scale, BITS, G, GV, DP, W,
                DOT, INTERPRETED, K_FOLD, V_FOLD, PACKED, VS_WORD, KS_WORD, V_PAIRS)
    else:
        full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N  # only the chunk's last block is ragged
        for t0 in range(lo, full_end, BLOCK_N):
            acc0, l_i, m_i = _general_step(acc0, l_i, m_i, q, kc_base, kc_st, kc_sj, ks_base, km_base, ks_sg, ks_sd,
                                           vc_base, vc_st, vc_sj, vs_base, vm_base, vs_st, vs_sg, t0, hi, offs_d,
                                           d_ok, qk_scale, BITS, G, GV, DP, BLOCK_N, DOT, False, INTERPRETED)
        for t0 in range(full_end, hi, BLOCK_N):
            acc0, l_i, m_i = _general_step(acc0, l_i, m_i, q, kc_base, kc_st, kc_sj, ks_base, km_base, ks_sg, ks_sd,
                                           vc_base, vc_st, vc_sj, vs_base, vm_base, vs_st, vs_sg, t0, hi, offs_d,
                                           d_ok, qk_scale, BITS, G, GV, DP, BLOCK_N, DOT, True, INTERPRETED)
    # the last split also reads the full-precision residual window
    r_hi = tl.where(split == SPLITS - 1, nr, 0)
    kr_base = KR + b * kr_sb + hk * kr_sh
    vr_base = VR + b * vr_sb + hk * vr_sh
    for n0 in range(0, r_hi, BLOCK_R):
        acc0, acc1, acc2, acc3, l_i, m_i = _residual_step(
            acc0, acc1, acc2, acc3, l_i, m_i, q, kr_base, kr_sn, kr_sd, vr_base, vr_sn, vr_sd, n0, nq, nr, RING,
            offs_d, d_ok, qk_scale, BLOCK_R, W, NACC, HAS_LENS, DOT, INTERPRETED)
    out_ptrs = O + b * o_sb + h[:, None] * o_sh + t[:, None] * o_sm
    ws_row = ((b * H + h) * LQ + t) * SPLITS + split  # workspace row of (b, h, t, split)
    ws_ptrs = ACC + ws_row[:, None] * D
    _store_chunk(acc0, 0, W, out_ptrs, o_sd, ws_ptrs, row_ok, d_ok, l_i, SINGLE, OUT_BF16, INTERPRETED, NACC)
    if NACC > 1:
        _store_chunk(acc1, 1, W, out_ptrs, o_sd, ws_ptrs, row_ok, d_ok, l_i, SINGLE, OUT_BF16, INTERPRETED, NACC)
    if NACC > 2:
        _store_chunk(acc2, 2, W, out_ptrs, o_sd, ws_ptrs, row_ok, d_ok, l_i, SINGLE, OUT_BF16, INTERPRETED, NACC)
        _store_chunk(acc3, 3, W, out_ptrs, o_sd, ws_ptrs, row_ok, d_ok, l_i, SINGLE, OUT_BF16, INTERPRETED, NACC)
    if not SINGLE:
        tl.store(ML + ws_row * 2, m_i, mask=row_ok)
        tl.store(ML + ws_row * 2 + 1, l_i, mask=row_ok)
