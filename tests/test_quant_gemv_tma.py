"""The w8a16 GEMV fed by TMA boxes (codegen/templates/dequant_gemv_tma.py, runtime/quant_gemv_tma.py), on the
CPU interpreter (host tensor descriptors run there) and, marked gpu, on an sm_90 GPU.

Checked element-wise against a float64 reference of the same quantized math with the bound of
test_quant_pass.py (fp32 accumulation, half an ulp of the output), at shapes the boxes do not tile: rows not
a multiple of BLOCK_N, K a multiple of 16 but not of the box (the last box zero-filled past K), K splits.
"""
import pytest
import torch
from fxforge.passes.quant import FORMATS, QuantizedTensor, dequantize
from fxforge.runtime import quant_gemv_tma as qg
from fxforge.runtime import quant_linear as ql
from test_quant_pass import _args, _check_kernel, _pack, _random_packed

SMALL = {"BLOCK_M": 1, "TMA": True, "BLOCK_N": 8, "BW": 32, "STAGES": 2}
CASES = [  # (M, K, N, activation dtype, bias, split_k, config)
    (1, 528, 40, torch.bfloat16, True, None, qg.DEFAULT_CONFIG),  # one partial box per row tile (132 words)
    (3, 528, 33, torch.float32, False, 3, SMALL),
    (2, 2064, 17, torch.float16, True, 2, qg.DEFAULT_CONFIG),  # 516 words: 4 boxes + 4 words per split pair
    (1, 2064, 9, torch.bfloat16, False, None, dict(SMALL, BW=256, STAGES=3)),
]


@pytest.mark.parametrize("packed", ["random_codes", "gaussian"])
def test_tma_gemv_matches_float64_reference(packed):
    for i, (m, k, n, dtype, has_bias, split, cfg) in enumerate(CASES):
        # random codes cover every int8 code (-127..127) and scales over 2^-20..2^20
        qt = _random_packed(n, k, "w8a16", seed=i) if packed == "random_codes" else _pack(n, k, "w8a16", seed=i)[1]
        if packed == "random_codes" and dtype == torch.float16:
            dtype = torch.bfloat16  # scales up to 2^20: the dot would overflow fp16's 65504
        g = torch.Generator().manual_seed(200 + i)
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g) if has_bias else None
        assert qg.why_not(ql.kernel_format("w8a16"), x, qt.codes) is None  # (else another kernel would run)
        y = ql.quant_linear_apply(x, *_args(qt, bias, "w8a16", k), config=dict(cfg), split_k=split)
        _check_kernel(y, x, qt, bias, gemm=False)


def test_offset_decode_interpreter_twin():
    # DEC 1 (the interpreter's twin of the PRMT offset decode, DEC 2): products x * (2^15 + u) round at 2^-24 of
    # x * 2^15, so the dot is only close (about 1e-4 of |x| @ |W|^T), not exact; x with mean 3 (no
    # cancellation of the (2^15 + 128) * sum(x) offset)
    k, n = 2064, 24
    _, qt = _pack(n, k, "w8a16", seed=7)
    x = (torch.randn(1, k, generator=torch.Generator().manual_seed(8)) + 3.0).float()
    ref = x.double() @ dequantize(qt).double().T
    mag = x.double().abs() @ dequantize(qt).double().abs().T
    y = ql.quant_linear_apply(x, *_args(qt, None, "w8a16", k), config=dict(qg.DEFAULT_CONFIG, DEC=1))
    err = ((y.double() - ref).abs() / mag).max().item()
    assert 1e-7 < err < 2e-3  # inexact (the exact DEC 0 path is ~1e-8 here) but far under a bf16 half ulp
    y2 = ql.quant_linear_apply(x, *_args(qt, None, "w8a16", k), config=dict(qg.DEFAULT_CONFIG, DEC=2))
    assert torch.equal(y2, y)  # the PRMT decode asked for in the interpreter runs its twin
    y0 = ql.quant_linear_apply(x, *_args(qt, None, "w8a16", k), config=dict(qg.DEFAULT_CONFIG))
    assert ((y0.double() - ref).abs() / mag).max().item() < 1e-6


def test_config_selection_and_fallbacks():
    # with WAIT (PDL) the words GEMV leads below 8192 rows too; the TMA config comes second, and not at all above
    first, second = ql.gemv_configs(1, 4096, 4096, "w8a16", interpreted=False)[:2]
    assert first.get("WORDS") and first["WAIT"] and second.get("TMA") and second["BW"] <= qg.MAX_BW
    assert not any(c.get("TMA") for c in ql.gemv_configs(1, 14336, 4096, "w8a16", interpreted=False))
    for fmt in FORMATS:
        if fmt != "w8a16":  # mxint8 is int8 too, but with a scale per 32-code block
            assert not qg.format_ok(ql.kernel_format(fmt))
            assert not any(c.get("TMA") for c in ql.gemv_configs(1, 4096, 4096, fmt, interpreted=False)), fmt
    # K not a multiple of 16 (a descriptor's row stride must be 16-byte aligned): another kernel, same math
    k, n = 100, 12
    _, qt = _pack(n, k, "w8a16", seed=3)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = ql.quant_linear_apply(x, *_args(qt, None, "w8a16", k), config=dict(qg.DEFAULT_CONFIG))
    _check_kernel(y, x, qt, None, gemm=False)
    assert "multiple of 16" in qg.SKIPPED[("w8a16", 1, n, k, "cpu")]
    # a block format with a TMA config: the next (non-TMA) config runs
    _, qt4 = _pack(n, 128, "nvint4", seed=5)
    x4 = torch.randn(1, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    _check_kernel(ql.quant_linear_apply(x4, *_args(qt4, None, "nvint4", 128), config=dict(qg.DEFAULT_CONFIG)),
                  x4, qt4, None, gemm=False)
    assert "w8a16" in qg.SKIPPED[("nvint4", 1, n, 128, "cpu")]
    # K splits only below one wave of row tiles
    assert ql.auto_split_k_tma(ql.CPU_SMS, 1024, 128, torch.device("cpu")) == 1
    assert ql.auto_split_k_tma(1, 1024, 128, torch.device("cpu")) > 1
    # a [1, K] slice of a wider buffer is "contiguous" with a row stride TMA cannot take; rows padded to 16 bytes can
    buf = torch.randint(-127, 128, (3, 96 + 4), dtype=torch.int8)
    one_row = buf[:1, :96]
    assert one_row.is_contiguous() and "16 bytes" in qg.why_not(ql.kernel_format("w8a16"), x, one_row)
    padded = torch.randint(-127, 128, (5, 96 + 16), dtype=torch.int8)[:, :96]
    assert qg.why_not(ql.kernel_format("w8a16"), x, padded) is None
    xp = torch.randn(2, 96, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    for codes in (one_row, padded):
        qt1 = QuantizedTensor(FORMATS["w8a16"], tuple(codes.shape), codes,
                              torch.rand(codes.shape[0], 1).to(torch.bfloat16), None, None)
        y = ql.quant_linear_apply(xp, *_args(qt1, None, "w8a16", 96), config=dict(qg.DEFAULT_CONFIG))
        _check_kernel(y, xp, qt1, None, gemm=False)
    for bad in ({"BW": 512}, {"BW": 48}, {"BLOCK_N": 12}, {"STAGES": 0}):
        with pytest.raises(ValueError, match="TMA"):
            ql._check_blocks(dict(qg.DEFAULT_CONFIG, **bad), ql.kernel_format("w8a16"), gemv=True)
    with pytest.raises(ValueError, match="GEMV only"):
        ql._check_blocks(dict(qg.DEFAULT_CONFIG), ql.kernel_format("w8a16"), gemv=False)


def test_words_fallback_skips_the_tma_config(monkeypatch):
    # w8a16 rows that are not whole int32 words (K % 4 != 0): the words GEMV (first in the GPU list) cannot take
    # them and neither can the TMA GEMV after it (K % 16 != 0): the byte-tile config runs. The GPU config list,
    # in the interpreter.
    orig = ql.gemv_configs
    monkeypatch.setattr(ql, "gemv_configs", lambda M, N, K, fmt, interpreted: orig(M, N, K, fmt, False))
    assert ql.gemv_configs(1, 12, 2050, "w8a16", True)[0].get("WORDS")
    k, n = 2050, 12
    _, qt = _pack(n, k, "w8a16", seed=13)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    _check_kernel(ql.quant_linear_apply(x, *_args(qt, None, "w8a16", k)), x, qt, None, gemm=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90+ GPU")
def test_gpu_tma_gemv_runs():
    # the TMA config of a w8a16 layer below 8192 rows runs the TMA GEMV (nothing recorded as skipped), with and
    # without WAIT (PDL), and agrees with the float64 reference; K splits and M = 3 too
    k, n = 4096, 1000
    _, qt = _pack(n, k, "w8a16", seed=11)
    g = torch.Generator().manual_seed(12)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, None, "w8a16", k)]
    qg.SKIPPED.clear()
    ql.FALLBACKS.clear()
    for m, split, cfg in [(1, None, dict(qg.DEFAULT_CONFIG, WAIT=True)), (3, 2, dict(qg.DEFAULT_CONFIG)),
                          (1, 4, dict(SMALL, BW=256, STAGES=3)), (1, 2, dict(qg.DEFAULT_CONFIG, WAIT=True))]:
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        y = ql.quant_linear_apply(x.cuda(), *args, config=cfg, split_k=split).cpu()
        _check_kernel(y, x, qt, None, gemm=False)
    assert not qg.SKIPPED and not ql.FALLBACKS  # no ineligible input, no out-of-resources fallback: TMA ran
