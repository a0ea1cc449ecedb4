"""The attention template on the CPU interpreter: irregular lengths, causal or not, GQA, masks,
sink + window layouts, and SDPA nodes lowered onto it through both front doors."""
import math

import fxforge
import pytest
import torch
import torch.nn.functional as F
from fxforge.debug import rel_err
from fxforge.runtime.attention import attention, block_layout


def sdpa_ref(q, k, v, dtype=torch.float64, **kw):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = kw.pop("attn_mask", None)
    mask = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, **kw)


CASES = [  # B, H, Hkv, Lq, Lk, D, causal
    (1, 2, 2, 1, 1, 16, False), (2, 4, 2, 7, 7, 64, True), (1, 4, 1, 33, 33, 32, True),
    (1, 2, 2, 1, 300, 64, False), (2, 2, 1, 65, 130, 128, False), (1, 2, 2, 100, 100, 16, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}q{}k{}d{}{}".format(*c[:6], "c" if c[6] else ""))
def test_matches_fp64_within_2x_same_precision_torch(case, dtype):
    B, H, HKV, LQ, LK, D, causal = case
    torch.manual_seed(1)
    q, k, v = torch.randn(B, H, LQ, D, dtype=dtype), torch.randn(B, HKV, LK, D, dtype=dtype), torch.randn(B, HKV, LK, D, dtype=dtype)
    out = attention(q, k, v, causal=causal)
    ref = sdpa_ref(q, k, v, is_causal=causal)
    same = sdpa_ref(q, k, v, dtype=dtype, is_causal=causal)
    assert rel_err(out, ref) <= max(2 * rel_err(same, ref), 1e-6)


def test_sink_window_equals_dense_masked_reference():
    torch.manual_seed(0)
    L, sink, win = 200, 8, 50
    q, k, v = (torch.randn(1, 2, L, 32) for _ in range(3))
    i = torch.arange(L)
    visible = (i[None, :] <= i[:, None]) & (((i[:, None] - i[None, :]) < win) | (i[None, :] < sink))
    out = attention(q, k, v, causal=True, sink=sink, window=win)
    assert rel_err(out, sdpa_ref(q, k, v, attn_mask=visible)) < 1e-6


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=str)
def test_user_masks_broadcast(mask_dtype):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 21, 16), torch.randn(2, 2, 21, 16)
    mask = torch.rand(2, 1, 1, 21) > 0.3 if mask_dtype == torch.bool else torch.randn(9, 21)
    if mask_dtype == torch.bool:
        mask[..., 0] = True  # every row sees something
    assert rel_err(attention(q, k, v, mask), sdpa_ref(q, k, v, attn_mask=mask)) < 1e-6


def test_block_layout_counts():
    fc, _, pc, pi, _ = block_layout(256, 256, 64, 64, causal=True)
    assert fc.tolist() == [0, 1, 2, 3] and pc.tolist() == [1, 1, 1, 1]  # diagonal blocks are partial
    assert pi[:, 0].tolist() == [0, 1, 2, 3]
    fc, _, pc, _, _ = block_layout(1024, 1024, 128, 64, causal=True, sink=64, window=256)
    assert int(fc.max()) <= 1 + 256 // 64 and int((fc + pc).max()) <= 2 + 256 // 64 + 2  # O(window), not O(L)
    fc, _, pc, _, _ = block_layout(5, 70, 16, 32, causal=False)
    assert fc.tolist() == [2] and pc.tolist() == [1]  # ragged last key block is partial


OPTIONS = [  # template launch options (codegen/templates/attention.py header), interpreted at small tiles
    {"TMA": 2}, {"TMA": 1}, {"LPT": True}, {"LPT": 2}, {"TMA": 1, "LPT": 2}, {"PIPE": True}, {"TMA": 2, "LPT": True, "PIPE": True},
    {"TMA": 2, "LPT": True, "WS": True}, {"TMA": 1, "WS": True, "PIPE": True},
]
OPT_CASES = [  # B, H, Hkv, Lq, Lk, D, causal: ragged blocks, GQA, Lq != Lk
    (2, 4, 2, 45, 45, 32, True), (1, 2, 1, 37, 70, 16, False), (1, 2, 2, 64, 64, 32, True),
]


def _opt_id(o):
    return "-".join(f"{k}{int(v)}" for k, v in o.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=_opt_id)
def test_launch_options_match_reference(opts, dtype):
    torch.manual_seed(2)
    for B, H, HKV, LQ, LK, D, causal in OPT_CASES:
        q, k, v = torch.randn(B, H, LQ, D, dtype=dtype), torch.randn(B, HKV, LK, D, dtype=dtype), torch.randn(B, HKV, LK, D, dtype=dtype)
        blocks = {"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": D, **opts}
        out = attention(q, k, v, causal=causal, blocks=blocks)
        ref = sdpa_ref(q, k, v, is_causal=causal)
        same = sdpa_ref(q, k, v, dtype=dtype, is_causal=causal)
        assert rel_err(out, ref) <= max(2 * rel_err(same, ref), 1e-6), (opts, LQ, LK, causal)


@pytest.mark.parametrize("opts", OPTIONS[:5], ids=_opt_id)
def test_launch_options_sink_window_and_mask(opts):
    torch.manual_seed(0)
    L, sink, win = 90, 8, 30
    q, k, v = (torch.randn(1, 2, L, 32) for _ in range(3))
    i = torch.arange(L)
    visible = (i[None, :] <= i[:, None]) & (((i[:, None] - i[None, :]) < win) | (i[None, :] < sink))
    blocks = {"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": 32, **opts}
    out = attention(q, k, v, causal=True, sink=sink, window=win, blocks=blocks)
    assert rel_err(out, sdpa_ref(q, k, v, attn_mask=visible)) < 1e-6
    mask = torch.randn(L, L)
    assert rel_err(attention(q, k, v, mask, blocks=blocks), sdpa_ref(q, k, v, attn_mask=mask)) < 1e-6


def test_tma_falls_back_where_descriptors_cannot_address():
    from fxforge.runtime.attention import _rows_view
    torch.manual_seed(0)
    x = torch.randn(2, 19, 3, 32)  # [B, L, H, D] viewed as [B, H, L, D]: rows are not uniformly strided
    q = k = v = x.transpose(1, 2)
    assert _rows_view(q, 32) is None and _rows_view(torch.randn(1, 2, 5, 24), 32) is None
    assert _rows_view(torch.randn(2, 3, 7, 32), 32) == 42
    for t, d in ((q, 32), (torch.randn(1, 2, 21, 24), 24)):
        blocks = {"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": 32, "TMA": 2, "LPT": True}
        out = attention(t, t if d == 24 else k, t if d == 24 else v, causal=True, blocks=blocks)
        kk = t if d == 24 else k
        assert rel_err(out, sdpa_ref(t, kk, kk, is_causal=True)) < 1e-6


def test_tma_compile_failure_falls_back_unless_strict(monkeypatch):
    import fxforge.runtime.attention as A

    real = A._kernel("cpu")

    class NoTMA:  # a Triton that cannot compile descriptor loads
        def __getitem__(self, grid):
            def call(*args, **kw):
                if kw["TMA"]:
                    raise RuntimeError("no TMA here")
                return real[grid](*args, **kw)
            return call
    q = torch.randn(1, 2, 20, 16)
    out = torch.empty_like(q)
    blocks = {"BLOCK_M": 16, "BLOCK_N": 16, "HEAD_DIM": 16, "TMA": 2, "LPT": True}
    monkeypatch.setattr(A, "_FAILED", set())
    with pytest.warns(UserWarning, match="TMA=2"):
        A.launch(NoTMA(), q, q, q, None, out, 0.25, True, blocks=blocks)
    assert rel_err(out, sdpa_ref(q, q, q, is_causal=True, scale=0.25)) < 1e-6
    monkeypatch.setattr(A, "_FAILED", set())
    monkeypatch.setattr(A, "STRICT", True)
    with pytest.raises(RuntimeError, match="no TMA"):
        A.launch(NoTMA(), q, q, q, None, out, 0.25, True, blocks=blocks)


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2


def test_sdpa_lowered_through_both_front_doors():
    q, k, v = (torch.randn(2, 3, 17, 32) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True) * 2
    c = fxforge.compile(Attn(), (q, k, v))
    assert c.report.kernel_kinds().get("attention") == 1 and not c.report.fallbacks
    assert rel_err(c(q, k, v), ref) < 1e-6
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(Attn(), backend="fxforge")(q, k, v)
    assert rel_err(out, ref) < 1e-6
    assert fxforge.backend.last_report().kernel_kinds().get("attention") == 1


def test_dropout_attention_falls_back_with_reason():
    class Drop(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    q = torch.randn(1, 1, 4, 16)
    c = fxforge.compile(Drop(), (q, q, q))
    assert any(f["reason"] == "attention: dropout_p > 0" for f in c.report.fallbacks)
    assert math.isfinite(c(q, q, q).sum().item())


class Explicit(torch.nn.Module):
    def __init__(self, scale_mode="mul", fp32_softmax=False):
        super().__init__()
        self.scale_mode, self.fp32_softmax = scale_mode, fp32_softmax

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1)
        s = s * 0.125 if self.scale_mode == "mul" else s / 8.0
        s = s + mask
        p = torch.softmax(s.float(), -1).to(q.dtype) if self.fp32_softmax else torch.softmax(s, -1)
        return p @ v


@pytest.mark.parametrize("scale_mode,fp32_softmax,dtype", [("mul", False, torch.float32), ("div", True, torch.bfloat16)])
def test_explicit_attention_is_fused(scale_mode, fp32_softmax, dtype):
    from fxforge.config import DEFAULT_PASSES
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 9, 16, dtype=dtype), torch.randn(2, 3, 11, 16, dtype=dtype), torch.randn(2, 3, 11, 16, dtype=dtype)
    mask = torch.randn(2, 1, 9, 11, dtype=dtype)
    m = Explicit(scale_mode, fp32_softmax)
    c = fxforge.compile(m, (q, k, v, mask), passes=list(DEFAULT_PASSES) + ["fuse_attention", "dce"])
    assert c.report.kernel_kinds() == {"attention": 1}, c.report.render()
    ref = sdpa_ref(q, k, v, attn_mask=mask.double(), scale=0.125)
    same = sdpa_ref(q, k, v, dtype=dtype, attn_mask=mask, scale=0.125)
    assert rel_err(c(q, k, v, mask), ref) <= max(2 * rel_err(same, ref), 1e-6)


def test_explicit_attention_pass_leaves_other_patterns_alone():
    from fxforge.config import DEFAULT_PASSES

    class NotAttention(torch.nn.Module):  # softmax over the query axis: not attention
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), -2) @ v
    q = torch.randn(1, 2, 5, 8)
    c = fxforge.compile(NotAttention(), (q, q, q), passes=list(DEFAULT_PASSES) + ["fuse_attention", "dce"])
    assert "attention" not in c.report.kernel_kinds()
    ref = torch.softmax(q.double() @ q.double().transpose(-2, -1), -2) @ q.double()
    assert rel_err(c(q, q, q), ref) < 1e-6


def test_hf_bert_eager_attention_is_fused():
    transformers = pytest.importorskip("transformers")
    from fxforge.config import DEFAULT_PASSES
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids, am = torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    am[1, 8:] = 0
    c = fxforge.compile(model, (ids, am), passes=list(DEFAULT_PASSES) + ["fuse_attention", "dce"])
    assert c.report.kernel_kinds().get("attention") == 2
    ref = model.double()(ids, am).last_hidden_state
    assert rel_err(c(ids, am).last_hidden_state, ref) < 1e-5


GPU_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_block_configs(dtype, monkeypatch):
    """Every long-sequence launch config (bf16; the first one for other dtypes) in strict mode (a
    TMA/WS compile failure raises), on ragged lengths, GQA, a [B, L, H, D] view (pointer fallback),
    a padded head dim, and sink + window."""
    import fxforge.runtime.attention as A
    monkeypatch.setattr(A, "STRICT", True)
    torch.manual_seed(0)
    cases = [(2, 8, 2, 1000, 1000, 128, True), (1, 4, 4, 333, 777, 64, False), (1, 4, 1, 257, 257, 80, True)]
    cfgs = A.block_configs(1000, 128, interpreted=False, elt=dtype.itemsize)
    for cfg in cfgs if dtype == torch.bfloat16 else cfgs[:1]:
        for B, H, HKV, LQ, LK, D, causal in cases:
            q = torch.randn(B, LQ, H, D, device="cuda", dtype=dtype).transpose(1, 2) if D == 64 else \
                torch.randn(B, H, LQ, D, device="cuda", dtype=dtype)
            k, v = (torch.randn(B, HKV, LK, D, device="cuda", dtype=dtype) for _ in range(2))
            blocks = dict(cfg, HEAD_DIM=max(16, 1 << (D - 1).bit_length()))
            ref = sdpa_ref(q, k, v, is_causal=causal)
            floor = max(2 * rel_err(sdpa_ref(q, k, v, dtype=dtype, is_causal=causal), ref), GPU_FLOOR[dtype])
            assert rel_err(attention(q, k, v, causal=causal, blocks=blocks), ref) <= floor, (cfg, D)
        L, sink, win = 1500, 64, 300
        q, k, v = (torch.randn(1, 4, L, 128, device="cuda", dtype=dtype) for _ in range(3))
        i = torch.arange(L, device="cuda")
        vis = (i[None, :] <= i[:, None]) & (((i[:, None] - i[None, :]) < win) | (i[None, :] < sink))
        ref = sdpa_ref(q, k, v, attn_mask=vis)
        floor = max(2 * rel_err(sdpa_ref(q, k, v, dtype=dtype, attn_mask=vis), ref), GPU_FLOOR[dtype])
        assert rel_err(attention(q, k, v, causal=True, sink=sink, window=win, blocks=cfg), ref) <= floor, cfg


def test_long_configs_fit_in_shared_memory_for_every_dtype():
    """The H100 raised OutOfResources for fp32 with the bf16 tiles (327,696 > 232,448 bytes): configs
    are filtered by their shared memory, down to small tiles."""
    import fxforge.runtime.attention as A
    assert A.smem_bytes(128, 128, 3, 128, 2) == 230400  # what the H100 reported for this config
    for elt in (2, 4):
        for head in (64, 128, 256):
            cfgs = A.block_configs(4096, head, interpreted=False, elt=elt)
            assert cfgs and all(A.smem_bytes(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], c["HEAD_DIM"], elt)
                                <= A.SMEM_LIMIT for c in cfgs)
    assert A.block_configs(4096, 128, interpreted=False, elt=2)[0]["BLOCK_N"] == 128
