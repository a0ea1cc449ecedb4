"""The quantize pass and the dequant-matmul kernels (issue 4, part 1), on the CPU interpreter.

Kernels are checked element-wise against a float64 reference of the same quantized math
(``dequantize`` of formats.py, then a float64 matmul), with a bound that follows from where the kernels
round: the fp32 accumulation (``1e-5 * |x| @ |W|^T``), the output cast to bf16 / fp16 (half an ulp of the
output) and, in the tensor-core GEMM, the dequantized weight rounded to the activation dtype
(``2^-8 * |x| @ |W|^T`` for bf16).
"""
import json
import math

import fxforge
import pytest
import torch
import torch.nn.functional as F
from fxforge import ConfigError, registry
from fxforge.capture import export_graph
from fxforge.config import DEFAULT_PASSES
from fxforge.debug import rel_err
from fxforge.models import get_builtin
from fxforge.passes.quant import FORMATS, QuantizedTensor, dequantize, quantize, sqnr_db
from fxforge.passes.quant.quantize_pass import Quantize, default_filter
from fxforge.passes.quant.report import QuantReport, layer_sqnr
from fxforge.pipeline import Pipeline
from fxforge.runtime import quant_linear as ql
from torch import nn

GROUPED = [f for f in FORMATS if FORMATS[f].block is not None]
QL = torch.ops.fxforge.quant_linear.default


# --------------------------------------------------------------------------------------------- helpers
def _pack(n, k, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, :5] *= 8  # a few outlier input channels: blocks with very different scales
    return w, quantize(w, fmt)


def _args(qt, bias, fmt, k):
    return (qt.codes, qt.scales, qt.zeros, qt.tensor_scale, bias, fmt, k)


def _check_kernel(y, x, qt, bias, gemm):
    """y vs float64 x @ dequantize(qt)^T + bias, element-wise (bound in the module docstring)."""
    w64 = dequantize(qt).double()
    ref = x.double() @ w64.T
    if bias is not None:
        ref = ref + bias.double()
    mag = x.double().abs() @ w64.abs().T
    assert y.shape == ref.shape and y.dtype == x.dtype
    half_ulp = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[x.dtype]
    out_ulp, w_round = half_ulp, (half_ulp if gemm else 0.0)
    bound = 1e-5 * mag + out_ulp * ref.abs() + w_round * mag + 1e-30
    excess = ((y.double() - ref).abs() / bound).max().item()
    assert excess <= 1.0, f"error {excess:.2f}x the bound"


def _random_packed(n, k, fmt, seed):
    """A QuantizedTensor with uniformly random codes (every element code, padding included), scales over a
    wide exponent range (E8M0 codes 0..160, every finite E4M3 scale, subnormals included), zero points 0..15."""
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    kp, nb = f.padded_k(k), f.n_blocks(k)

    def ints(lo, hi, shape):
        return torch.randint(lo, hi + 1, shape, generator=g)
    if f.bits == 4:
        codes = (ints(0, 15, (n, kp // 2)) | (ints(0, 15, (n, kp // 2)) << 4)).to(torch.uint8)
    elif f.elem == "fp8_e4m3":
        codes = ints(0, 253, (n, kp))
        codes = torch.where(codes >= 127, codes + 1, codes).to(torch.uint8)  # skip the NaNs 0x7F / 0xFF
    else:
        codes = ints(-127 if fmt == "w8a16" else -128, 127, (n, kp)).to(torch.int8)
    if f.scale == "e8m0":
        scales = ints(0, 160, (n, nb)).to(torch.uint8)
        scales[::3, 0] = 0  # 2^-127, an fp32 subnormal
    elif f.scale == "e4m3":
        scales = ints(0, 126, (n, nb)).to(torch.uint8)
    else:
        s = torch.randn(n, nb, generator=g).abs() * 2.0 ** ints(-20, 20, (n, nb)).float()
        scales = s.to(torch.bfloat16 if f.scale == "bf16" else torch.float32)
    zeros = ints(0, 15, (n, nb)).to(torch.uint8) if f.zero_point else None
    ts = (torch.rand(1, generator=g) * 10 + 1e-3) if f.tensor_scale else None
    return QuantizedTensor(f, (n, k), codes, scales, zeros, ts)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decoding_of_every_code_and_scale_is_exact(fmt):
    # x = identity rows (fp32) picks single weights: y = dequantize(W)^T exactly, for the GEMM (M = K) and
    # the GEMV (16 rows at a time). x's storage has a column of ones just past K: a load past K would show
    # (K odd: the last byte's high nibble is padding).
    k, n = 81, 24
    qt = _random_packed(n, k, fmt, seed=3)
    buf = torch.ones(k, k + 1)
    buf[:, :k] = torch.eye(k)
    x = buf[:, :k]
    want = dequantize(qt).T
    assert torch.equal(QL(x, *_args(qt, None, fmt, k)), want)
    for r in range(0, k, 16):
        assert torch.equal(ql.quant_linear_apply(x[r:r + 16], *_args(qt, None, fmt, k), split_k=2), want[r:r + 16])
    # the GEMM scaling every element (POST off) over two groups per K step (MXINT8: the one-FFMA decode)
    kf = ql.kernel_format(fmt)
    for kb in {max(16, 2 * kf["GB"]), max(16 // kf["EPB"], kf["GB"])}:  # two groups per step; one (or less)
        each = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KB": kb, "GROUP_M": 1, "POST": False}
        for r in range(0, k, 32):
            got = ql.quant_linear_apply(x[r:r + 16], *_args(qt, None, fmt, k), config=dict(each))
            assert torch.equal(got, want[r:r + 16]), (kb, r)
    # the words GEMV (mask decode for integer codes with POST, shift decode otherwise), 4 rows at a time;
    # K = 84 so per-row formats have whole int32 words of codes too
    k = 84
    qt = _random_packed(n, k, fmt, seed=4)
    x = torch.eye(k)
    want = dequantize(qt).T
    # (x and the group scales of the next step prefetched with its words: PREFETCH_X; x as [word, group, element]: XT)
    words = [{"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_G": 1, "WORDS": True, "POST": post, "PREFETCH": pf, "PREFETCH_X": pfx,
              "XT": xt} for post, pf, pfx, xt in ((True, 1, 1, 1), (False, 0, 0, 0), (True, 2, 1, 0), (False, 1, 1, 1))]
    for i, cfg in enumerate(words):
        for r in range(i, k, 13):  # 13 is coprime to 8: every element position of a word, in a few row blocks
            got = ql.quant_linear_apply(x[r:r + 4], *_args(qt, None, fmt, k), config=dict(cfg), split_k=1 + r % 3)
            assert torch.equal(got, want[r:r + 4]), (cfg, r)


CASES = [  # (M, K, N, activation dtype, bias, split_k): K never a multiple of the block
    (1, 100, 33, torch.bfloat16, True, None),
    (3, 129, 3, torch.float32, False, 3),
    (8, 200, 33, torch.float16, True, 2),  # GEMM by default; BLOCK_M 8 per-step-reduction GEMV when asked
    (17, 200, 33, torch.bfloat16, False, None),  # tensor-core GEMM
    (17, 129, 33, torch.float32, True, None),
]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kernels_match_float64_reference_of_the_same_quantized_math(fmt):
    for i, (m, k, n, dtype, has_bias, split) in enumerate(CASES):
        _, qt = _pack(n, k, fmt, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g) if has_bias else None
        y = ql.quant_linear_apply(x, *_args(qt, bias, fmt, k), split_k=split)
        _check_kernel(y, x, qt, bias, gemm=m > ql.GEMV_DISPATCH_M)  # default dispatch
        if ql.GEMV_DISPATCH_M < m <= ql.GEMV_MAX_M:  # the GEMV kernel still takes these rows when asked
            cfg = {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_KB": 32}
            _check_kernel(ql.quant_linear_apply(x, *_args(qt, bias, fmt, k), config=cfg, split_k=split),
                          x, qt, bias, gemm=False)


@pytest.mark.parametrize("fmt", GROUPED)
def test_every_tile_path_of_grouped_formats(fmt):
    # BLOCK_KB below / above the group (one scale per row per tile vs [BLOCK_N, groups] scales), for GEMV
    # (M = 1: [M, N, KB] accumulator; M = 5: per-step reduction) and GEMM, plus explicit K splits.
    k, n = 300, 20
    _, qt = _pack(n, k, fmt, seed=7)
    gb = ql.kernel_format(fmt)["GB"]
    g = torch.Generator().manual_seed(1)
    for m, cfg, split in [(1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_KB": max(gb // 2, 1)}, 1),
                          (5, {"BLOCK_M": 8, "BLOCK_N": 4, "BLOCK_KB": 4 * gb}, 4),
                          (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_KB": 4 * gb, "POST": False}, 2),
                          (3, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_KB": max(gb // 2, 1), "PREFETCH": False}, 3),
                          (5, {"BLOCK_M": 8, "BLOCK_N": 4, "BLOCK_KB": max(gb // 2, 1), "POST": False}, 1),
                          (20, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KB": max(16, 2 * gb), "GROUP_M": 2}, None),
                          # GEMM: tile = one group (scale on the partial accumulator), explicit K splits
                          (20, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_KB": gb, "GROUP_M": 2, "SPLIT_K": 3}, None),
                          (20, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_KB": gb, "GROUP_M": 2, "POST": False}, 2),
                          (20, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_KB": gb, "GROUP_M": 2, "PREFETCH": False}, 2),
                          # GEMM swap AB: w @ x^T (scale on the partial / per element), split-K
                          (20, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KB": gb, "GROUP_M": 2, "SWAP": True}, None),
                          (20, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_KB": max(16, 2 * gb), "GROUP_M": 2, "SWAP": True,
                                "PREFETCH": False, "POST": False}, 2),
                          # SWAP with the next step's tile decoded ahead (per-element scales; the last, masked
                          # tile of each split decoded and dropped), splits of 1-3 steps
                          (20, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_KB": max(16, 2 * gb), "GROUP_M": 2, "SWAP": True,
                                "PREFETCH": False, "POST": False, "DECODE_AHEAD": True}, 2),
                          (20, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KB": max(16, gb), "GROUP_M": 2, "SWAP": True,
                                "POST": False, "DECODE_AHEAD": True}, 7),
                          # 4-bit GEMV on int32 words (8-bit formats: falls back to the byte-tile default)
                          (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_G": 2, "WORDS": True}, None),
                          (3, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_G": 1, "WORDS": True, "POST": False}, 3),
                          (2, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_G": 1, "WORDS": True, "PREFETCH": False}, 2),
                          (1, {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_G": 1, "WORDS": True, "PREFETCH": 2}, None),
                          # WAIT (PDL on sm_90+) means nothing in the interpreter: the same kernel runs
                          (1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_G": 2, "WORDS": True, "WAIT": True}, 2)]:
        if m > ql.GEMV_MAX_M and cfg["BLOCK_KB"] * ql.kernel_format(fmt)["EPB"] < 16:
            continue
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        y = ql.quant_linear_apply(x, *_args(qt, None, fmt, k), config=cfg, split_k=split)
        _check_kernel(y, x, qt, None, gemm=m > ql.GEMV_MAX_M)


def _kspan_run_cap(fmt: str) -> int:
    """The longest K-span run (WPT words) the tests use for ``fmt``: the words of one scale group (a run
    must lie in one), 4 for per-row scales."""
    kf = ql.kernel_format(fmt)
    return 4 if kf["PER_ROW"] else kf["GB"] // 4


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kspan_words_gemv(fmt):
    # dequant_gemv_kspan (lanes and warps over K, rows in registers): every format, M = 1 and 3, rows and K
    # not multiples of the tiles (K = 600: the last group partial, the last step past the words), runs of
    # 1-4 words per thread, K splits, with and without prefetch; random codes over every value and
    # quantized Gaussian weights
    k, n = 600, 20
    gw = _kspan_run_cap(fmt)
    g = torch.Generator().manual_seed(41)
    for qt in (_random_packed(n, k, fmt, seed=42), _pack(n, k, fmt, seed=43)[1]):
        assert ql._words_ok(qt.codes)  # (else the byte-tile GEMV would run instead)
        bias = torch.randn(n, generator=g)
        for m, cfg, split in [(1, {"BLOCK_N": 8, "Q": 4, "WPT": min(4, gw)}, None),
                              (3, {"BLOCK_N": 16, "Q": 2, "WPT": min(2, gw)}, 3),
                              (1, {"BLOCK_N": 4, "Q": 8, "WPT": 1, "PREFETCH": 0}, 2)]:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            cfg = dict(cfg, BLOCK_M=1, WORDS=True, KSPAN=True)
            y = ql.quant_linear_apply(x, *_args(qt, bias, fmt, k), config=cfg, split_k=split)
            _check_kernel(y, x, qt, bias, gemm=False)
    with pytest.raises(ValueError, match="power of two"):
        ql.quant_linear_apply(x, *_args(qt, bias, fmt, k), config=dict(cfg, Q=3))


@pytest.mark.parametrize("fmt", ["w8a16", "w8a16_fp8"])
def test_swap_ab_gemm_and_words_gemv_per_row_formats(fmt):
    # SWAP: the decoded tile is the A operand of w @ x^T; per-output-channel scales on the transposed acc
    k, n, m = 200, 40, 20
    _, qt = _pack(n, k, fmt, seed=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g)
    for cfg, split in [({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KB": 32, "GROUP_M": 2, "SWAP": True}, None),
                       ({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_KB": 64, "GROUP_M": 2, "SWAP": True, "PREFETCH": False}, 3)]:
        y = ql.quant_linear_apply(x, *_args(qt, bias, fmt, k), config=cfg, split_k=split)
        _check_kernel(y, x, qt, bias, gemm=True)
    # the GEMV on int32 words (4 codes per word; per-row scales in the epilogue), M = 1 and 3, split-K
    for m, cfg, split in [(1, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_G": 2, "WORDS": True}, None),
                          (3, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_G": 1, "WORDS": True}, 3),
                          (2, {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_G": 1, "WORDS": True, "PREFETCH": False}, None),
                          (1, {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_G": 1, "WORDS": True, "PREFETCH": 2}, 2)]:
        y = ql.quant_linear_apply(x[:m], *_args(qt, bias, fmt, k), config=cfg, split_k=split)
        _check_kernel(y, x[:m], qt, bias, gemm=False)


def test_zero_blocks_leading_dims_strided_input_and_the_registered_op():
    k, n = 96, 12
    w = torch.randn(n, k)
    w[3] = 0  # an all-zero row: E8M0 code 0 (2^-127), E4M3 / bf16 scales 0
    w[5, 32:64] = 0  # an all-zero block
    x = torch.randn(2, 3, 2 * k)[..., ::2]  # [2, 3, K], not contiguous
    bias = torch.randn(n)
    for fmt in ("mxint8", "nvfp4", "w4a16_g32", "w8a16"):
        qt = quantize(w, fmt)
        y = QL(x, *_args(qt, bias, fmt, k))
        assert y.shape == (2, 3, n)
        _check_kernel(y.reshape(6, n), x.reshape(6, k), qt, bias, gemm=False)
        assert torch.equal(y[..., 3], bias[3].expand(2, 3))
        assert rel_err(ql.reference(x, *_args(qt, bias, fmt, k)), y) < 1e-6  # the no-kernel fallback


def test_gpu_configs_are_valid_for_every_format_and_row_count():
    for fmt in FORMATS:
        for m in (1, 2, 4, 5, 16, 17, 64, 300):
            make = ql.gemv_configs if m <= ql.GEMV_MAX_M else ql.gemm_configs
            cfgs = make(m, 4096, 4096, fmt, interpreted=False)
            assert cfgs and all({"num_warps", "num_stages"} <= set(c) for c in cfgs)
            for c in cfgs:
                ql._check_blocks(c, ql.kernel_format(fmt), gemv=m <= ql.GEMV_MAX_M)
    # split-K only where the (N, M) tiles leave SMs idle, each split >= 4 steps
    assert ql.auto_split_k(1024, 2048, 512, torch.device("cpu")) == 1
    assert ql.auto_split_k(1, 2048, 16, torch.device("cpu")) == 8


def test_fake_implementation_and_input_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, qt = _pack(10, 70, "w4a16_g32")
    x = torch.randn(4, 70, dtype=torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = QL(mode.from_tensor(x), *_args(qt, None, "w4a16_g32", 70))
    assert out.shape == (4, 10) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown format"):
        ql.quant_linear_apply(x, *_args(qt, None, "int3", 70))
    with pytest.raises(ValueError, match=r"\[\.\.\., K=64\]"):
        ql.quant_linear_apply(x, *_args(qt, None, "w4a16_g32", 64))
    with pytest.raises(ValueError, match="zero points required"):
        ql.quant_linear_apply(x, qt.codes, qt.scales, None, None, None, "w4a16_g32", 70)
    with pytest.raises(ValueError, match="codes must be"):
        ql.quant_linear_apply(x, *_args(qt, None, "mxint8", 70))
    with pytest.raises(ValueError, match="x dtype"):
        ql.quant_linear_apply(x.double(), *_args(qt, None, "w4a16_g32", 70))
    with pytest.raises(ValueError, match="power of two"):
        ql.quant_linear_apply(x, *_args(qt, None, "w4a16_g32", 70), config={"BLOCK_M": 4, "BLOCK_N": 3, "BLOCK_KB": 16})


def test_bytes_model_matches_the_template_header():
    header = ql.template_source().split("import triton")[0]
    for fmt, us_4096, us_14336 in [("bf16", 11.19, 39.16), ("w8a16", 5.60, 19.60), ("w4a16_g128", 2.93, 10.26),
                                   ("mxint8", 5.77, 20.20), ("mxfp4", 2.98, 10.41), ("nvfp4", 3.15, 11.02)]:
        a, b = ql.bytes_model(fmt, 4096, 4096), ql.bytes_model(fmt, 14336, 4096)
        assert round(a["expected_us"], 2) == us_4096 and round(b["expected_us"], 2) == us_14336, fmt
        assert f"{us_4096:.2f} us" in header and f"{us_14336:.2f} us" in header
    assert ql.bytes_model("w8a16", 4096, 4096)["weight_bytes"] == 4096 * 4096 + 4096 * 2


# ----------------------------------------------------------------------------------------------- the pass
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 80, bias=False)
        self.lm_head = nn.Linear(80, 10)

    def forward(self, x):
        return self.lm_head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def _mlp():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(4, 64),)


def _quantized_gm(model, inputs, names=DEFAULT_PASSES, **options):
    gm = export_graph(model, inputs).gm
    q = Quantize(**options)
    Pipeline.from_names([*names, q]).run(gm)
    return gm, q


def _ql_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is QL]


# Output error bounds from the per-layer SQNR of each format on Gaussian weights (test_quant_formats:
# w8a16 41, fp8 31, w4 g128 20, mxfp4 19, nvfp4 20 dB -> 1%, 3%, 10%, 11%, 10% per layer), with margin for
# two quantized layers in a row.
REL_BOUND = {"w8a16": 0.02, "w8a16_fp8": 0.06, "w4a16_g32": 0.12, "w4a16_g64": 0.13, "w4a16_g128": 0.15,
             "mxint8": 0.02, "mxfp8": 0.06, "mxfp4": 0.2, "nvfp4": 0.18, "nvint4": 0.18}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pass_on_mlp_every_format(fmt):
    model, inputs = _mlp()
    q = Quantize(format=fmt)
    compiled = fxforge.compile(model, inputs, passes=[*DEFAULT_PASSES, q])
    assert [r["name"] for r in q.layers] == ["fc1", "fc2"]  # lm_head excluded by the default filter
    assert compiled.report.library_calls == 2
    with torch.no_grad():
        ref = model(*inputs)
    assert rel_err(compiled(*inputs), ref) < REL_BOUND[fmt]


def test_pass_graph_records_and_float_weights_removed():
    model, inputs = _mlp()
    gm, _ = _quantized_gm(model, inputs, format="w4a16_g128")
    nodes = _ql_nodes(gm)
    assert len(nodes) == 2 and [n.args[6] for n in nodes] == ["w4a16_g128"] * 2
    assert [n.args[7] for n in nodes] == [64, 96]
    assert nodes[0].args[5] is not None and nodes[1].args[5] is None  # fc1 keeps its bias
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "c_lm_head_weight" in attrs and "c_fc1_weight" not in attrs and not hasattr(gm, "c_fc1_weight")
    assert {"c_fc1_weight_qcodes", "c_fc1_weight_qscales", "c_fc1_weight_qzeros"} <= attrs
    recs = gm.meta["fxforge_quant"]
    assert [(r["name"], r["N"], r["K"], r["format"]) for r in recs] == [("fc1", 96, 64, "w4a16_g128"),
                                                                         ("fc2", 80, 96, "w4a16_g128")]
    # K = 64 is padded to one group of 128: codes 96 x 64 bytes, one bf16 scale + uint8 zero per row
    assert recs[0]["bytes_before"] == 96 * 64 * 4 and recs[0]["bytes_after"] == 96 * 64 + 96 * 3
    json.dumps(recs)  # JSON-friendly


def test_default_and_custom_filters():
    w = torch.zeros(8, 64)
    assert default_filter("layers.0.q_proj", w) and not default_filter("lm_head", w)
    assert not default_filter("embed_tokens", w) and not default_filter("fc", torch.zeros(8, 63))
    b = get_builtin("llama")
    model, inputs = b.factory(), b.example_inputs(1)
    gm, _ = _quantized_gm(model, inputs, names=[])
    names = [r["name"] for r in gm.meta["fxforge_quant"]]
    assert len(names) == 14 and "lm_head" not in names and "layers.1.down_proj" in names
    gm, q = _quantized_gm(model, inputs, names=[], filter=lambda name, w: name.endswith("up_proj"))
    assert [r["name"] for r in q.layers] == ["layers.0.up_proj", "layers.1.up_proj"]
    assert len(_ql_nodes(gm)) == 2


def test_hadamard_only_where_exact_and_shared_per_input():
    b = get_builtin("llama")
    model, inputs = b.factory(), b.example_inputs(1)
    gm, q = _quantized_gm(model, inputs, names=["cse"], format="nvint4", hadamard=32, hadamard_seed=0)
    blocks = {r["name"]: r["hadamard"] for r in q.layers}
    assert blocks["layers.0.q_proj"] == 32 and blocks["layers.0.down_proj"] is None  # K = 172: 32 does not divide
    rot = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("hadamard_32")]
    assert len(rot) == 6  # per layer (after CSE): q/k/v share one rotated input, o_proj one, gate/up one
    gm, q = _quantized_gm(model, inputs, names=[], format="mxfp4", hadamard="full")
    assert {r["hadamard"] for r in q.layers} == {64, None}


@pytest.fixture(scope="module")
def llama():
    b = get_builtin("llama")
    model, inputs = b.factory(), b.example_inputs(1)
    with torch.no_grad():
        ref = model(*inputs)
    return model, inputs, ref


@pytest.mark.parametrize("fmt, options, bound", [("w8a16", {}, 0.02), ("w4a16_g128", {}, 0.15),
                                                 ("nvint4", {"hadamard": 32, "hadamard_seed": 1}, 0.15)])
def test_llama_compiled_close_to_float_and_artifact_round_trip(tmp_path, llama, fmt, options, bound):
    model, inputs, ref = llama
    q = Quantize(format=fmt, **options)
    compiled = fxforge.compile(model, inputs, passes=[*DEFAULT_PASSES, q])
    assert len(q.layers) == 8  # merge_linears ran first: q/k/v and gate/up are one layer each
    assert all("lm_head" not in r["name"] for r in q.layers)
    out = compiled(*inputs)
    assert rel_err(out, ref) < bound
    if fmt == "w8a16":
        return
    loaded = fxforge.load(fxforge.save(compiled, tmp_path / "q"))
    assert torch.equal(loaded(*inputs), out)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_mutated_buffers_are_never_quantized():
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 32)
            self.register_buffer("w", torch.randn(48, 64))

        def forward(self, x):
            y = F.linear(x, self.w)  # mm(x, permute(get_attr w)): a linear whose weight the model mutates
            self.w.mul_(0.5)
            return self.lin(x), y

    def seeded():
        torch.manual_seed(0)
        return Stateful().eval()

    x = torch.randn(2, 64)
    gm = export_graph(seeded(), (x,)).gm
    assert gm.meta["fxforge_mutations"]
    q = Quantize(format="w8a16")
    Pipeline.from_names([q]).run(gm)
    assert [r["name"] for r in q.layers] == ["lin"]
    mutated = gm.meta["fxforge_mutations"][0]
    assert any(n.op == "get_attr" and n.target == mutated for n in gm.graph.nodes)
    compiled = fxforge.compile(seeded(), (x,), passes=[*DEFAULT_PASSES, Quantize(format="w8a16")])
    eager = seeded()
    for _ in range(3):  # the mutated weight stays float and keeps being updated, call after call
        (a, y), (ra, ry) = compiled(x), eager(x)
        assert rel_err(y, ry) < 1e-6 and rel_err(a, ra) < 0.02


def test_clear_errors_for_bad_configuration():
    with pytest.raises(ConfigError, match="unknown format 'int3'.*w8a16"):
        Quantize(format="int3")
    with pytest.raises(ConfigError, match="unknown format"):
        registry.make_pass("quantize", format="bogus")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['fmt'\]"):
        Quantize(fmt="w8a16")
    with pytest.raises(ConfigError, match="hadamard"):
        Quantize(hadamard=24)
    with pytest.raises(ConfigError, match="filter must be a callable"):
        Quantize(filter="lm_head")
    with pytest.raises(ConfigError, match="hadamard_seed"):
        Quantize(hadamard=32, hadamard_seed="a")
    assert Quantize().format.name == "w8a16" and registry.passes["quantize"] is Quantize


# ------------------------------------------------------------------------------------------------ reports
def test_layer_sqnr_report():
    model, inputs = _mlp()
    batches = [inputs, (torch.randn(3, 64),)]
    r8 = layer_sqnr(model, batches, format="w8a16")
    r4 = layer_sqnr(model, batches, quantize=Quantize(format="w4a16_g128"))
    assert r8.batches == 2 and [x["name"] for x in r8.layers] == ["fc1", "fc2"]
    # torchao's thresholds on Gaussian weights: int8 per channel > 35 dB, int4 g128 > 18 dB
    assert r8.min_sqnr_db() > 35 and 18 < r4.min_sqnr_db() < r8.min_sqnr_db() - 10
    assert r4.weight_bytes_after < 0.25 * r4.weight_bytes_before  # fc1's K = 64 is padded to one group of 128
    assert r4.model_bytes_after < r4.model_bytes_before
    assert r4.model_bytes_before == sum(p.numel() * 4 for p in model.parameters())
    js = json.loads(json.dumps(r4.to_json()))
    assert js["format"] == "w4a16_g128" and js["layers"][0]["sqnr_db"] > 18 and "fc2" in r4.render()
    # one batch: the same number as metrics.sqnr_db on that layer's output
    gm = export_graph(model, inputs).gm
    Quantize(format="nvfp4").call(gm)
    one = layer_sqnr(gm, inputs)
    x = inputs[0]
    w1 = model.fc1.weight.detach()
    ref = x.double() @ w1.double().T + model.fc1.bias.double()
    rec = gm.meta["fxforge_quant"][0]
    out = QL(x, *[getattr(gm, a.target) if a is not None else None for a in _ql_args(gm, rec["node"])],
             model.fc1.bias.detach(), "nvfp4", 64)
    assert math.isclose(one.layers[0]["sqnr_db"], sqnr_db(ref, out), rel_tol=1e-6)
    assert QuantReport.from_graph(gm).layers[0]["name"] == "fc1"
    with pytest.raises(ConfigError, match="already quantized"):
        layer_sqnr(gm, inputs, format="w8a16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["mxint8", "mxfp8", "nvint4", "nvfp4", "mxfp4"])
def test_gpu_m64_candidate_tiles(fmt):
    # The M = 64 tiles probe_gemm_m64.py round 8 measures (session 12, compiled offline only so far): SWAP
    # with MXINT8's scales a step ahead, SWAP on two warpgroups (128 rows, 8 warps), and DECODE_AHEAD (the
    # loop-carried decoded tile wgmma reads from shared memory). Random codes over every value and
    # quantized Gaussian weights; K = 2080 (a partial last group, many steps per split), N = 200.
    k, n, m = 2080, 200, 64
    g = torch.Generator().manual_seed(31)
    base = next(c for c in ql.gemm_configs(m, 4096, 4096, fmt, False) if not c.get("GLUON"))  # the Triton tiles
    kb = base["BLOCK_KB"]
    cfgs = [dict(base, SWAP=True, PREFETCH=False, BLOCK_N=64, num_warps=4, SPLIT_K=4),
            dict(base, SWAP=True, PREFETCH=False, BLOCK_N=128, num_warps=8, SPLIT_K=2, num_stages=4),
            dict(base, SWAP=True, PREFETCH=False, BLOCK_N=64, num_warps=4, SPLIT_K=4, DECODE_AHEAD=True),
            dict(base, SWAP=True, PREFETCH=False, BLOCK_N=128, num_warps=8, SPLIT_K=3, DECODE_AHEAD=True,
                 BLOCK_KB=2 * kb)]
    for qt in (_random_packed(n, k, fmt, seed=32), _pack(n, k, fmt, seed=33)[1]):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, None, fmt, k)]
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        for cfg in cfgs:
            y = ql.quant_linear_apply(x.cuda(), *args, config=dict(cfg)).cpu()
            _check_kernel(y, x, qt, None, gemm=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gpu_kspan_words_gemv(fmt):
    # the compiled K-span GEMV (probe round 9 configs; compiled offline only in session 12): M = 1 and 3,
    # K = 2080 (a partial last group), N = 200, with and without prefetch, K splits
    k, n = 2080, 200
    gw = _kspan_run_cap(fmt)
    g = torch.Generator().manual_seed(51)
    for qt in (_random_packed(n, k, fmt, seed=52), _pack(n, k, fmt, seed=53)[1]):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, None, fmt, k)]
        for m, (bn, q, wpt, w, pf), split in [(1, (8, 128, 4, 4, 1), None), (3, (16, 64, 2, 2, 0), 3),
                                              (1, (8, 256, 2, 8, 1), 2)]:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            cfg = {"BLOCK_M": 1, "BLOCK_N": bn, "Q": q, "WPT": min(wpt, gw), "WORDS": True, "KSPAN": True,
                   "PREFETCH": pf, "num_warps": w, "num_stages": 1}
            y = ql.quant_linear_apply(x.cuda(), *args, config=cfg, split_k=split).cpu()
            _check_kernel(y, x, qt, None, gemm=False)


def _ql_args(gm, node_name):
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    return node.args[1:5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gpu_decode_paths_match_float64_reference(fmt):
    # The decode paths only the GPU compiles (the interpreter keeps the fp32 decodes): the SWAP GEMM's
    # packed 16-bit uint4 / int4 decode, e2m1 / e4m3 through fp32 subnormals, the words GEMV's mask decode,
    # the K-split M = 64 defaults. Random codes over every value (subnormal scales included) with bf16 x,
    # and quantized Gaussian weights with bf16 / fp16 x; M = 1, 3 (words GEMV), 64 (GEMM); N = 200 is
    # not a multiple of any tile.
    k, n = 640, 200
    cases = [(_random_packed(n, k, fmt, seed=11), torch.bfloat16), (_pack(n, k, fmt, seed=12)[1], torch.bfloat16),
             (_pack(n, k, fmt, seed=13)[1], torch.float16)]
    g = torch.Generator().manual_seed(14)
    for qt, dtype in cases:
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, None, fmt, k)]
        for m in (1, 3, 64):
            x = torch.randn(m, k, generator=g).to(dtype)
            y = ql.quant_linear_apply(x.cuda(), *args).cpu()
            _check_kernel(y, x, qt, None, gemm=m > ql.GEMV_DISPATCH_M)
