"""KIVI decode attention (split-KV over a 2/4-bit quantized cache plus its full-precision residual
window) on the CPU interpreter: against float64 SDPA over ``kivi_dequantize(cache)`` (the same quantized
math), irregular cache lengths, residual-only caches, GQA, explicit and automatic splits, power-of-two
and gathered group sizes, the bytes model, and input validation."""
import dataclasses

import fxforge  # noqa: F401
import pytest
import torch
import torch.nn.functional as F
from fxforge.debug import rel_err
from fxforge.passes.quant.kv import kivi_bytes_per_token, kivi_dequantize, kivi_quantize
from fxforge.runtime.kivi_attention import (
    kivi_configs,
    kivi_decode_attention,
    kivi_traffic_bytes,
)


def sdpa(q, k, v, dtype, scale=None):
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale, enable_gqa=True)


def check(out, q, cache, scale=None, floor=1e-6, factor=2.0):
    """Error vs float64 SDPA over the dequantized cache at most ``factor``× that of the same SDPA done by torch
    in q's dtype (the dequantized cache cast to it), with an absolute floor for float32."""
    k, v = kivi_dequantize(cache)
    ref = sdpa(q, k, v, torch.float64, scale)
    same = sdpa(q, k, v, q.dtype, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    err, base = rel_err(out, ref), rel_err(same, ref)
    assert err <= max(factor * base, floor), (err, base)
    return err


def make(B, H, HKV, TQ, S, D, bits, group, v_group, dtype, residual=None, cache_dtype=None,
         scale_dtype=torch.float16):
    q = torch.randn(B, H, TQ, D, dtype=dtype)
    k = torch.randn(B, HKV, S, D, dtype=cache_dtype or dtype)
    v = torch.randn(B, HKV, S, D, dtype=cache_dtype or dtype)
    k[..., 3] += 4.0  # a channel-aligned key outlier, as KIVI assumes
    cache = kivi_quantize(k, v, bits=bits, group=group, residual=group if residual is None else residual,
                          v_group=v_group, scale_dtype=scale_dtype)
    return q, cache


CASES = [  # B, Hq, Hkv, Tq, S, D, bits, group, v_group, num_splits (None: automatic)
    (1, 2, 2, 1, 37, 64, 2, 16, 16, 1),  # GQA 1; 16 quantized tokens + 21 residual
    (2, 8, 2, 3, 100, 64, 2, 16, 16, 2),  # GQA 4, Tq 3; 80 + 20
    (1, 8, 2, 1, 200, 64, 4, 16, 16, None),  # 176 + 24, automatic splits
    (2, 4, 4, 3, 100, 64, 4, 16, 16, None),
    (1, 4, 1, 3, 200, 80, 2, 24, 20, 2),  # groups not powers of two (gathered scales), padded head dim
    (1, 8, 2, 1, 200, 128, 2, 32, 32, 3),  # D=128, G=32: 160 + 40
    (1, 8, 2, 16, 60, 64, 4, 16, 16, 2),  # Tq 16: 64 packed rows; 32 + 28
    (1, 4, 1, 1, 10, 64, 2, 16, 16, None),  # residual only (S < group)
    (1, 8, 2, 3, 12, 32, 4, 16, 16, 2),  # residual only, splits requested
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}q{}S{}d{}b{}g{}gv{}s{}".format(*c))
def test_matches_fp64_over_dequantized_cache(case, dtype):
    B, H, HKV, TQ, S, D, bits, g, gv, ns = case
    torch.manual_seed(hash(case) % 1000)
    q, cache = make(B, H, HKV, TQ, S, D, bits, g, gv, dtype)
    assert 0 < S - cache.n_quant < 2 * g and (cache.n_quant > 0) == (S > g)
    check(kivi_decode_attention(q, cache, num_splits=ns), q, cache)


def test_no_residual_window_fp16_custom_scale():
    """residual=0 and S a multiple of the group: every token quantized, nothing in full precision."""
    torch.manual_seed(1)
    q, cache = make(1, 4, 2, 2, 64, 64, 2, 16, 16, torch.float16, residual=0)
    assert cache.n_quant == 64 and cache.k_residual.shape[2] == 0
    check(kivi_decode_attention(q, cache, scale=0.05, num_splits=2), q, cache, scale=0.05)


def test_large_head_dim_and_mixed_dtypes():
    """D = 256 with 4-bit codes; float32 q over a bfloat16 cache (bf16 residual window)."""
    torch.manual_seed(2)
    q, cache = make(1, 2, 1, 1, 40, 256, 4, 16, 32, torch.float32, cache_dtype=torch.bfloat16)
    assert cache.k_residual.dtype == torch.bfloat16
    check(kivi_decode_attention(q, cache, num_splits=2), q, cache)


def test_strided_q_and_out():
    torch.manual_seed(3)
    _, cache = make(2, 4, 2, 3, 70, 64, 2, 16, 16, torch.float32)
    q = torch.randn(2, 3, 4, 64).transpose(1, 2)
    out = torch.empty(2, 3, 4, 64).transpose(1, 2)
    assert kivi_decode_attention(q, cache, num_splits=2, out=out) is out
    check(out, q, cache)


def test_empty_cache_gives_zeros():
    q, cache = make(1, 2, 1, 1, 0, 16, 2, 16, 16, torch.float32)
    assert (kivi_decode_attention(q, cache) == 0).all()


def test_bytes_model_32k():
    """The template's numbers: B=1, Hkv=8, S=32768, D=128, KIVI-2/4 with G=Gv=R=32 and fp16 scales."""
    B, HKV, S, D, G = 1, 8, 32768, 128, 32
    bf16 = 2 * B * HKV * S * D * 2
    assert bf16 == 134_217_728  # → 44.7 µs at 3.0 TB/s
    for bits, per_tok, total in ((2, 96, 25_821_184), (4, 160, 42_582_016)):
        assert kivi_bytes_per_token(bits, D, G) == per_tok
        nq = (S - G) // G * G
        e = torch.empty
        cache = dataclasses.replace(
            kivi_quantize(torch.zeros(1, 1, 0, D), torch.zeros(1, 1, 0, D), bits=bits), seq_len=S, n_quant=nq,
            k_codes=e(B, HKV, nq, D * bits // 8, dtype=torch.uint8), k_scale=e(B, HKV, nq // G, D, dtype=torch.float16),
            k_min=e(B, HKV, nq // G, D, dtype=torch.float16), v_codes=e(B, HKV, nq, D * bits // 8, dtype=torch.uint8),
            v_scale=e(B, HKV, nq, D // G, dtype=torch.float16), v_min=e(B, HKV, nq, D // G, dtype=torch.float16),
            k_residual=e(B, HKV, S - nq, D, dtype=torch.bfloat16), v_residual=e(B, HKV, S - nq, D, dtype=torch.bfloat16))
        assert kivi_traffic_bytes(cache, hq=32, tq=1, splits=16) == total
        assert bf16 / cache.nbytes() >= (5 if bits == 2 else 3)  # 5.31× and 3.19× smaller KV memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(128, 2, 32, 32), (128, 4, 32, 32), (64, 2, 16, 32), (128, 2, 64, 128),
                                   (64, 4, 32, 16)], ids=lambda c: "d{}b{}g{}gv{}".format(*c))
def test_fast_and_general_paths_agree(shape, dtype):
    """The FAST path (bit planes; keys / values dequantized per element, or their scales folded into q / P:
    K_FOLD / V_FOLD) and the GENERAL path (per-element gather) on one cache: all within the bound, ragged
    split chunks."""
    from fxforge.runtime.kivi_attention import fast_path
    D, bits, g, gv = shape
    fp = fast_path(D, bits, g, gv)
    assert fp is not None and fp["NACC"] * fp["W"] == D and fp["NACC"] <= 4
    torch.manual_seed(D + bits + g)
    q, cache = make(1, 8, 2, 1, 7 * g + 5, D, bits, g, gv, dtype)
    outs = []
    for fast, kf, vf in ((True, False, False), (True, True, False), (True, False, True), (True, True, True),
                         (False, False, False)):
        out = kivi_decode_attention(q, cache, num_splits=3, blocks={"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": D,
                                                                    "FAST": fast, "K_FOLD": kf, "V_FOLD": vf})
        # the FAST path rounds the folded operands (q∘s, P∘s) once in the dot dtype: their error scales with
        # |c - MID|·s (up to half a group's range) where rounding the dequantized value scales with |x|; with
        # 128-channel value groups that is up to ~3× in fp16 (and far below 2-bit quantization error itself)
        check(out, q, cache, floor=4e-6, factor=3.0 if fast else 2.0)
        outs.append(out.float())
    assert all(rel_err(o, outs[-1]) < (1e-5 if dtype == torch.float32 else 2e-2) for o in outs[:-1])


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bits", [2, 4])
def test_scale_dtypes_on_the_fast_path(bits, scale_dtype):
    """bf16 scales with bf16 q take the packed-bf16 path (m + MID·s and the fma in bf16); fp32 scales the
    fp32 one; both within the bound, folded variants included."""
    torch.manual_seed(bits)
    q, cache = make(1, 8, 2, 1, 7 * 32 + 9, 128, bits, 32, 32, torch.bfloat16, scale_dtype=scale_dtype)
    assert cache.k_scale.dtype == scale_dtype
    for kf, vf in ((False, False), (True, True)):
        out = kivi_decode_attention(q, cache, num_splits=3, blocks={"BLOCK_M": 16, "BLOCK_N": 32, "HEAD_DIM": 128,
                                                                    "FAST": True, "K_FOLD": kf, "V_FOLD": vf})
        check(out, q, cache)


@pytest.mark.parametrize("bits,d,v_group,scale_dtype", [(2, 128, 32, torch.bfloat16), (4, 128, 32, torch.float16),
                                                       (2, 64, 16, torch.bfloat16), (2, 128, 64, torch.bfloat16),
                                                       (4, 128, 32, torch.float32)])
def test_value_scales_read_as_words_give_the_same_bits(bits, d, v_group, scale_dtype):
    """VS_WORD (a token's 4 value scales / mins read as one int64 each, fields extracted by shifts) gives the
    same output bits as the 2-byte loads per group; where it does not apply (2 value groups per token, fp32
    scales) the launch drops it and the result is the same too."""
    from fxforge.runtime.kivi_attention import _vs_word_ok
    torch.manual_seed(bits + d)
    q, cache = make(1, 8, 2, 1, 5 * 32 + 7, d, bits, 32, v_group, torch.bfloat16, scale_dtype=scale_dtype)
    eligible = _vs_word_ok(cache.v_scale, cache.v_min, d, v_group)
    assert eligible == (scale_dtype != torch.float32 and d // v_group == 4)
    base = {"BLOCK_M": 16, "BLOCK_N": 32, "HEAD_DIM": d, "FAST": True}
    outs = [kivi_decode_attention(q, cache, num_splits=2, blocks=dict(base, VS_WORD=w)) for w in (False, True)]
    assert torch.equal(outs[0], outs[1])
    check(outs[1], q, cache)


@pytest.mark.parametrize("b,bits,d,scale_dtype", [(1, 2, 128, torch.bfloat16), (3, 4, 128, torch.float16),
                                                  (3, 2, 256, torch.bfloat16), (1, 2, 64, torch.bfloat16),
                                                  (3, 4, 64, torch.bfloat16), (1, 4, 64, torch.float32)])
def test_key_scales_read_as_words_give_the_same_bits(b, bits, d, scale_dtype):
    """KS_WORD (a plane's key scales / mins read as int32 pairs of channels, halves split by shifts and
    interleaved back) gives the same output bits as the 2-byte loads, also for scales that are views into
    larger buffers and with device lengths (a ring residual); the launch drops it for fp32 scales, fewer than
    32 channels per plane (2-bit, D = 64), more than 4 GPU threads per word, strided channels and mins of
    another dtype."""
    from fxforge.runtime.kivi_attention import _ks_word_ok
    torch.manual_seed(b + bits + d)
    q, cache = make(b, 8, 2, 1, 5 * 32 + 7, d, bits, 32, 32, torch.bfloat16, scale_dtype=scale_dtype)
    words = d // (8 // bits) // 2
    eligible = scale_dtype != torch.float32 and words >= 16
    assert _ks_word_ok(cache.k_scale, cache.k_min, d, bits, num_warps=1) == eligible
    assert _ks_word_ok(cache.k_scale, cache.k_min, d, bits, num_warps=2) == eligible
    assert _ks_word_ok(cache.k_scale, cache.k_min, d, bits, num_warps=4) == (eligible and words >= 32)
    assert not _ks_word_ok(cache.k_scale.transpose(2, 3).contiguous().transpose(2, 3), cache.k_min, d, bits, 1)
    assert not _ks_word_ok(cache.k_scale, cache.k_min.float(), d, bits, 1)
    base = {"BLOCK_M": 16, "BLOCK_N": 32, "HEAD_DIM": d, "FAST": True}
    outs = [kivi_decode_attention(q, cache, num_splits=2, blocks=dict(base, KS_WORD=w)) for w in (False, True)]
    assert torch.equal(outs[0], outs[1])
    check(outs[1], q, cache)
    # scales as views into larger buffers (group stride D + 2, two extra groups, a storage offset of 2)
    ng = cache.k_scale.shape[2]

    def widened(t):
        buf = torch.zeros(t.shape[0], t.shape[1], ng + 2, d + 2, dtype=t.dtype)
        buf[:, :, 1:ng + 1, 2:] = t
        return buf[:, :, 1:ng + 1, 2:]
    viewed = dataclasses.replace(cache, k_scale=widened(cache.k_scale), k_min=widened(cache.k_min))
    assert _ks_word_ok(viewed.k_scale, viewed.k_min, d, bits, 1) == eligible
    got = kivi_decode_attention(q, viewed, num_splits=2, blocks=dict(base, KS_WORD=True))
    assert torch.equal(got, outs[0])
    # device lengths over capacity buffers with a residual ring (rows of different lengths)
    lens = [5 * 32 + 7 - 40 * i for i in range(b)]
    rows = [make(1, 8, 2, 1, n, d, bits, 32, 32, torch.bfloat16, scale_dtype=scale_dtype) for n in lens]
    rings = [_ring_cache(c, c.residual + 32, 192) for _, c in rows]
    stacked = dataclasses.replace(rings[0], **{f: torch.cat([getattr(r, f) for r in rings]) for f in (
        "k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_residual", "v_residual")})
    qs = torch.cat([r[0] for r in rows])
    lt = torch.tensor(lens, dtype=torch.int32)
    ref_l, got_l = (kivi_decode_attention(qs, stacked, num_splits=2, blocks=dict(base, KS_WORD=w), lengths=lt)
                    for w in (False, True))
    assert not ref_l.isnan().any() and torch.equal(ref_l, got_l)


def test_mixed_scale_and_min_dtypes_take_the_two_byte_loads():
    """A cache whose mins have another dtype than its scales (each accepted on its own) must not take the
    word loads (VS_WORD / KS_WORD split 16-bit halves as the scale dtype): the default launch still runs."""
    from fxforge.runtime.kivi_attention import _ks_word_ok, _vs_word_ok
    torch.manual_seed(5)
    q, cache = make(1, 8, 2, 1, 3 * 32 + 5, 128, 2, 32, 32, torch.bfloat16, scale_dtype=torch.bfloat16)
    mixed = dataclasses.replace(cache, k_min=cache.k_min.float(), v_min=cache.v_min.float())
    assert not _ks_word_ok(mixed.k_scale, mixed.k_min, 128, 2, 1)
    assert not _vs_word_ok(mixed.v_scale, mixed.v_min, 128, 32)
    blocks = {"BLOCK_M": 16, "BLOCK_N": 32, "HEAD_DIM": 128, "FAST": True, "KS_WORD": True, "VS_WORD": True}
    out = kivi_decode_attention(q, mixed, num_splits=2, blocks=blocks)
    check(out, q, mixed)


def test_fast_path_eligibility():
    from fxforge.runtime.kivi_attention import fast_path
    assert fast_path(128, 2, 32, 32) == {"W": 32, "NACC": 4}
    assert fast_path(128, 4, 32, 32) == {"W": 32, "NACC": 4}  # 64 bytes per token: two chunks per plane
    assert fast_path(128, 4, 32, 128) == {"W": 64, "NACC": 2}
    assert fast_path(80, 2, 24, 20) is None  # padded head dim, groups not powers of two
    assert fast_path(32, 2, 32, 32) is None  # 8 bytes per token: too narrow for a dot
    assert fast_path(256, 2, 32, 32) is None  # 8 value chunks
    assert fast_path(128, 2, 256, 32) is None  # one-group tiles of 256 tokens


def _ring_cache(cache, ring: int, capq: int):
    """``cache`` re-laid into capacity buffers (capq quantized tokens, a residual ring of ``ring`` slots), the
    layout kivi_decode_attention reads with ``lengths``."""
    b, h, s, d = cache.shape
    nq = cache.n_quant

    def grow(t, n, dim=2):
        shape = list(t.shape)
        shape[dim] = n
        out = torch.full(shape, 7, dtype=t.dtype) if t.dtype == torch.uint8 else torch.full(shape, 1e4, dtype=t.dtype)
        out.narrow(dim, 0, t.shape[dim]).copy_(t)
        return out
    g = cache.group
    kr, vr = (torch.full((b, h, ring, d), float("nan"), dtype=cache.k_residual.dtype) for _ in range(2))
    slots = (nq + torch.arange(s - nq)) % ring
    kr[:, :, slots], vr[:, :, slots] = cache.k_residual, cache.v_residual
    return dataclasses.replace(
        cache, seq_len=capq + ring, n_quant=capq, k_codes=grow(cache.k_codes, capq), v_codes=grow(cache.v_codes, capq),
        k_scale=grow(cache.k_scale, capq // g), k_min=grow(cache.k_min, capq // g), v_scale=grow(cache.v_scale, capq),
        v_min=grow(cache.v_min, capq), k_residual=kr, v_residual=vr)


@pytest.mark.parametrize("fast", [True, False])
def test_device_lengths_and_residual_ring(fast):
    """``lengths``: per-row token counts read by the kernel over capacity buffers (garbage past each row's
    tokens) and a residual ring; each row matches the plain call on its own cache."""
    torch.manual_seed(5)
    B, H, HKV, D, bits, g, R = 3, 8, 2, 64, 2, 16, 32
    ring, capq = R + g, 160
    lens = [5, 100, 150]  # residual only; 64 quantized + 36; 112 + 38
    qs, rings, refs = [], [], []
    for n in lens:
        q, cache = make(1, H, HKV, 1, n, D, bits, g, g, torch.float32, residual=R)
        assert cache.n_quant == (max(n - R, 0) // g) * g
        refs.append(kivi_decode_attention(q, cache, num_splits=1))
        qs.append(q)
        rings.append(_ring_cache(cache, ring, capq))
    stacked = dataclasses.replace(rings[0], **{f: torch.cat([getattr(r, f) for r in rings]) for f in (
        "k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_residual", "v_residual")})
    q = torch.cat(qs)
    out = kivi_decode_attention(q, stacked, num_splits=4, lengths=torch.tensor(lens, dtype=torch.int32),
                                blocks={"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": D, "FAST": fast})
    for i in range(B):
        assert rel_err(out[i:i + 1], refs[i]) < 1e-5, i
    with pytest.raises(ValueError, match="lengths must be"):
        kivi_decode_attention(q, stacked, lengths=torch.tensor(lens, dtype=torch.float32))
    with pytest.raises(ValueError, match="ring"):
        kivi_decode_attention(q, dataclasses.replace(stacked, seq_len=capq + 8, k_residual=stacked.k_residual[:, :, :8],
                                                     v_residual=stacked.v_residual[:, :, :8]),
                              lengths=torch.tensor(lens, dtype=torch.int32))


def test_configs():
    cfg = kivi_configs(1, 32, 8, 128, 32, interpreted=False)
    assert cfg[0]["BLOCK_M"] == 16 and cfg[0]["HEAD_DIM"] == 128 and cfg[0]["FAST"] and cfg[0]["BLOCK_N"] == 32
    assert cfg[0]["num_warps"] == 1 and kivi_configs(1, 32, 8, 128, 32, False, bits=4)[0]["num_warps"] == 1
    assert not cfg[-1]["FAST"]  # the GENERAL path stays a candidate
    assert all(not c["FAST"] for c in kivi_configs(1, 8, 8, 80, 24, interpreted=False))
    assert kivi_configs(3, 8, 2, 80, 24, interpreted=True) == [{"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": 128,
                                                                 "FAST": False}]
    assert kivi_configs(1, 4, 4, 64, 32, interpreted=True)[0]["BLOCK_N"] == 32
    # PROGRAMS_PER_SM[num_warps] programs per SM on CUDA (B=1, Hkv=8, 32K on 132 SMs: 64 / 128 splits)
    from fxforge.runtime import decode_attention as da
    from fxforge.runtime.kivi_attention import PROGRAMS_PER_SM, auto_splits
    sms = da.sm_count(torch.device("cpu"))
    for w in (1, 2, 4):
        want = -(-PROGRAMS_PER_SM[w] * sms // 8)
        assert auto_splits(32736, 8, 32, torch.device("cpu"), w) == 1 << (want.bit_length() - 1)
    assert PROGRAMS_PER_SM[1] * 132 // 8 >= 128 and PROGRAMS_PER_SM[2] * 132 // 8 >= 64
    assert auto_splits(512, 8, 32, torch.device("cpu")) <= 2
    # a register cap sets the programs per SM from the register file: 2 warps x 128 registers -> 8
    want = -(-8 * sms // 8)
    assert auto_splits(32736, 8, 32, torch.device("cpu"), 2, 128) == 1 << (want.bit_length() - 1)
    # 2-bit, D = 128: one warp, no register cap, key scales as words (session 15); then 2 warps capped at 128
    assert "maxnreg" not in cfg[0] and cfg[0]["num_stages"] == 2 and cfg[0]["KS_WORD"] and cfg[0]["VS_WORD"]
    assert cfg[1]["num_warps"] == 2 and cfg[1].get("maxnreg") == 128
    other = kivi_configs(1, 32, 8, 64, 32, False)[0]  # other head dims: not measured
    assert "maxnreg" not in other and other["num_warps"] == 2
    assert cfg[0]["V_PAIRS"]  # session 16: the value fma on token pairs
    # float32 q (exact-fp32 FMA dots, unrolled per thread): 16 rows per program; bf16 at Tq 16, GQA 8, D 256: 64
    assert {c["BLOCK_M"] for c in kivi_configs(16, 16, 2, 256, 64, False, elt=4)} == {16}
    assert kivi_configs(16, 16, 2, 256, 64, False)[0]["BLOCK_M"] == 64


def _bad(**changes):
    def build():
        q, cache = make(1, 4, 2, 1, 40, 16, 2, 8, 8, torch.float32)
        q = changes.get("q", lambda q: q)(q)
        return q, dataclasses.replace(cache, **{k: f(cache) for k, f in changes.items() if k != "q"})
    return build


@pytest.mark.parametrize("build,match", [
    (_bad(q=lambda q: q[0]), "4-D"),
    (_bad(q=lambda q: q.long()), "not supported"),
    (_bad(q=lambda q: q.repeat(1, 1, 1, 2)), "head dim of q"),
    (_bad(q=lambda q: q[:, :3]), "multiple of key/value heads"),
    (_bad(q=lambda q: q.repeat(2, 1, 1, 1)), "batch of q"),
    (_bad(bits=lambda c: 3), "bits must be 2 or 4"),
    (_bad(k_codes=lambda c: c.k_codes[..., :-1]), "cache.k_codes has shape"),
    (_bad(v_codes=lambda c: c.v_codes.to(torch.int32)), "cache.v_codes dtype"),
    (_bad(v_min=lambda c: c.v_min[:, :, :-1]), "cache.v_min has shape"),
    (_bad(k_residual=lambda c: c.k_residual.to(torch.int32)), "cache.k_residual dtype"),
    (_bad(n_quant=lambda c: c.n_quant + 1), "n_quant"),
    (_bad(v_group=lambda c: 6), "v_group"),
])
def test_input_validation(build, match):
    q, cache = build()
    with pytest.raises(ValueError, match=match):
        kivi_decode_attention(q, cache)


def test_other_validation():
    q, cache = make(1, 4, 2, 1, 40, 16, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="KIVICache"):
        kivi_decode_attention(q, (cache.k_residual, cache.v_residual))
    with pytest.raises(ValueError, match="num_splits"):
        kivi_decode_attention(q, cache, num_splits=0)
    with pytest.raises(ValueError, match="out must be"):
        kivi_decode_attention(q, cache, out=torch.empty(1, 4, 1, 16, dtype=torch.float16))


GPU_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


@pytest.mark.gpu
def test_out_of_resources_falls_back_to_the_next_config(monkeypatch):
    """The default-config path: a launch failing with OutOfResources moves on to the next config and
    records it (kivi_attention.FALLBACKS); explicit configs are not replaced."""
    import fxforge.runtime.kivi_attention as ka
    from triton.runtime.errors import OutOfResources

    torch.manual_seed(0)
    k, v = (torch.randn(1, 2, 70, 64) for _ in range(2))
    cache = kivi_quantize(k, v, bits=2, group=16, residual=16)
    q = torch.randn(1, 4, 1, 64)
    cfgs = [{"BLOCK_M": 16, "BLOCK_N": 128, "HEAD_DIM": 64, "FAST": False, "num_warps": 4, "num_stages": 3},
            {"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": 64, "FAST": False, "num_warps": 4, "num_stages": 3}]
    seen = []

    def fake_kern1(*args, BLOCK_N, **kw):
        seen.append(BLOCK_N)
        if BLOCK_N == 128:
            raise OutOfResources(278528, 232448, "shared memory")

    class Grid:
        def __getitem__(self, grid):
            return fake_kern1
    monkeypatch.setattr(ka, "kivi_configs", lambda *a: cfgs)
    monkeypatch.setattr(ka, "FALLBACKS", {})
    out = torch.zeros_like(q)
    monkeypatch.setattr(ka, "_interpreted", lambda t: False)  # the fallback is for compiled launches
    with pytest.warns(UserWarning, match="out of resources"):
        ka.launch(Grid(), Grid(), q, cache, out, 0.125, 1, None)
    assert seen == [128, 16] and next(iter(ka.FALLBACKS.values()))["index"] == 1
    seen.clear()
    ka.launch(Grid(), Grid(), q, cache, out, 0.125, 1, None)  # remembered: straight to the working one
    assert seen == [16]
    with pytest.raises(OutOfResources):
        ka.launch(Grid(), Grid(), q, cache, out, 0.125, 1, cfgs[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("case", [(1, 32, 8, 1, 4099, 128, 32, 32), (3, 16, 8, 4, 2048, 64, 32, 32),
                                  (2, 8, 1, 3, 777, 80, 24, 20), (1, 16, 2, 16, 1000, 256, 64, 64)],
                         ids=lambda c: "B{}H{}kv{}q{}S{}d{}g{}gv{}".format(*c))
def test_all_configs_on_cuda(case, bits, dtype):
    """Every launch config (bf16; the default one for the other dtypes), automatic and explicit splits."""
    from fxforge.runtime.kivi_attention import _kernels, launch
    B, H, HKV, TQ, S, D, g, gv = case
    torch.manual_seed(0)
    k, v = (torch.randn(B, HKV, S, D, device="cuda", dtype=dtype) for _ in range(2))
    cache = kivi_quantize(k, v, bits=bits, group=g, residual=g, v_group=gv)
    q = torch.randn(B, H, TQ, D, device="cuda", dtype=dtype)
    kd, vd = kivi_dequantize(cache)
    ref = sdpa(q, kd, vd, torch.float64)
    floor = max(2 * rel_err(sdpa(q, kd, vd, dtype), ref), GPU_FLOOR[dtype])
    k1, k2 = _kernels("cuda")
    cfgs = kivi_configs(TQ, H, HKV, D, g, interpreted=False, bits=bits, v_group=gv, elt=q.element_size())
    variants = [dict(cfg, K_FOLD=kf, V_FOLD=vf) for kf in (False, True) for vf in (False, True) for cfg in cfgs[:1]]
    for cfg in (cfgs + variants) if dtype == torch.bfloat16 else cfgs[:1] + variants[-1:]:
        for ns in (None, 1, 7):
            out = torch.full_like(q, float("nan"))
            launch(k1, k2, q, cache, out, D ** -0.5, ns, cfg)
            assert rel_err(out, ref) <= floor, (cfg, ns)
    if dtype == torch.bfloat16:  # bf16 scales: the packed-bf16 dequant path
        cache = kivi_quantize(k, v, bits=bits, group=g, residual=g, v_group=gv, scale_dtype=torch.bfloat16)
        kd, vd = kivi_dequantize(cache)
        ref = sdpa(q, kd, vd, torch.float64)
        floor = max(2 * rel_err(sdpa(q, kd, vd, dtype), ref), GPU_FLOOR[dtype])
        for cfg in cfgs:
            out = torch.full_like(q, float("nan"))
            launch(k1, k2, q, cache, out, D ** -0.5, None, cfg)
            assert rel_err(out, ref) <= floor, ("bf16 scales", cfg)


PACKED_CASES = [  # (B, Hq, Hkv, Tq, S, D, G, Gv), q dtype, scale dtype
    *[(c, torch.bfloat16, torch.bfloat16) for c in [(1, 32, 8, 1, 4099, 128, 32, 32), (3, 16, 8, 4, 2048, 64, 32, 32),
                                                     (1, 16, 2, 16, 1000, 256, 64, 64), (2, 8, 2, 3, 700, 64, 16, 16)]],
    ((1, 32, 8, 1, 4099, 128, 32, 32), torch.float16, torch.float16),
    ((2, 8, 2, 3, 700, 64, 16, 16), torch.bfloat16, torch.float32),
    ((3, 16, 8, 4, 2048, 64, 32, 32), torch.float16, torch.bfloat16)]


def _packed_case_ids(c):
    return "B{}H{}kv{}q{}S{}d{}g{}gv{}".format(*c) if isinstance(c, tuple) else str(c)


def _gpu_case(case, bits, dtype, scale_dtype, seed, key_outlier):
    """A KIVI cache of ``case`` on the GPU, q, the float64 SDPA reference over the dequantized cache and the
    error floor (twice SDPA's own error in ``dtype``, at least GPU_FLOOR)."""
    B, H, HKV, TQ, S, D, g, gv = case
    torch.manual_seed(seed)
    k, v = (torch.randn(B, HKV, S, D, device="cuda", dtype=dtype) for _ in range(2))
    if key_outlier:
        k[..., 5] += 3.0
    cache = kivi_quantize(k, v, bits=bits, group=g, residual=g, v_group=gv, scale_dtype=scale_dtype)
    q = torch.randn(B, H, TQ, D, device="cuda", dtype=dtype)
    kd, vd = kivi_dequantize(cache)
    ref = sdpa(q, kd, vd, torch.float64)
    return q, cache, ref, max(2 * rel_err(sdpa(q, kd, vd, dtype), ref), GPU_FLOOR[dtype])


def _rounding_apart(a, b, dtype) -> float:
    """max |a - b| in unit roundoffs of ``dtype`` at b's largest output (an output near zero may move by more
    than its own rounding when a rounding upstream moves; a wrong scale would move every output)."""
    u = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    return (a.double() - b.double()).abs().max().item() / (u * b.double().abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("case,dtype,scale_dtype", PACKED_CASES, ids=_packed_case_ids)
def test_packed_plane_decode_is_bit_identical(case, bits, dtype, scale_dtype):
    """PACKED (the FAST path's bit planes decoded by inline PTX in packed 16-bit pairs), alone and with
    VS_WORD (value scales read as one int64 per token), gives the same output bits as the per-code decode
    (V_PAIRS, on by default, pinned off here: test_value_fma_on_token_pairs), and KS_WORD stays within 4 unit
    roundoffs, for the first two FAST configs of kivi_configs (the defaults), with automatic and explicit
    splits; and all stay within the error bound against float64 SDPA over the dequantized cache. Shapes: D 64 / 128 / 256, groups 16 / 32 / 64, GQA 1-8, Tq 1-16; q bf16 / fp16;
    bf16, fp16 and fp32 scales."""
    from fxforge.runtime.kivi_attention import _kernels, launch
    _, H, HKV, TQ, _, D, g, gv = case
    q, cache, ref, floor = _gpu_case(case, bits, dtype, scale_dtype, seed=0, key_outlier=True)
    k1, k2 = _kernels("cuda")
    fast = [c for c in kivi_configs(TQ, H, HKV, D, g, interpreted=False, bits=bits, v_group=gv) if c["FAST"]]
    assert fast
    for cfg in fast[:2]:
        for ns in (None, 3):
            outs = []
            for packed, vs_word, ks_word in ((False, False, False), (True, False, False), (True, True, False),
                                             (True, True, True)):
                out = torch.full_like(q, float("nan"))
                opts = {"PACKED": packed, "VS_WORD": vs_word, "KS_WORD": ks_word, "V_PAIRS": False}  # V_PAIRS: own test
                launch(k1, k2, q, cache, out, D ** -0.5, ns, dict(cfg, **opts))
                assert rel_err(out, ref) <= floor, (cfg, ns, packed, vs_word, ks_word)
                outs.append(out)
            assert torch.equal(outs[0], outs[1]), (cfg, ns, (outs[0] - outs[1]).abs().max().item())
            assert torch.equal(outs[0], outs[2]), (cfg, ns, "VS_WORD", (outs[0] - outs[2]).abs().max().item())
            # KS_WORD: the same scale values, but the compiler's fma contraction of m + MID·s follows the
            # layout they arrive in, so a few outputs may move by rounding: at most 4 unit roundoffs
            apart = _rounding_apart(outs[3], outs[2], dtype)
            assert apart <= 4, (cfg, ns, "KS_WORD", apart)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("case,dtype,scale_dtype", PACKED_CASES[:3] + PACKED_CASES[-2:], ids=_packed_case_ids)
def test_value_fma_on_token_pairs(case, bits, dtype, scale_dtype):
    """V_PAIRS (the value dequant fma as explicit fma.rn.{bf16,f16}x2 on the token pairs of the mma layout,
    on by default since session 16) against the plain expression: within the error bound against float64
    SDPA, and equal up to the rounding of the largest output (the HFMA2 the plain expression compiles to,
    where the compiler contracted it). Its own test, so that a failure here does not hide the PACKED /
    VS_WORD / KS_WORD checks above."""
    from fxforge.runtime.kivi_attention import _kernels, launch
    _, H, HKV, TQ, _, D, g, gv = case
    q, cache, ref, floor = _gpu_case(case, bits, dtype, scale_dtype, seed=1, key_outlier=False)
    k1, k2 = _kernels("cuda")
    for cfg in [c for c in kivi_configs(TQ, H, HKV, D, g, interpreted=False, bits=bits, v_group=gv) if c["FAST"]][:2]:
        outs = []
        for v_pairs in (False, True):
            out = torch.full_like(q, float("nan"))
            launch(k1, k2, q, cache, out, D ** -0.5, 3, dict(cfg, V_PAIRS=v_pairs))
            assert rel_err(out, ref) <= floor, (cfg, v_pairs)
            outs.append(out)
        apart = _rounding_apart(outs[1], outs[0], dtype)
        assert apart <= 4, (cfg, apart)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_combine_channel_chunks_and_pdl(bits, monkeypatch):
    """The split combine kernel launched with programmatic dependent launch (COMBINE_PDL, off by default)
    writes the same bits as without it; per (row, BLOCK_D channels) it is each channel's same merge, up to
    the order in which tl.sum adds the splits (it follows the layout, which follows BLOCK_D: session 16 saw
    1 of 4096 bf16 outputs move by one rounding at 4-bit), so within 4 unit roundoffs of the largest output
    of one program per row. KIVI 32 / 8 heads, D = 128, 8K tokens (32 rows -> 4 channel chunks)."""
    import fxforge.runtime.decode_attention as da
    from fxforge.runtime.kernels import pdl_capable
    torch.manual_seed(0)
    k, v = (torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cache = kivi_quantize(k, v, bits=bits, group=32, residual=32, scale_dtype=torch.bfloat16)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    outs = []
    for min_block_d, pdl in ((128, False), (32, False), (32, True)):
        monkeypatch.setattr(da, "COMBINE_MIN_BLOCK_D", min_block_d)
        monkeypatch.setattr(da, "COMBINE_PDL", pdl and pdl_capable(q.device))
        outs.append(kivi_decode_attention(q, cache, num_splits=64))
    assert torch.equal(outs[1], outs[2])
    assert _rounding_apart(outs[1], outs[0], torch.bfloat16) <= 4
    kd, vd = kivi_dequantize(cache)
    assert rel_err(outs[0], sdpa(q, kd, vd, torch.float64)) <= 2 * rel_err(sdpa(q, kd, vd, torch.bfloat16),
                                                                              sdpa(q, kd, vd, torch.float64)) + 1e-3
