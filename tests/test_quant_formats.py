"""Numeric core of quantization (issue 4): formats, Hadamard rotations, KIVI KV cache, metrics.

Every format is checked against an independent float64 NumPy reference written here from the conventions in
``fxforge.passes.quant.formats`` (no library helper is called by the references): FP grids are enumerated from
the bit layout and rounded by nearest-with-ties-to-even-code, bf16 rounding uses frexp, fp16 uses NumPy.
"""
import json
import math

import numpy as np
import pytest
import torch
from fxforge.passes.quant import (
    FORMATS,
    QuantFormat,
    QuantizedTensor,
    bytes_per_weight,
    dequantize,
    fake_quantize,
    fwht,
    hadamard_matrix,
    kivi_bytes_per_token,
    kivi_dequantize,
    kivi_quantize,
    quantize,
    random_signs,
    rotate_activation,
    rotate_weight,
    rotation_matrix,
    sqnr_db,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file


# ------------------------------------------------------------------------------------ float64 references
def _fp_grid(exp_bits, mant_bits, bias, n_codes):
    """Non-negative values of a minifloat, index = code (codes 0..n_codes-1, all finite)."""
    vals = []
    for c in range(n_codes):
        e, m = c >> mant_bits, c & ((1 << mant_bits) - 1)
        frac = m / (1 << mant_bits)
        vals.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    return np.array(vals)


E2M1 = _fp_grid(2, 1, 1, 8)      # 0 .5 1 1.5 2 3 4 6
E4M3 = _fp_grid(4, 3, 7, 127)    # code 127 (S.1111.111) is NaN; max 448
assert list(E2M1) == [0, 0.5, 1, 1.5, 2, 3, 4, 6] and E4M3[-1] == 448


def ref_grid_round(y, grid):
    """Nearest grid value (saturating at grid[-1]); ties go to the even code (= even mantissa)."""
    a = np.minimum(np.abs(y), grid[-1])
    i = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    up = (hi - a < a - lo) | ((hi - a == a - lo) & (i % 2 == 0))
    return np.sign(y) * grid[np.where(up, i, i - 1)]


def ref_bf16(x):
    m, e = np.frexp(x)
    return np.ldexp(np.round(np.ldexp(m, 8)), e - 8)


def ref_e4m3_scale(s):
    return ref_grid_round(np.clip(s, 2.0 ** -9, 448.0), E4M3)


def _safe(s):
    return np.where(s > 0, s, 1.0)


def ref_fake_quant(w, name):
    """float64 dequantized weight for format ``name`` (conventions written out independently)."""
    n, k = w.shape
    block = {"w8a16": None, "w8a16_fp8": None, "mxint8": 32, "mxfp8": 32, "mxfp4": 32, "nvfp4": 16,
             "nvint4": 16}.get(name) or (int(name.rsplit("g", 1)[1]) if name.startswith("w4a16_g") else None)
    bs = block or k
    kp = -(-k // bs) * bs
    x = np.pad(w, ((0, 0), (0, kp - k))).reshape(n, kp // bs, bs)
    amax = np.abs(x).max(-1, keepdims=True)
    if name == "w8a16":  # int8 symmetric per row, bf16 scale
        s = ref_bf16(amax / 127)
        out = np.clip(np.round(x / _safe(s)), -127, 127) * s
    elif name == "w8a16_fp8":  # e4m3 per row, fp32 scale
        s = (amax / 448).astype(np.float32).astype(np.float64)
        out = ref_grid_round(x / _safe(s), E4M3) * s
    elif name.startswith("w4a16_g"):  # GPTQ asymmetric uint4, integer zero point, bf16 scale
        lo, hi = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
        s = ref_bf16((hi - lo) / 15)
        z = np.clip(np.round(-lo / _safe(s)), 0, 15)
        out = (np.clip(np.round(x / _safe(s)) + z, 0, 15) - z) * s
    elif name.startswith("mx"):  # OCP MX: X = 2^(floor(log2 amax) - emax_elem)
        emax = {"mxint8": 0, "mxfp8": 8, "mxfp4": 2}[name]
        e = np.where(amax > 0, np.frexp(amax)[1] - 1 - emax, -127).clip(-127, 127)
        X = np.ldexp(1.0, e)
        if name == "mxint8":
            out = np.clip(np.round(x / X * 64), -127, 127) / 64 * X
        else:
            out = ref_grid_round(x / X, E4M3 if name == "mxfp8" else E2M1) * X
    else:  # NV: fp32 tensor scale amax / (448 * elem_max), e4m3 block scale
        emax_v = 6.0 if name == "nvfp4" else 7.0
        ts = np.float64(np.float32(np.abs(x).max() / (448 * emax_v))) or 1.0
        S = ref_e4m3_scale(amax / emax_v / ts) * ts
        y = x / S
        out = (ref_grid_round(y, E2M1) if name == "nvfp4" else np.clip(np.round(y), -7, 7)) * S
    return out.reshape(n, kp)[:, :k]


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, ::7] *= 3.0  # some spread between blocks
    w[0, :5] = 0.0
    if n > 2:
        w[2] = 0.0  # an all-zero row (scale edge case)
    return w


# ----------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("n,k", [(3, 100), (17, 129), (64, 1000), (3, 4096), (17, 1000), (64, 129)])
def test_round_trip_matches_reference(name, n, k):
    w = _weights(n, k, seed=n * 7919 + k)
    qt = quantize(w, name)
    got = dequantize(qt)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    ref = ref_fake_quant(w.double().numpy(), name).astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), ref)
    # symmetric formats are idempotent (the block amax maps to the max code, so the scale is reproduced); the
    # asymmetric GPTQ rule is not (round(hi/s) + round(-lo/s) can be 14), see the constructed-grid test instead
    if FORMATS[name].symmetric:
        assert torch.equal(dequantize(quantize(got, name)), got)


def test_every_registered_format_has_a_reference():
    required = {"w8a16", "w4a16_g32", "w4a16_g64", "w4a16_g128", "mxint8", "mxfp8", "mxfp4", "nvfp4", "nvint4"}
    assert required <= set(FORMATS)
    w = np.ones((1, 32))
    for name in FORMATS:
        ref_fake_quant(w, name)  # raises if the reference does not know the format


@pytest.mark.parametrize("name", list(FORMATS))
def test_storage_layout_and_code_ranges(name):
    fmt = FORMATS[name]
    n, k = 17, 100
    qt = quantize(_weights(n, k, 1), name)
    kp, nb = fmt.padded_k(k), fmt.n_blocks(k)
    assert qt.codes.shape == (n, kp // 2 if fmt.bits == 4 else kp)
    assert qt.scales.shape == (n, nb)
    if fmt.bits == 4:
        nib = torch.stack([qt.codes & 15, qt.codes >> 4], -1).flatten(-2)  # low nibble = even k
        pad_code = qt.zeros[:, -1:] if fmt.zero_point else 0  # padding (last block only) dequantizes to 0
        assert (nib[:, k:] == pad_code).all()
        if fmt.elem == "int4":
            assert not (nib == 8).any()  # -8 never produced (symmetric [-7, 7])
    elif fmt.elem in ("int8", "mxint8"):
        assert qt.codes.dtype == torch.int8 and qt.codes.min() >= -127
    else:
        assert qt.codes.dtype == torch.uint8 and not ((qt.codes & 0x7F) == 0x7F).any()  # no NaN pattern
    if fmt.scale == "e8m0":
        assert qt.scales.dtype == torch.uint8 and (qt.scales < 255).all()
    if fmt.scale == "e4m3":
        assert qt.scales.dtype == torch.uint8 and (qt.scales < 0x7F).all()  # positive, not NaN
        dec = qt.scales.view(torch.float8_e4m3fn).float()
        assert torch.isfinite(dec).all() and (dec > 0).all()
    if fmt.zero_point:
        assert qt.zeros.dtype == torch.uint8 and qt.zeros.shape == (n, nb) and qt.zeros.max() <= 15
    assert (qt.tensor_scale is not None) == fmt.tensor_scale
    assert qt.nbytes() / (n * k) == pytest.approx(bytes_per_weight(name, k, n), rel=1e-12)


@pytest.mark.parametrize("name,emax", [("mxint8", 0), ("mxfp8", 8), ("mxfp4", 2)])
def test_e8m0_scales_follow_the_ocp_floor_rule(name, emax):
    w = _weights(64, 1000, 3) * 1e-3
    qt = quantize(w, name)
    x = torch.nn.functional.pad(w.double(), (0, 1024 - 1000)).view(64, 32, 32)
    amax = x.abs().amax(-1)
    scale = torch.tensor(2.0, dtype=torch.float64) ** (qt.scales.double() - 127)  # powers of two by construction
    r = amax / scale
    nz = amax > 0
    assert ((r[nz] >= 2.0 ** emax) & (r[nz] < 2.0 ** (emax + 1))).all()
    assert (qt.scales[~nz] == 0).all()


def test_exhaustive_fp8_codes_round_trip_in_mxfp8():
    # every finite E4M3 value, in blocks that each contain 448 so the shared scale is 2^0
    vals = np.concatenate([E4M3, -E4M3[1:]])
    blocks = [np.concatenate([[448.0], chunk]) for chunk in np.array_split(vals, 9)]
    w = np.concatenate([np.pad(b, (0, 32 - len(b))) for b in blocks])[None]
    qt = quantize(torch.tensor(w, dtype=torch.float32), "mxfp8")
    assert (qt.scales == 127).all()
    np.testing.assert_array_equal(dequantize(qt).double().numpy(), w)
    expect = torch.tensor(w, dtype=torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    expect[torch.tensor(w) == 0] = 0
    assert torch.equal(qt.codes, expect)


def test_exhaustive_fp4_codes_and_nibble_order():
    signed = np.concatenate([E2M1, -E2M1])  # codes 0..15 (code 8 = -0 -> stored as +0)
    w = np.concatenate([signed, signed])[None] * 2.0 ** -3  # block max 6 * 2^-3 -> X = 2^-3
    qt = quantize(torch.tensor(w, dtype=torch.float32), "mxfp4")
    assert (qt.scales == 127 - 3).all()
    np.testing.assert_array_equal(dequantize(qt).double().numpy(), w)
    codes = list(range(16))
    codes[8] = 0
    b = qt.codes[0].tolist()
    assert b[:8] == [codes[2 * i] | codes[2 * i + 1] << 4 for i in range(8)]


def test_constructed_grid_weights_round_trip_exactly():
    g = torch.Generator().manual_seed(5)
    # w4a16: codes with 0 and 15 in every group, zero in [1, 14], bf16-exact scales
    q = torch.randint(0, 16, (4, 8, 128), generator=g).double()
    q[..., 0], q[..., 1] = 0, 15
    z = torch.randint(1, 15, (4, 8, 1), generator=g).double()
    s = (1 + torch.randint(0, 128, (4, 8, 1), generator=g).double() / 128) * 2.0 ** -9
    w = ((q - z) * s).reshape(4, 1024).float()
    qt = quantize(w, "w4a16_g128")
    assert torch.equal(dequantize(qt), w) and torch.equal(qt.zeros.double(), z[..., 0])
    # nvint4 / nvfp4: every block holds +-elem_max, e4m3 block scales, one block at 448
    for name, elems in (("nvint4", torch.arange(-7, 8).double()), ("nvfp4", torch.tensor(np.concatenate([E2M1, -E2M1])))):
        v = elems[torch.randint(0, len(elems), (3, 64, 16), generator=g)]
        v[..., 0] = float(elems.max())
        sb = torch.tensor(E4M3[torch.randint(40, 127, (3, 64, 1), generator=g).numpy()])
        sb[0, 0] = 448.0
        w = (v * sb * 1.5 * 2.0 ** -12).reshape(3, 1024).float()
        assert torch.equal(dequantize(quantize(w, name)), w), name


def test_sqnr_on_gaussian_weights_per_format():
    # 256 x 4096 N(0, 1), seed 0. Literature / theory for the thresholds:
    # * int8 per-channel ~40+ dB (torchao tests assert > 35); int4 g128 asymmetric ~20 dB (torchao: > 18);
    #   nvfp4 >= 16.5 in torchao's tests. Measured here: w8a16 41.2, w4a16_g128/g64/g32 19.9/20.8/21.9,
    #   w8a16_fp8 31.6, mxint8 41.7, mxfp8 30.7, mxfp4 18.8, nvfp4 20.4, nvint4 21.3.
    # * INT-vs-FP (arXiv 2510.25602): INT QSNR ~ 10.8 + 6.02(b-1) - 20log10(rho) - 20log10(crest), rho ~1.5 for
    #   E8M0, ~1.05 for E4M3 scales -> mxint8 ~41 dB vs ~31 dB for E4M3 elements (3 mantissa bits): MXINT8 > MXFP8.
    w = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0))
    q = {name: sqnr_db(w, dequantize(quantize(w, name))) for name in FORMATS}
    floors = {"w8a16": 35, "w8a16_fp8": 29, "w4a16_g128": 18, "w4a16_g64": 19, "w4a16_g32": 20, "mxint8": 39,
              "mxfp8": 29, "mxfp4": 17, "nvfp4": 19, "nvint4": 20}
    for name, floor in floors.items():
        assert q[name] > floor, (name, q[name])
    assert q["w4a16_g32"] > q["w4a16_g64"] > q["w4a16_g128"]
    assert q["mxint8"] > q["mxfp8"] + 8  # INT-vs-FP: MXINT8 beats MXFP8 at block 32
    assert q["nvfp4"] > q["mxfp4"]  # finer block + E4M3 scales
    # Gaussian blocks of 16 have a low crest factor, so NVINT4 already beats NVFP4 without rotation
    # (rotation leaves i.i.d. Gaussian weights Gaussian, so Hadamard changes nothing here).
    assert q["nvint4"] > q["nvfp4"]
    wr = rotate_weight(w, 32)
    assert sqnr_db(wr, dequantize(quantize(wr, "nvint4"))) > sqnr_db(wr, dequantize(quantize(wr, "nvfp4")))


def test_nvint4_vs_nvfp4_with_outlier_channels_needs_hadamard():
    # INT-vs-FP: "FP (MXFP4, NVFP4) often holds an accuracy advantage, though NVINT4 can surpass NVFP4 when
    # outlier-mitigation techniques like Hadamard rotation are applied". Reproduced with 16 input channels
    # scaled x20: NVFP4 20.8 vs NVINT4 19.1 dB unrotated; with a 32-block Hadamard 19.5 vs 23.3 dB.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 4096, generator=g)
    w[:, torch.randperm(4096, generator=g)[:16]] *= 20
    def nv(x, name):
        return sqnr_db(x, dequantize(quantize(x, name)))
    assert nv(w, "nvfp4") > nv(w, "nvint4") + 1
    wr = rotate_weight(w, 32)
    assert nv(wr, "nvint4") > nv(wr, "nvfp4") + 2
    assert nv(wr, "w8a16") > nv(w, "w8a16") + 10  # rotation also rescues per-channel int8


def test_state_dict_round_trip_through_safetensors(tmp_path):
    w = _weights(17, 129, 11)
    tensors, meta = {}, {}
    qts = {name: quantize(w, name) for name in FORMATS}
    for name, qt in qts.items():
        t, m = qt.to_state_dict(f"layers.{name}.")
        tensors.update(t)
        meta.update(m)
    assert all(isinstance(v, str) for v in meta.values())
    path = tmp_path / "q.safetensors"
    save_file(tensors, str(path), metadata=meta)
    loaded = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        lmeta = f.metadata()
    for name, qt in qts.items():
        back = QuantizedTensor.from_state_dict(loaded, lmeta, prefix=f"layers.{name}.")
        assert back.fmt == qt.fmt and back.shape == (17, 129)
        assert json.loads(lmeta[f"layers.{name}.qmeta"])["format"]["name"] == name
        assert torch.equal(dequantize(back), dequantize(qt))
    with pytest.raises(KeyError, match="qmeta"):
        QuantizedTensor.from_state_dict(loaded, lmeta, prefix="nope.")
    # a corrupt checkpoint's zero point outside the 4-bit code range is refused, not decoded wrongly
    bad = dict(loaded)
    bad["layers.w4a16_g64.qzeros"] = bad["layers.w4a16_g64.qzeros"].clone()
    bad["layers.w4a16_g64.qzeros"][3, 1] = 200
    with pytest.raises(ValueError, match="4-bit code range"):
        QuantizedTensor.from_state_dict(bad, lmeta, prefix="layers.w4a16_g64.")


def test_input_dtype_and_layout_do_not_matter():
    w = _weights(17, 129, 2).bfloat16()
    for name in ("nvfp4", "w4a16_g64", "mxint8"):
        a = dequantize(quantize(w, name))
        assert torch.equal(a, dequantize(quantize(w.float().T.contiguous().T, name)))
        out = fake_quantize(w, name)
        assert out.dtype == torch.bfloat16 and torch.equal(out, a.bfloat16())


def test_bytes_per_weight_values():
    assert bytes_per_weight("w4a16_g128", 4096) == 0.5 + 3 / 128
    assert bytes_per_weight("mxfp4", 4096) == 0.5 + 1 / 32
    assert bytes_per_weight("nvfp4", 4096, 4096) == 0.5 + 1 / 16 + 4 / 4096 ** 2
    assert bytes_per_weight("mxint8", 100) == (128 + 4) / 100  # padding to 128 counted
    assert bytes_per_weight("w8a16", 4096) == 1 + 2 / 4096
    assert kivi_bytes_per_token(2, 128, 32) == 96


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 3, 4), "w8a16")
    with pytest.raises(ValueError, match="unknown quantization format 'int3'"):
        quantize(torch.randn(4, 32), "int3")
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), "w8a16")
    with pytest.raises(TypeError):
        quantize(torch.ones(2, 2, dtype=torch.int32), "w8a16")
    # MXINT8 blocks whose E8M0 exponent the kernels' one-FFMA decode cannot take exactly (|w| >= 2^105)
    w = torch.ones(2, 64, dtype=torch.float64)
    w[1, 40] = 2.0 ** 105
    with pytest.raises(ValueError, match="MXINT8 kernels"):
        quantize(w, "mxint8")
    w[1, 40] = 2.0 ** 104  # the largest block the kernels take
    assert int(quantize(w, "mxint8").scales.max()) == 127 + 104
    with pytest.raises(ValueError, match="zero points"):
        QuantFormat("bad", "uint4", 32, "e8m0", symmetric=False, zero_point=True)
    with pytest.raises(ValueError, match="element type"):
        QuantFormat("bad", "int3", 32, "fp32")
    with pytest.raises(ValueError, match="power of two"):
        rotate_weight(torch.randn(4, 96), 24)
    with pytest.raises(ValueError, match="power of two"):
        rotate_weight(torch.randn(4, 100), None)
    with pytest.raises(ValueError, match="does not divide"):
        rotate_activation(torch.randn(4, 100), 32)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
    k = torch.randn(1, 1, 64, 32)
    with pytest.raises(ValueError, match="bits"):
        kivi_quantize(k, k, bits=3)
    with pytest.raises(ValueError, match="multiple of group"):
        kivi_quantize(k, k, bits=2, group=32, residual=48)
    with pytest.raises(ValueError, match="v_group"):
        kivi_quantize(k, k, bits=2, group=32, v_group=24)


# ---------------------------------------------------------------------------------------------- hadamard
@pytest.mark.parametrize("n", [1, 2, 8, 32, 128])
def test_hadamard_matrix_is_sylvester_and_orthogonal(n):
    h = hadamard_matrix(n)
    ref = np.array([[(-1) ** (i & j).bit_count() for j in range(n)] for i in range(n)]) / math.sqrt(n)
    np.testing.assert_array_equal(h.numpy(), ref)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-14)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h, atol=1e-12)


@pytest.mark.parametrize("k,block", [(128, 32), (96, 32), (256, None), (64, 16), (1024, 32)])
@pytest.mark.parametrize("signed", [False, True])
def test_rotation_preserves_the_linear_layer(k, block, signed):
    b = block or k
    signs = random_signs(b, seed=3) if signed else None
    x = torch.randn(2, 7, k, dtype=torch.float64)
    w = torch.randn(19, k, dtype=torch.float64)
    xr, wr = rotate_activation(x, block, signs), rotate_weight(w, block, signs)
    assert torch.allclose(xr @ wr.T, x @ w.T, atol=1e-11, rtol=0)
    r = rotation_matrix(k, block, signs)
    assert torch.allclose(r @ r.T, torch.eye(k, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(wr, w @ r, atol=1e-13) and torch.allclose(xr, x @ r, atol=1e-12)


# ------------------------------------------------------------------------------------------------- KIVI
def ref_kivi(x, bits):
    """float64 min/max asymmetric fake-quant of ``x [..., groups, g]`` with fp16 scale/min (NumPy)."""
    qmax = 2 ** bits - 1
    mn, mx = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    mn_r = mn.astype(np.float16).astype(np.float64)
    s = ((mx - mn) / qmax).astype(np.float16).astype(np.float64)
    c = np.where(s > 0, np.clip(np.round((x - mn_r) / _safe(s)), 0, qmax), 0)
    return c * s + mn_r


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("s,d,group,residual,v_group", [(100, 64, 32, 32, None), (129, 128, 32, 64, 128),
                                                         (31, 64, 32, 0, 32), (32, 32, 16, 32, 16),
                                                         (257, 64, 64, 128, 32), (64, 64, 32, 0, None)])
def test_kivi_round_trip_matches_reference(bits, s, d, group, residual, v_group):
    g = torch.Generator().manual_seed(s + d)
    k = torch.randn(2, 3, s, d, generator=g).half()
    k[..., 5] *= 10  # a key outlier channel
    v = torch.randn(2, 3, s, d, generator=g).half()
    c = kivi_quantize(k, v, bits=bits, group=group, residual=residual, v_group=v_group)
    gv = v_group or group
    n_q = max(s - residual, 0) // group * group
    assert c.n_quant == n_q and s - n_q >= min(s, residual) and s - n_q < residual + group
    kd, vd = kivi_dequantize(c)
    assert kd.shape == vd.shape == (2, 3, s, d) and kd.dtype == torch.float32
    assert torch.equal(kd[:, :, n_q:], k[:, :, n_q:].float()) and torch.equal(vd[:, :, n_q:], v[:, :, n_q:].float())
    kn, vn = k[:, :, :n_q].double().numpy(), v[:, :, :n_q].double().numpy()
    kr = ref_kivi(kn.reshape(2, 3, n_q // group, group, d).swapaxes(-1, -2), bits).swapaxes(-1, -2)
    vr = ref_kivi(vn.reshape(2, 3, n_q, d // gv, gv), bits)
    np.testing.assert_array_equal(kd[:, :, :n_q].numpy(), kr.reshape(2, 3, n_q, d).astype(np.float32))
    np.testing.assert_array_equal(vd[:, :, :n_q].numpy(), vr.reshape(2, 3, n_q, d).astype(np.float32))
    # documented layout (channel-planar codes), read the way a decode kernel would
    per, mask = 8 // bits, 2 ** bits - 1
    dp = d // per
    assert c.k_codes.shape == (2, 3, n_q, dp) and c.k_scale.shape == (2, 3, n_q // group, d)
    assert c.v_codes.shape == (2, 3, n_q, dp) and c.v_scale.shape == (2, 3, n_q, d // gv)
    for (b, h, t, ch) in [(0, 0, 0, 0), (1, 2, n_q - 1, d - 1), (1, 1, n_q // 2, 5)] if n_q else []:
        code = (int(c.k_codes[b, h, t, ch % dp]) >> (ch // dp) * bits) & mask
        val = code * float(c.k_scale[b, h, t // group, ch]) + float(c.k_min[b, h, t // group, ch])
        assert np.float32(val) == kd[b, h, t, ch].item()
        code = (int(c.v_codes[b, h, t, ch % dp]) >> (ch // dp) * bits) & mask
        val = code * float(c.v_scale[b, h, t, ch // gv]) + float(c.v_min[b, h, t, ch // gv])
        assert np.float32(val) == vd[b, h, t, ch].item()


def test_kivi_4bit_beats_2bit_and_per_channel_keys_help():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 4, 512, 128, generator=g)
    k[..., :4] *= 15  # channel-aligned key outliers (KIVI's observation)
    v = torch.randn(1, 4, 512, 128, generator=g)
    res = {}
    for bits in (2, 4):
        kd, vd = kivi_dequantize(kivi_quantize(k, v, bits=bits, group=32, residual=0))
        res[bits] = (sqnr_db(k, kd), sqnr_db(v, vd))
    # uniform b-bit over a 32-sample Gaussian range (~4.1 sigma): ~8 dB at 2 bits, ~22 dB at 4 bits
    assert res[4][0] > res[2][0] + 10 and res[4][1] > res[2][1] + 10
    assert res[2][1] > 6 and res[4][1] > 19
    # per-token keys (quantizing K like V) suffer from the outlier channels; per-channel keys do not
    _, k_per_token = kivi_dequantize(kivi_quantize(v, k, bits=2, group=32, residual=0))
    assert res[2][0] > sqnr_db(k, k_per_token) + 3
    c = kivi_quantize(k, v, bits=2, group=32, residual=0)
    assert c.nbytes() / (4 * 512) == kivi_bytes_per_token(2, 128, 32)
