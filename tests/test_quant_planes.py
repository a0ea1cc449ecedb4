"""The nibble-planes dequant GEMV on the tensor cores (codegen/templates/dequant_gemv_planes.py, PLANES
configs of quant_linear_apply): the w4a16 family against the float64 reference of the same quantized math
(tests/test_quant_pass.py's bound, no weight rounding: c - z is exact in bf16), at irregular shapes (K not a
multiple of the group, partial row tiles, M = 1, 3, 16), with K splits and bias; random codes over every
value and zero point as well as quantized Gaussian weights. The interpreter runs the fp32 decode; the GPU
test runs the inline-PTX one."""
import pytest
import torch
from fxforge.runtime import quant_linear as ql
from test_quant_pass import _args, _check_kernel, _pack, _random_packed

CASES = [  # (M, N, K, BLOCK_N, split_k)
    (1, 37, 200, 16, None), (3, 70, 600, 32, 3), (16, 20, 328, 16, 2), (1, 64, 1000, 64, None)]


@pytest.mark.parametrize("fmt", ["w4a16_g32", "w4a16_g64", "w4a16_g128", "nvint4", "mxfp4", "nvfp4"])
def test_planes_gemv_matches_the_quantized_math(fmt):
    # w4a16 / mxfp4: a group per step, its scale on the partial; nvint4 / nvfp4 (16-element E4M3 groups):
    # 32- and 64-byte steps with each element scaled (K = 600 / 200 / 1000: a last step past the groups)
    g = torch.Generator().manual_seed(3)
    for i, (m, n, k, bn, split) in enumerate(CASES):
        for qt in (_random_packed(n, k, fmt, seed=m + n), _pack(n, k, fmt, seed=k)[1]):
            bias = torch.randn(n, generator=g) if m != 16 else None
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            cfg = {"PLANES": True, "BLOCK_N": bn, **({"STEP_B": 64} if i % 2 else {})}
            y = ql.quant_linear_apply(x, *_args(qt, bias, fmt, k), config=cfg, split_k=split)
            _check_kernel(y, x, qt, bias, gemm=False)


def test_planes_kernel_at_m64_tiles():
    # above 16 rows of x: 64-row tiles of x (the dot's N) and partial M tiles (M = 70: two tiles)
    k, n = 256, 48
    g = torch.Generator().manual_seed(9)
    for fmt in ("w4a16_g128", "nvint4", "mxfp4"):
        _, qt = _pack(n, k, fmt, seed=11)
        x = torch.randn(70, k, generator=g).to(torch.bfloat16)
        y = ql.quant_linear_apply(x, *_args(qt, None, fmt, k), config={"PLANES": True, "BLOCK_N": 16}, split_k=2)
        _check_kernel(y, x, qt, None, gemm=False)


def test_planes_gemv_takes_only_what_it_can():
    # formats / dtypes it does not take run the default GEMV (same results), bad tiles are refused
    kf = ql.kernel_format
    assert ql.planes_ok(kf("w4a16_g128"), torch.bfloat16, False)
    assert not ql.planes_ok(kf("w4a16_g128"), torch.float32, False)  # fp32 x on the GPU
    assert ql.planes_ok(kf("w4a16_g128"), torch.float32, True)
    assert ql.planes_ok(kf("nvint4"), torch.float16, False)
    assert ql.planes_ok(kf("mxfp4"), torch.bfloat16, False) and ql.planes_ok(kf("nvfp4"), torch.bfloat16, False)
    assert not ql.planes_ok(kf("mxfp4"), torch.float16, False)  # e2m1 through bf16 subnormals only
    for fmt in ("w8a16", "mxint8", "mxfp8", "w8a16_fp8"):  # 8-bit codes
        assert not ql.planes_ok(kf(fmt), torch.bfloat16, False)
    k, n = 96, 24
    x = torch.randn(2, k).to(torch.bfloat16)
    _, qt = _pack(n, k, "mxint8", seed=1)
    y = ql.quant_linear_apply(x, *_args(qt, None, "mxint8", k), config={"PLANES": True, "BLOCK_N": 16})
    _check_kernel(y, x, qt, None, gemm=False)
    _, qt = _pack(n, k, "w4a16_g32", seed=2)
    with pytest.raises(ValueError, match="PLANES BLOCK_N must be"):
        ql.quant_linear_apply(x, *_args(qt, None, "w4a16_g32", k), config={"PLANES": True, "BLOCK_N": 8})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["w4a16_g32", "w4a16_g128", "nvint4", "mxfp4", "nvfp4"])
def test_gpu_planes_gemv(fmt, dtype):
    # the compiled kernel (inline-PTX nibble decode, tensor cores): M = 1, 3, 16, 64, K = 2080 (a partial last
    # group), N = 200 (a partial row tile), warps 1-4, stages 2-4, K splits, bias
    if fmt in ("mxfp4", "nvfp4") and dtype == torch.float16:
        pytest.skip("e2m1 planes take bf16 x only (planes_ok)")
    k, n = 2080, 200
    g = torch.Generator().manual_seed(61)
    # random codes / scales (up to 2^20) only under bf16: their products overflow fp16's range (65504), so the
    # fp16 case takes quantized weights, as the words kernels' fp16 GPU test does
    qts = [_pack(n, k, fmt, seed=63)[1]] + ([_random_packed(n, k, fmt, seed=62)] if dtype == torch.bfloat16 else [])
    for qt in qts:
        bias = torch.randn(n, generator=g)
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, bias, fmt, k)]
        for m, (bn, w, st), split in [(1, (32, 1, 3), None), (3, (16, 1, 2), 3), (16, (64, 4, 3), 2),
                                      (1, (32, 2, 4), 4), (64, (64, 4, 3), 2)]:
            x = torch.randn(m, k, generator=g).to(dtype)
            cfg = {"PLANES": True, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
            y = ql.quant_linear_apply(x.cuda(), *args, config=cfg, split_k=split).cpu()
            _check_kernel(y, x, qt, bias, gemm=False)
