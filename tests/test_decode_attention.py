"""The split-KV decode-attention kernels on the CPU interpreter: few query tokens, irregular cache
lengths, GQA/MQA, explicit and automatic splits, masks (static-cache prefix, additive, fully masked
rows), strided cache views, and input validation."""
import math

import fxforge  # noqa: F401
import pytest
import torch
import torch.nn.functional as F
from fxforge.debug import rel_err
from fxforge.runtime.decode_attention import (
    decode_attention,
    decode_configs,
    split_plan,
    workspace_numel,
)


def sdpa_ref(q, k, v, dtype=torch.float64, **kw):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = kw.pop("attn_mask", None)
    mask = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, **kw)


def check(out, q, k, v, **kw):
    """Error vs float64 at most 2× that of same-precision torch SDPA (1e-6 floor)."""
    ref = sdpa_ref(q, k, v, **kw)
    same = sdpa_ref(q, k, v, dtype=q.dtype, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    err, base = rel_err(out, ref), rel_err(same, ref)
    assert err <= max(2 * base, 1e-6), (err, base)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CASES = [  # B, Hq, Hkv, Tq, S, D, num_splits (None: automatic)
    (1, 2, 2, 1, 1, 16, None),
    (2, 4, 1, 3, 17, 64, 3),  # MQA; 2 key blocks → 2 effective splits
    (1, 8, 2, 1, 100, 80, 3),  # GQA 4, non-pow2 head dim
    (2, 4, 4, 3, 300, 64, None),
    (1, 4, 1, 1, 300, 16, 1),
    (1, 8, 2, 3, 300, 64, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}q{}S{}d{}s{}".format(*c))
def test_matches_fp64_within_2x_same_precision_torch(case, dtype):
    B, H, HKV, TQ, S, D, ns = case
    torch.manual_seed(1)
    q, k, v = rand(B, H, TQ, D, dtype=dtype), rand(B, HKV, S, D, dtype=dtype), rand(B, HKV, S, D, dtype=dtype)
    check(decode_attention(q, k, v, num_splits=ns), q, k, v)


def test_fp16_custom_scale_and_padded_head_dim():
    torch.manual_seed(2)
    q, k, v = rand(1, 2, 1, 136, dtype=torch.float16), rand(1, 1, 50, 136, dtype=torch.float16), rand(1, 1, 50, 136, dtype=torch.float16)
    check(decode_attention(q, k, v, scale=0.05, num_splits=2), q, k, v, scale=0.05)


def test_automatic_splits():
    torch.manual_seed(3)
    q, k, v = rand(1, 2, 2, 16), rand(1, 1, 600, 16), rand(1, 1, 600, 16)
    assert split_plan(600, 1, 16, "cpu")[0] == 4  # one program per (stand-in) SM, ≥ 128 keys each
    check(decode_attention(q, k, v), q, k, v)


def test_split_plan(monkeypatch):
    assert split_plan(4096, 1000, 64, "cpu") == (1, 4096)  # programs cover the SMs already
    assert split_plan(200, 1, 64, "cpu") == (1, 256)  # too short to split (< 2 × 128 keys)
    assert split_plan(32768, 1, 64, "cpu") == (4, 8192)  # CPU stand-in: 4 "SMs"
    assert split_plan(100, 8, 16, "cpu", num_splits=3) == (3, 48)  # 7 blocks → chunks of 3 blocks
    assert split_plan(17, 8, 16, "cpu", num_splits=50) == (2, 16)  # never more splits than key blocks
    assert workspace_numel(2, 8, 3, 64, 4) == 2 * 8 * 3 * 4 * 66 and workspace_numel(2, 8, 3, 64, 1) == 0
    import fxforge.runtime.decode_attention as da
    monkeypatch.setattr(da, "sm_count", lambda device: 132)  # H100: one wave of ~128 programs measured best
    assert split_plan(32768, 8, 64, "cuda")[0] == 16
    assert split_plan(8192, 32, 64, "cuda")[0] == 4
    assert split_plan(4096, 128, 64, "cuda")[0] == 1
    assert split_plan(2048, 8, 64, "cuda") == (16, 128)
    assert split_plan(2048, 64, 64, "cuda")[0] == 2


def test_configs():
    cfg = decode_configs(1, 32, 8, 128, interpreted=False)
    assert cfg[0]["BLOCK_M"] == 16 and cfg[0]["HEAD_DIM"] == 128 and {c["BLOCK_N"] for c in cfg} >= {64, 128}
    assert decode_configs(16, 64, 1, 256, interpreted=False)[0]["BLOCK_M"] == 64
    for c in decode_configs(1, 8, 8, 256, interpreted=False, elt=4):  # float32 tiles fit in shared memory
        assert c["num_stages"] * c["BLOCK_N"] * 256 * 4 * 2 <= 200 * 1024
    assert "num_warps" not in decode_configs(3, 8, 2, 80, interpreted=True)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ns", [1, 3])
def test_static_cache_prefix_mask(dtype, ns):
    """The static-cache pattern: keys at positions ≤ pos (per batch) are valid; later splits of a
    short prefix see nothing at all."""
    torch.manual_seed(4)
    B, H, HKV, TQ, S, D = 2, 4, 2, 1, 100, 64
    q, k, v = rand(B, H, TQ, D, dtype=dtype), rand(B, HKV, S, D, dtype=dtype), rand(B, HKV, S, D, dtype=dtype)
    pos = torch.tensor([5, 70])
    mask = (torch.arange(S)[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, S]
    check(decode_attention(q, k, v, mask, num_splits=ns), q, k, v, attn_mask=mask)


@pytest.mark.parametrize("ns", [1, 3])
def test_float_additive_mask(ns):
    torch.manual_seed(5)
    q, k, v = rand(2, 4, 3, 16), rand(2, 1, 70, 16), rand(2, 1, 70, 16)
    mask = torch.randn(2, 4, 3, 70)
    mask[..., 40:] = float("-inf")
    check(decode_attention(q, k, v, mask, num_splits=ns), q, k, v, attn_mask=mask)
    mask2 = torch.randn(3, 70)  # broadcast over batch and heads
    check(decode_attention(q, k, v, mask2, num_splits=ns), q, k, v, attn_mask=mask2)


@pytest.mark.parametrize("ns", [1, 3])
def test_fully_masked_row_gives_zeros(ns):
    torch.manual_seed(6)
    q, k, v = rand(1, 4, 3, 16), rand(1, 2, 50, 16), rand(1, 2, 50, 16)
    mask = torch.rand(1, 4, 3, 50) > 0.5
    mask[..., 0] = True
    mask[0, 1, 2] = False  # one (head, token) row sees nothing
    out = decode_attention(q, k, v, mask, num_splits=ns)
    assert torch.isfinite(out).all() and (out[0, 1, 2] == 0).all()
    keep = torch.ones(1, 4, 3, dtype=torch.bool)
    keep[0, 1, 2] = False
    ref = sdpa_ref(q, k, v, attn_mask=mask)
    assert rel_err(out[keep], ref[keep]) < 1e-6
    fmask = torch.zeros(1, 1, 3, 50)
    fmask[..., 1, :] = float("-inf")  # float mask: token 1 of every head fully masked
    out = decode_attention(q, k, v, fmask, num_splits=ns)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_cache_views_and_out(dtype):
    """k/v as slices of bigger static caches along S, in [B, H, S, D] and [B, S, H, D] storage; q and
    out strided too."""
    torch.manual_seed(7)
    B, H, HKV, TQ, S, SMAX, D = 2, 4, 2, 3, 37, 64, 64
    kc = rand(B, HKV, SMAX, D, dtype=dtype)
    vc = rand(B, SMAX, HKV, D, dtype=dtype).transpose(1, 2)  # BSHD storage
    k, v = kc[:, :, :S], vc[:, :, :S]
    q = rand(B, TQ, H, D, dtype=dtype).transpose(1, 2)
    out = torch.empty(B, TQ, H, D, dtype=dtype).transpose(1, 2)
    res = decode_attention(q, k, v, num_splits=3, out=out)
    assert res is out
    check(out, q, k, v)


def test_large_group_tiles_rows():
    """G = (Hq/Hkv)·Tq > 128 rows: tiled over a third grid axis."""
    torch.manual_seed(8)
    q, k, v = rand(1, 16, 12, 16), rand(1, 1, 40, 16), rand(1, 1, 40, 16)
    check(decode_attention(q, k, v, num_splits=2), q, k, v)


def test_empty_cache_gives_zeros():
    q, k = rand(1, 2, 1, 16), rand(1, 1, 0, 16)
    assert (decode_attention(q, k, k) == 0).all()


@pytest.mark.parametrize("args,match", [
    (lambda: (rand(2, 1, 16), rand(1, 2, 5, 16), rand(1, 2, 5, 16)), "4-D"),
    (lambda: (rand(1, 3, 1, 16), rand(1, 2, 5, 16), rand(1, 2, 5, 16)), "multiple of key/value heads"),
    (lambda: (rand(1, 2, 1, 16), rand(1, 2, 5, 16, dtype=torch.bfloat16), rand(1, 2, 5, 16)), "dtypes must match"),
    (lambda: (rand(1, 2, 1, 320), rand(1, 2, 5, 320), rand(1, 2, 5, 320)), "head dim 320"),
    (lambda: (rand(1, 2, 1, 16), rand(1, 2, 5, 32), rand(1, 2, 5, 32)), "head dim of q"),
    (lambda: (rand(1, 2, 1, 16), rand(1, 2, 5, 16), rand(1, 2, 6, 16)), "shapes differ"),
    (lambda: (rand(1, 2, 1, 16).long(), rand(1, 2, 5, 16).long(), rand(1, 2, 5, 16).long()), "not supported"),
])
def test_input_validation(args, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(*args())


def test_mask_and_out_validation():
    q, k = rand(1, 2, 3, 16), rand(1, 1, 5, 16)
    with pytest.raises(ValueError, match="does not broadcast"):
        decode_attention(q, k, k, torch.ones(1, 2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or floating"):
        decode_attention(q, k, k, torch.ones(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(q, k, k, out=torch.empty(1, 2, 3, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k, k, num_splits=0)
    assert math.isfinite(decode_attention(q, k, k).sum().item())


GPU_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [(1, 32, 8, 1, 4099, 128), (3, 16, 8, 4, 2048, 64), (2, 8, 1, 3, 777, 80),
                                  (1, 64, 1, 16, 1000, 256)], ids=lambda c: "B{}H{}kv{}q{}S{}d{}".format(*c))
def test_all_configs_on_cuda(case, dtype):
    """Every launch config (bf16; the default one for the other dtypes), automatic and explicit splits,
    a static-cache view with a prefix mask."""
    from fxforge.runtime.decode_attention import _kernels, launch
    B, H, HKV, TQ, S, D = case
    torch.manual_seed(0)
    cache_k = torch.randn(B, HKV, S + 64, D, device="cuda", dtype=dtype)
    cache_v = torch.randn(B, S + 64, HKV, D, device="cuda", dtype=dtype).transpose(1, 2)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, H, TQ, D, device="cuda", dtype=dtype)
    mask = (torch.arange(S, device="cuda")[None, :] <= torch.randint(0, S, (B, 1), device="cuda"))[:, None, None, :]
    ref = sdpa_ref(q, k, v, attn_mask=mask)
    floor = max(2 * rel_err(sdpa_ref(q, k, v, dtype=dtype, attn_mask=mask), ref), GPU_FLOOR[dtype])
    k1, k2 = _kernels("cuda")
    cfgs = decode_configs(TQ, H, HKV, D, interpreted=False, elt=q.element_size())
    for cfg in cfgs if dtype == torch.bfloat16 else cfgs[:1]:  # every config once: compiling them all is slow
        for ns in (None, 1, 7):
            out = torch.full_like(q, float("nan"))
            launch(k1, k2, q, k, v, mask, out, 1 / math.sqrt(D), ns, cfg)
            assert rel_err(out, ref) <= floor, (cfg, ns)
