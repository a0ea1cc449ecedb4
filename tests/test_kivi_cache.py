"""KIVI decode cache (runtime/kivi_cache.py) and the ``kivi_cache`` pass (passes/quant/kv_pass.py) on the CPU
interpreter: appends (token by token, whole prefills, chunks, ragged rows) give exactly the codes, scales, mins
and residual tokens of ``kivi_quantize`` over the same sequence; a KVCacheLlama compiled with the pass steps
like the float model whose attention reads ``kivi_dequantize(kivi_quantize(history))``."""
import fxforge
import pytest
import torch
import torch.nn.functional as F
from fxforge.config import DEFAULT_PASSES, Config
from fxforge.errors import ConfigError
from fxforge.models import KVCacheLlama, TinyLlama, apply_rope
from fxforge.passes.quant.kv import kivi_dequantize, kivi_quantize
from fxforge.passes.quant.kv_pass import KIVIKVCache
from fxforge.runtime.kivi_cache import KIVIDecodeCache, masked_attention, n_quant


def sequence(B, H, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g)
    k[..., 3] += 4.0  # a channel-aligned key outlier, as KIVI assumes
    return k.to(dtype), v.to(dtype)


def assert_row_matches(cache, k, v, row, n, scale_dtype=torch.float16):
    """Row ``row`` of ``cache`` holding the first ``n`` tokens of k, v equals kivi_quantize of them, bit for bit."""
    ref = kivi_quantize(k[row:row + 1, :, :n], v[row:row + 1, :, :n], bits=cache.bits, group=cache.group,
                        residual=cache.residual, v_group=cache.v_group, scale_dtype=scale_dtype)
    nq, g = ref.n_quant, cache.group
    assert nq == n_quant(n, g, cache.residual)
    r = slice(row, row + 1)
    for name, rows in (("k_codes", nq), ("k_scale", nq // g), ("k_min", nq // g), ("v_codes", nq), ("v_scale", nq),
                       ("v_min", nq)):
        assert torch.equal(getattr(cache, name)[r, :, :rows], getattr(ref, name)), (name, row, n)
    slots = torch.arange(nq, n) % cache.ring
    assert torch.equal(cache.k_ring[r][:, :, slots], ref.k_residual), ("k_ring", row, n)
    assert torch.equal(cache.v_ring[r][:, :, slots], ref.v_residual), ("v_ring", row, n)


STEP_CASES = [  # bits, G, R, Gv, H, D, first lengths of the two rows, appends one token at a time
    (2, 32, 32, 32, 1, 32, (50, 45), 48),  # crosses 64 and 96 (row 0), 64 (row 1)
    (4, 64, 128, 16, 1, 32, (250, 247), 10),  # R = 128: crosses 256 in both rows
    (2, 32, 128, 16, 2, 16, (152, 150), 10),  # two heads, crosses 160
    (4, 32, 32, 8, 1, 16, (0, 30), 40),  # from an empty row: crosses 64 in both rows
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "b{}g{}r{}gv{}h{}d{}".format(*c[:6]))
def test_token_by_token_matches_kivi_quantize(case):
    """A ragged prefill (per-row counts), then one token per step: every row equals kivi_quantize of its prefix,
    checked after the prefill and after every step that completes a group."""
    bits, g, r, gv, h, d, first, steps = case
    k, v = sequence(2, h, max(first) + steps, d, seed=sum(case[:6]))
    cache = KIVIDecodeCache.empty(2, h, d, max(first) + steps, bits=bits, group=g, residual=r, v_group=gv)
    lengths = cache.append(k[:, :, :max(first)], v[:, :, :max(first)], torch.zeros(2, dtype=torch.int32),
                           counts=torch.tensor(first, dtype=torch.int32))
    assert lengths.tolist() == list(first)
    for row in range(2):
        assert_row_matches(cache, k, v, row, first[row])
    rows = torch.arange(2)
    for _ in range(steps):
        pos = lengths.long()
        new = cache.append(k[rows, :, pos][:, :, None], v[rows, :, pos][:, :, None], lengths)
        grew = n_quant(new, g, r) > n_quant(lengths, g, r)
        lengths = new
        for row in grew.nonzero().flatten().tolist():
            assert_row_matches(cache, k, v, row, int(lengths[row]))
    for row in range(2):
        assert_row_matches(cache, k, v, row, int(lengths[row]))


def test_prefill_at_once_then_chunk():
    """One append of 150 tokens (more than the ring: groups quantized straight from the input), then a chunk
    of 70 whose groups mix ring tokens and new ones."""
    k, v = sequence(2, 1, 220, 32, seed=3)
    cache = KIVIDecodeCache.empty(2, 1, 32, 220, bits=2, group=32, residual=32)
    lengths = cache.append(k[:, :, :150], v[:, :, :150], torch.zeros(2, dtype=torch.int32),
                           counts=torch.tensor([150, 111], dtype=torch.int32))
    for row, n in enumerate((150, 111)):
        assert_row_matches(cache, k, v, row, n)
    rows = torch.arange(2)[:, None]
    idx = lengths.long()[:, None] + torch.arange(70)
    lengths = cache.append(k[rows, :, idx].transpose(1, 2), v[rows, :, idx].transpose(1, 2), lengths)
    assert lengths.tolist() == [220, 181]
    for row, n in enumerate((220, 181)):
        assert_row_matches(cache, k, v, row, n)


def test_groups_not_powers_of_two():
    """G = 24, Gv = 20, D = 80 (padded tiles, per-element masks)."""
    k, v = sequence(1, 1, 90, 80, seed=4)
    cache = KIVIDecodeCache.empty(1, 1, 80, 90, bits=2, group=24, residual=24, v_group=20)
    lengths = cache.append(k[:, :, :70], v[:, :, :70], torch.zeros(1, dtype=torch.int32))
    for t in range(70, 90):
        lengths = cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1], lengths)
    assert_row_matches(cache, k, v, 0, 90)


@pytest.mark.parametrize("dtype,scale_dtype", [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
                                               (torch.float16, torch.float32)], ids=str)
def test_rounding_edges_and_dtypes(dtype, scale_dtype):
    """Cache and scale dtypes; a constant group (scale 0 -> codes 0), values past fp16's range (scale and min
    saturate at 65504), tiny values (subnormal scales) and exact ties of the code rounding."""
    k, v = sequence(1, 1, 96, 16, seed=5)
    k[:, :, :32, 1] = 0.375  # a constant key channel in the first group
    v[:, :, 5] = -1.5  # a constant value token
    if dtype != torch.float16:
        k[:, :, 32:64, 2] *= 1e5  # past fp16: saturated scale/min in the fp16-scale case
    k[:, :, :32, 5] *= 1e-6  # subnormal fp16 scale
    v[:, :, 7, :16] = torch.tensor([0.0, 0.5, 1.0, 1.5] * 4)  # (x - min) / scale hits .5 ties at 2 bits
    k, v = k.to(dtype), v.to(dtype)
    cache = KIVIDecodeCache.empty(1, 1, 16, 96, bits=2, group=32, residual=32, v_group=16, dtype=dtype,
                                  scale_dtype=scale_dtype)
    lengths = cache.append(k[:, :, :60], v[:, :, :60], torch.zeros(1, dtype=torch.int32))
    for t in range(60, 66):
        lengths = cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1], lengths)
    assert_row_matches(cache, k, v, 0, 66, scale_dtype)
    assert cache.k_ring.dtype == dtype and cache.k_scale.dtype == scale_dtype


def test_view_dequantize_and_masked_attention():
    """view() is the capacity KIVICache of kivi_decode_attention(lengths=); dequantize() and masked_attention
    equal kivi_dequantize + causal SDPA over each row's snapshot."""
    B, H, HQ, D, S = 2, 2, 4, 16, 80
    k, v = sequence(B, H, S, D, seed=6)
    cache = KIVIDecodeCache.empty(B, H, D, S, bits=4, group=16, residual=16)
    lens = torch.tensor([S, 61], dtype=torch.int32)
    cache.append(k, v, torch.zeros(B, dtype=torch.int32), counts=lens)
    view = cache.view(1)
    assert view.n_quant == cache.capq == 64 and view.seq_len == 64 + 32 and view.k_residual.shape == (1, H, 32, D)
    assert cache.max_tokens == 64 + 32 - 1 >= S
    kd, vd, pos = cache.dequantize(lens)
    q = torch.randn(B, HQ, 3, D)
    out = masked_attention(q, cache, lens, torch.tensor([58, 59, 60]))
    for row, n in enumerate(lens.tolist()):
        rk, rv = kivi_dequantize(kivi_quantize(k[row:row + 1, :, :n], v[row:row + 1, :, :n], bits=4, group=16,
                                               residual=16))
        p = pos[row]
        assert sorted(p[p >= 0].tolist()) == list(range(n))
        order = p[p >= 0].argsort()
        assert torch.equal(kd[row][:, p >= 0][:, order], rk[0]) and torch.equal(vd[row][:, p >= 0][:, order], rv[0])
        mask = torch.arange(n)[None, :] <= torch.tensor([58, 59, 60])[:, None]
        ref = F.scaled_dot_product_attention(q[row:row + 1], rk, rv, attn_mask=mask, enable_gqa=True)
        assert torch.allclose(out[row:row + 1], ref, atol=1e-6, rtol=1e-5)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="bits"):
        KIVIDecodeCache.empty(1, 1, 16, 64, bits=3)
    with pytest.raises(ValueError, match="residual"):
        KIVIDecodeCache.empty(1, 1, 16, 64, group=16, residual=24)
    with pytest.raises(ValueError, match="v_group"):
        KIVIDecodeCache.empty(1, 1, 16, 64, group=16, residual=16, v_group=12)
    cache = KIVIDecodeCache.empty(2, 2, 16, 64, group=16, residual=16)
    z = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        cache.append(torch.zeros(2, 3, 1, 16), torch.zeros(2, 3, 1, 16), z)
    with pytest.raises(ValueError, match="lengths must be"):
        cache.append(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), z.float())
    with pytest.raises(ValueError, match="equal-shaped"):
        cache.append(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 2, 16), z)
    with pytest.raises(ValueError, match="ring"):
        KIVIDecodeCache(*[cache.buffers()[n] for n in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")],
                        cache.k_ring[:, :, :8], cache.v_ring[:, :, :8], bits=2, group=16, v_group=16, residual=16)


# ---- the pass, end to end -----------------------------------------------------------------------------------

KIVI = {"bits": 2, "group": 16, "residual": 16}


def kivi_reference(m: KVCacheLlama, ids, pos, kivi=None):
    """KVCacheLlama.forward with every layer attending over kivi_dequantize(kivi_quantize(cached history))."""
    kivi = kivi or KIVI
    base = m.base
    b, t = ids.shape
    x = base.embed(ids)
    cos, sin = m.rope_cos[pos], m.rope_sin[pos]
    n = int(pos[-1]) + 1
    mask = (torch.arange(n, device=pos.device)[None, :] <= pos[:, None])[None, None]
    for i, layer in enumerate(base.layers):
        hd, nh, nkv = layer.head_dim, layer.n_heads, layer.n_kv_heads
        h = layer.attn_norm(x)
        q = layer.q_proj(h).view(b, t, nh, hd).transpose(1, 2)
        k = layer.k_proj(h).view(b, t, nkv, hd).transpose(1, 2)
        v = layer.v_proj(h).view(b, t, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kh, vh = getattr(m, f"k_cache{i}"), getattr(m, f"v_cache{i}")
        kh[:b, :, pos], vh[:b, :, pos] = k, v
        kq, vq = (deq.to(q.dtype) for deq in kivi_dequantize(kivi_quantize(kh[:b, :, :n], vh[:b, :, :n], **kivi)))
        attn = F.scaled_dot_product_attention(q, kq, vq, attn_mask=mask, enable_gqa=True)
        x = x + layer.o_proj(attn.transpose(1, 2).reshape(b, t, nh * hd))
        h = layer.mlp_norm(x)
        x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
    return base.lm_head(base.norm(x))


def tiny_decoder(n_layers=1, batch=2, max_seq=80, dim=64, n_heads=4, n_kv_heads=2):
    torch.manual_seed(0)
    base = TinyLlama(vocab=64, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=96,
                     max_seq=max_seq).eval()
    return KVCacheLlama(base, batch=batch, max_seq=max_seq)


def test_compiled_decoder_steps_like_the_kivi_reference(tmp_path):
    """Prefill (40 tokens, one program) and decode (one token per call, another program) share the pass's KIVI
    state; the logits follow the reference through the group boundaries at 32, 48 and 64 tokens. Matmuls run
    eagerly (Config(matmul=False)) to keep the interpreter's time on the KIVI kernels."""
    m = tiny_decoder()
    kv = KIVIKVCache(**KIVI)
    cfg = Config(matmul=False)
    seq = torch.randint(0, 64, (2, 68), generator=torch.Generator().manual_seed(1))
    prefill = fxforge.compile(m, (seq[:, :40], torch.arange(40)), passes=[*DEFAULT_PASSES, kv], config=cfg)
    decode = fxforge.compile(m, (seq[:, :1], torch.tensor([0])), passes=[*DEFAULT_PASSES, kv], config=cfg)
    assert [r["layer"] for r in kv.layers] == ["c_k_cache0"] and not kv.skipped  # this compile's records
    assert list(kv.caches) == ["c_k_cache0"]  # one state, shared by both programs
    rec = kv.layers[-1]
    assert rec["bytes_before"] == 2 * 2 * 2 * 80 * 16 * 4 and rec["bytes_after"] == kv.caches["c_k_cache0"].nbytes()
    assert rec["bytes_after"] < rec["bytes_before"]
    assert "c_k_cache0" not in decode.program.constants and "c_v_cache0" not in decode.program.constants
    assert set(decode.program.mutations) == set(rec["state"].values())
    with torch.no_grad():
        out, ref = prefill(seq[:, :40], torch.arange(40)), kivi_reference(m, seq[:, :40], torch.arange(40))
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        for p in range(40, 68):
            pos = torch.tensor([p])
            out, ref = decode(seq[:, p:p + 1], pos), kivi_reference(m, seq[:, p:p + 1], pos)
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), p
        # an artifact carries the state as it is (safetensors): the loaded program continues the sequence
        fxforge.save(decode, tmp_path / "decode.fxf")
        loaded = fxforge.load(tmp_path / "decode.fxf")
        pos = torch.tensor([68])
        assert torch.equal(loaded(seq[:, :1], pos), decode(seq[:, :1], pos))


def test_pattern_variants_and_skips():
    """Without gqa_attention/reinplace (repeat_kv copies, functional index_put) and with a smaller batch than the
    cache's (slice of the cache) the pattern is still found; a causal SDPA without cache is left alone with a reason."""
    from fxforge.capture import export_graph
    from fxforge.pipeline import Pipeline

    m = tiny_decoder(batch=2, max_seq=48)
    cap = export_graph(m, (torch.zeros(1, 1, dtype=torch.long), torch.tensor([0])))
    kv = KIVIKVCache(**KIVI)
    Pipeline.from_names(["remove_noops", "dce", kv]).run(cap.gm)
    ops = [n for n in cap.gm.graph.nodes if n.target is torch.ops.fxforge.kivi_append_attention.default]
    assert len(ops) == 1 and not kv.skipped
    assert not any(n.target in (torch.ops.aten.index_put.default, torch.ops.aten.scaled_dot_product_attention.default)
                   for n in cap.gm.graph.nodes)
    assert not hasattr(cap.gm, "c_k_cache0") and cap.gm.meta["fxforge_mutations"] == list(kv.layers[0]["state"].values())
    plain = export_graph(TinyLlama(vocab=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2).eval(),
                         (torch.zeros(1, 4, dtype=torch.long),))
    skip = KIVIKVCache(**KIVI)
    Pipeline.from_names(["remove_noops", skip]).run(plain.gm)
    assert not skip.layers and "is_causal" in skip.skipped[0]["reason"]
    short = KIVIKVCache(bits=2, group=16, residual=48)
    Pipeline.from_names([short]).run(export_graph(m, (torch.zeros(2, 1, dtype=torch.long), torch.tensor([0]))).gm)
    assert "nothing would be quantized" in short.skipped[0]["reason"]


def test_pass_options_are_checked():
    with pytest.raises(ConfigError, match="unknown option"):
        KIVIKVCache(bitz=2)
    with pytest.raises(ConfigError, match="bits"):
        KIVIKVCache(bits=3)
    with pytest.raises(ConfigError, match="residual"):
        KIVIKVCache(group=32, residual=48)
    with pytest.raises(ConfigError, match="scale_dtype"):
        KIVIKVCache(scale_dtype="float8")
    assert KIVIKVCache(**KIVI).cache_id() == KIVIKVCache(**KIVI, caches={"x": 1}).cache_id()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_decoder_on_cuda(dtype):
    """The end-to-end test compiled for the GPU (append kernels and KIVI attention compiled, the decode program
    captured in a CUDA graph where the executor can): the logits follow the KIVI reference token by token
    across the group boundaries at 96, 128 (fp32 tightly; bf16 within bf16 noise). Head dim 64: the attention
    kernel's FAST path."""
    shape = {"max_seq": 200, "dim": 128, "n_heads": 4, "n_kv_heads": 2}
    m = tiny_decoder(**shape).to("cuda", dtype)
    kv = KIVIKVCache(bits=2, group=32, residual=32)
    seq = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
    cfg = Config(matmul=False)  # the projections as the reference computes them: no code flips from rounding
    prefill = fxforge.compile(m, (seq[:, :100], torch.arange(100, device="cuda")), passes=[*DEFAULT_PASSES, kv],
                              config=cfg)
    decode = fxforge.compile(m, (seq[:, :1], torch.tensor([0], device="cuda")), passes=[*DEFAULT_PASSES, kv],
                             config=cfg)
    assert kv.layers and not kv.skipped, kv.skipped
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    # the pass's default scale dtype: the cache's own for bf16 (packed-bf16 dequant), fp16 for fp32 caches
    sdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    assert kv.caches["c_k_cache0"].k_scale.dtype == sdt
    ref_kivi = {"bits": 2, "group": 32, "residual": 32, "scale_dtype": sdt}
    with torch.no_grad():
        prefill(seq[:, :100], torch.arange(100, device="cuda"))
        ref_m = tiny_decoder(**shape).to("cuda", dtype)
        kivi_reference(ref_m, seq[:, :100], torch.arange(100, device="cuda"), ref_kivi)
        for p in range(100, 150):
            pos = torch.tensor([p], device="cuda")
            out = decode(seq[:, p:p + 1], pos)
            ref = kivi_reference(ref_m, seq[:, p:p + 1], pos, ref_kivi)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < tol, (p, err)
