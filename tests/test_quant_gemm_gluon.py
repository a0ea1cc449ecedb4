"""The Gluon dequant GEMM for M <= 64 on Hopper (codegen/templates/dequant_gemm_gluon.py, runtime/quant_gemm_gluon.py).

Gluon kernels do not run in Triton's CPU interpreter, so the CPU tests check what can be checked without a GPU:
- the decodes: the template's inline-PTX strings are executed by a small PTX emulator below (integer ops bit-exact,
  bf16x2 / f32 arithmetic with one IEEE rounding, as the instructions specify) on every code of every format,
  with scales over their whole range, against formats.py's float64 values -- a wrong constant in the template
  fails here;
- the kernel compiles for sm_90 with the installed Triton (when its compiler can be driven offline): every layout
  conversion the template asserts trivial is, and the wgmmas take their A operand from registers (spills are not
  visible offline: the H100 GPU tests run the compiled kernel);
- config selection and the recorded fallback (CPU tensors, fp16 activations, other formats).
Marked gpu: the default dispatch on an sm_90 GPU against the float64 reference (bound of test_quant_pass.py) at
M = 5, 16, 17, 37, 64 with N and K tails, one K step, a bias, one and several K splits, 2 stages, two warpgroups,
and the recorded fallback of a partial last step.
"""
import importlib.util
import math
import re
import struct

import pytest
import torch
from fxforge.passes.quant import FORMATS
from fxforge.runtime import quant_gemm_gluon as qgl
from fxforge.runtime import quant_linear as ql
from test_quant_pass import _args, _check_kernel, _pack, _random_packed

_spec = importlib.util.spec_from_file_location("dequant_gemm_gluon", qgl.GLUON_TEMPLATE)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)
GLUON_FORMATS = ["nvint4", "nvfp4", "mxfp4", "mxint8", "w4a16_g128", "w4a16_g32", "w8a16"]


# ------------------------------------------------------------------------------------------- PTX emulator
def _f32(bits):
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _f32_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _round_f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]  # RNE (Python floats hold these sums exactly)


def _bf16(bits16):
    return _f32((bits16 & 0xFFFF) << 16)


def _bf16_bits(v):
    # one RNE rounding to bf16 of a value exact in fp32 (every product / sum the decodes form is)
    b = _f32_bits(v)
    assert _f32(b) == v or math.isnan(v), v
    if (b & 0x7F800000) == 0x7F800000:
        return b >> 16
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def _pair(bits32, fn):
    lo, hi = fn(_bf16(bits32), 0), fn(_bf16(bits32 >> 16), 1)
    return _bf16_bits(lo) | (_bf16_bits(hi) << 16)


def run_ptx(asm: str, inputs: dict) -> list:
    """Execute one of the template's inline-asm strings on 32-bit registers: ``inputs`` maps $n to an int (bits),
    returns the output halves written by ``mov.b32 {$0, $1}, r`` (or $0 of a single-output string)."""
    regs = dict(inputs)
    out = {}

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0)
    for ins in asm.replace("{", " { ").replace("}", " } ").split(";"):
        ins = ins.strip().lstrip("{").strip()
        if not ins or ins.startswith(".reg") or ins == "}":
            continue
        op, rest = ins.split(None, 1)
        if op == "mov.b32" and rest.strip().startswith("{"):
            dst, src = rest.split("}")
            names = [d.strip() for d in dst.strip(" {").split(",")]
            v = val(src.strip(" ,"))
            out[names[0]], out[names[1]] = v & 0xFFFF, (v >> 16) & 0xFFFF
            continue
        a = [t.strip() for t in re.split(r",(?![^{]*})", rest)]
        d, s = a[0], [val(t) for t in a[1:]]
        if op == "mov.b32":
            r = s[0]
        elif op == "mul.lo.u32":
            r = s[0] * s[1]
        elif op == "xor.b32":
            r = s[0] ^ s[1]
        elif op == "lop3.b32":
            x, y, z, lut = s
            r = 0
            for i in range(8):  # LUT bit i: a = bit 2, b = bit 1, c = bit 0 of i
                if lut >> i & 1:
                    r |= (x if i & 4 else ~x) & (y if i & 2 else ~y) & (z if i & 1 else ~z)
        elif op == "prmt.b32":
            x, y, sel = s
            src = (x & 0xFFFFFFFF) | ((y & 0xFFFFFFFF) << 32)
            r = sum(((src >> (8 * ((sel >> (4 * k)) & 7))) & 0xFF) << (8 * k) for k in range(4))
        elif op == "fma.rn.f32":
            r = _f32_bits(_round_f32(_f32(s[0]) * _f32(s[1]) + _f32(s[2])))
        elif op == "cvt.rn.bf16x2.f32":
            r = _bf16_bits(_f32(s[1])) | (_bf16_bits(_f32(s[0])) << 16)
        elif op == "fma.rn.bf16x2":
            r = _pair(s[0], lambda v, h, s=s: v * _bf16(s[1] >> (16 * h)) + _bf16(s[2] >> (16 * h)))
        elif op == "mul.rn.bf16x2":
            r = _pair(s[0], lambda v, h, s=s: v * _bf16(s[1] >> (16 * h)))
        elif op == "sub.rn.bf16x2":
            r = _pair(s[0], lambda v, h, s=s: v - _bf16(s[1] >> (16 * h)))
        else:
            raise AssertionError(f"emulator has no {op}")
        regs[d] = r & 0xFFFFFFFF
        if d.startswith("$"):
            out[d] = regs[d]
    return [out[k] for k in sorted(out)]


def _hmul2(a, b):
    return run_ptx("mul.rn.bf16x2 $0, $1, $2;", {"$1": a, "$2": b})[0]


def _bf16x2_of(v):
    return run_ptx("cvt.rn.bf16x2.f32 $0, $1, $1;", {"$1": _f32_bits(v)})[0]


def _scale_path(fmt, raw, zero=0):
    """The template's _group_scales for one (row, group): (multiplier bits, addend bits) as the decode takes them."""
    kf = ql.kernel_format(fmt)
    def dup(bits16):  # the template's _dup_bf16
        return (bits16 & 0xFFFF) * 0x10001
    if kf["PER_ROW"]:  # w8a16: multiplier 1, the row scale waits for the epilogue
        m = _f32_bits(1.0)
        return m, _f32_bits(_round_f32(1.0 * T.MXINT8_ADDEND.value))
    if kf["ELEM"] == 0:
        m = _f32_bits(_f32(max(raw << 23, 0x00400000)))
        return m, _f32_bits(_round_f32(_f32(m) * T.MXINT8_ADDEND.value))
    if kf["ELEM"] == 1:
        return dup(raw), _bf16x2_of(float(zero) + 16.0)
    if kf["SCALE"] == 2:
        m = _hmul2(dup((raw & 127) << 4), T.BF16X2_2P120.value)
        if kf["ELEM"] == 2:
            return m, _hmul2(m, T.BF16X2_M24.value)
        m = _hmul2(m, T.BF16X2_2P117.value)
        return m, m
    m = dup(max(raw << 7, 0x40))
    return m, m


def _asm_for(fmt):
    kf = ql.kernel_format(fmt)
    return {0: T._ASM_INT8, 1: T._ASM_UINT4, 2: T._ASM_INT4,
            3: T._ASM_E2M1_E8M0 if kf["SCALE"] == 1 else T._ASM_E2M1}[kf["ELEM"]].value


def _scale_codes(fmt):
    f = FORMATS[fmt]
    if f.block is None:  # per-row scale: not part of the decode
        return [0]
    if f.scale == "e4m3":  # every finite positive E4M3 (subnormals included)
        return list(range(1, 127))
    if f.elem == "mxint8":  # quantize stops at 104 (the FFMA decode's limit)
        return [0, 1, 2, 37, 90, 103, 104]
    if f.scale == "e8m0":  # E2M1 values up to 6 * 2^63
        return list(range(191))
    return [int(torch.tensor([v], dtype=torch.bfloat16).view(torch.int16)[0]) & 0xFFFF
            for v in (1.0, 3.0e-3, -7.5e-2, 2.0 ** -100, 1.2345e5)]


def _expected(fmt, codes, scale_code, zero):
    """float64 values of element codes (4-bit nibbles 0..15 / int8 bytes 0..255) under one scale code, as
    formats.py defines them, divided by the factors the kernel's epilogue applies (MXINT8's 2^-6, NVFP4's 2^9)."""
    from fxforge.passes.quant.formats import _decode_scale, _element_values

    f, kf = FORMATS[fmt], ql.kernel_format(fmt)
    c = torch.tensor(codes, dtype=torch.uint8)
    if f.bits == 8:
        c = c.view(torch.int8)
    v = _element_values(c, f.spec)
    if kf["PER_ROW"]:  # w8a16: the codes themselves (the row scale is applied to the accumulator)
        return v.tolist()
    sc = torch.tensor([scale_code], dtype=torch.uint8) if f.scale != "bf16" else \
        torch.tensor([scale_code - (1 << 16) * (scale_code >> 15)], dtype=torch.int16).view(torch.bfloat16)
    v = (v - zero) * _decode_scale(sc, f.scale)
    if kf["ELEM"] == 0:
        v = v / kf["STEP"]
    if kf["ELEM"] == 3 and kf["SCALE"] == 2:
        v = v / T.NVFP4_EPILOGUE.value
    return v.tolist()


@pytest.mark.parametrize("fmt", ["nvint4", "nvfp4", "mxfp4", "mxint8", "w4a16_g128", "w8a16"])
def test_decode_asm_matches_format_values(fmt):
    """Every storage unit (4-bit: all 256 bytes; int8: byte pairs covering every code in both halves), every
    scale code (MXINT8: a spread up to its limit 104): the bf16 pair the template's PTX decodes equals formats.py's
    float64 value (w4a16: that value rounded once to bf16, as the SWAP tile rounds it)."""
    kf = ql.kernel_format(fmt)
    asm = _asm_for(fmt)
    if kf["EPB"] == 2:
        units = list(range(256))
        halves = [(u & 15, u >> 4) for u in units]
    else:
        units = [(a & 0xFF) | ((b & 0xFF) << 8) for a in range(256) for b in (a, 255 - a, (a + 77) & 0xFF)]
        halves = [(u & 0xFF, u >> 8) for u in units]
    lo_codes, hi_codes = [h[0] for h in halves], [h[1] for h in halves]
    for sc in _scale_codes(fmt):
        for zero in ([0, 5, 15] if kf["HAS_ZERO"] else [0]):
            m, c = _scale_path(fmt, sc, zero)
            want_lo, want_hi = _expected(fmt, lo_codes, sc, zero), _expected(fmt, hi_codes, sc, zero)
            for u, wl, wh in zip(units, want_lo, want_hi):
                lo, hi = run_ptx(asm, {"$2": u, "$3": m, "$4": c})
                for got, want in ((_bf16(lo), wl), (_bf16(hi), wh)):
                    if kf["ELEM"] == 1:
                        want = _bf16(_bf16_bits(_round_f32(want)))
                    assert got == want, (fmt, sc, zero, hex(u), got, want)


def test_decode_asm_emulator_catches_a_wrong_constant():
    # the emulator is not vacuous: NVINT4's decode with the offset-binary XOR dropped (0x41C0 -> 0x4180) is wrong
    asm = T._ASM_INT4.value.replace("0x41C041C0", "0x41804180")
    m, c = _scale_path("nvint4", 56)  # E4M3 1.0
    lo, _ = run_ptx(asm, {"$2": 0x01, "$3": m, "$4": c})
    assert _bf16(lo) != 1.0
    lo, _ = run_ptx(T._ASM_INT4.value, {"$2": 0x01, "$3": m, "$4": c})
    assert _bf16(lo) == 1.0


# ------------------------------------------------------------------------------------- offline sm_90 compile
def _compile_sm90(fmt, cfg):
    """Compile the kernel for sm_90 without a GPU (Triton's own compiler entry points; skipped when this Triton
    does not expose them). Returns the compiled kernel's PTX."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        from triton.runtime.jit import mangle_type
    except ImportError as e:  # pragma: no cover - depends on the installed Triton
        pytest.skip(f"this Triton cannot compile Gluon offline: {e}")
    kf = ql.kernel_format(fmt)
    n, k, bn, bk = 4096, 4096, cfg["BLOCK_N"], cfg["BK"]
    units = torch.zeros(n, k // 2, dtype=torch.int16 if kf["EPB"] == 1 else torch.uint8)
    x = torch.zeros(64, k, dtype=torch.bfloat16)
    gdt = gl.int16 if kf["EPB"] == 1 else gl.uint8
    wd = TensorDescriptor.from_tensor(units, [bn, bk // 2], gl.NVMMASharedLayout.get_default_for([bn, bk // 2], gdt))
    xd = TensorDescriptor.from_tensor(x, [64, bk], gl.NVMMASharedLayout.get_default_for([64, bk], gl.bfloat16))
    g = qgl.group_size(kf)
    scales = torch.zeros(n, k // g, dtype=torch.bfloat16 if kf["SCALE"] == 0 else torch.uint8)
    fn = T.dequant_gemm_gluon
    vals = {"w_desc": wd, "x_desc": xd, "scales": scales, "zeros": scales, "tensor_scale": x, "bias": x, "partials": x,
            "M": 64, "N": n, "NB": k // g, "s_sn": k // g, "steps_per_split": 8, "total_steps": 32, "s_om": n,
            "ELEM": kf["ELEM"], "SCALE": kf["SCALE"], "HAS_ZERO": kf["HAS_ZERO"], "HAS_TS": kf["HAS_TS"],
            "STEP": kf["STEP"], "EPB": kf["EPB"], "G": bk if kf["PER_ROW"] else g, "PER_ROW": kf["PER_ROW"], "PDL": True,
            "STAGES": cfg["STAGES"], "SPLIT": True, "HAS_BIAS": False, "num_warps": cfg["num_warps"],
            "PREFETCH": bool(cfg.get("PREFETCH"))}
    sig, consts, attrs = {}, {}, {}
    types = {torch.bfloat16: "bf16", torch.uint8: "u8"}
    for i, name in enumerate(fn.arg_names):
        v = vals[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, TensorDescriptor):
            sig[name] = mangle_type(v)
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + types[v.dtype], [["tt.divisibility", 16]]
        else:
            sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    ck = triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg["num_warps"]})
    return ck.asm["ptx"]


@pytest.mark.parametrize("fmt", ["nvint4", "mxint8", "w8a16"])
def test_kernel_compiles_for_sm90_with_register_a_operand(fmt):
    # the layout conversions the template asserts trivial hold (else the compile raises), and every wgmma of the
    # main loop takes its A tile from registers ({4 x b32} operand), 8 per 128-element step (k16 each)
    ptx = _compile_sm90(fmt, dict(qgl.DEFAULT_CONFIG))
    wgmma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n64k16\.f32\.bf16\.bf16 \{[^}]*\}, \{([^}]*)\}", ptx)
    assert wgmma and all(len(a.split(",")) == 4 for a in wgmma)
    assert len(wgmma) % 8 == 0
    assert "cp.async.bulk.tensor.2d" in ptx  # TMA feeds the codes and x


def test_prefetch_fetches_only_codes_before_the_grid_wait():
    # PREFETCH (launched with PDL): the prologue's code boxes go out before griddepcontrol.wait, every x box after it
    # (x may still be being written by the kernel before), and the dependents are signalled after the wait
    ptx = _compile_sm90("nvint4", dict(qgl.DEFAULT_CONFIG, PREFETCH=True))
    wait = ptx.index("griddepcontrol.wait")
    assert ptx.index("griddepcontrol.launch_dependents") > wait
    tma = [(m.start(), m.group(1)) for m in re.finditer(r"cp\.async\.bulk\.tensor\.2d\S*\s+\[[^\]]*\], \[(%rd\d+),", ptx)]
    before = {d for pos, d in tma if pos < wait}
    after = [d for pos, d in tma if pos > wait]
    stages = qgl.DEFAULT_CONFIG["STAGES"]
    assert len(before) == 1 and sum(pos < wait for pos, _ in tma) == stages - 1  # one descriptor: the codes
    assert after and after[0] not in before  # x's descriptor, first thing after the wait
    assert "griddepcontrol.wait" not in _compile_sm90("nvint4", dict(qgl.DEFAULT_CONFIG, PREFETCH=False))


# ------------------------------------------------------------------------------------ selection and fallbacks
def test_config_selection():
    for fmt in GLUON_FORMATS:
        first = ql.gemm_configs(64, 4096, 4096, fmt, interpreted=False)[0]
        assert first.get("GLUON") and first["BK"] % qgl.group_size(ql.kernel_format(fmt)) == 0, fmt
        qgl.check_config(first, ql.kernel_format(fmt))
        assert ql.gemm_configs(17, 4096, 4096, fmt, interpreted=False)[0].get("GLUON")
        assert not any(c.get("GLUON") for c in ql.gemm_configs(65, 4096, 4096, fmt, interpreted=False))
        assert not any(c.get("GLUON") for c in ql.gemm_configs(64, 4096, 4096, fmt, interpreted=True))
    for fmt in ("w8a16_fp8", "mxfp8"):  # no Gluon decode: the Triton tiles stay first
        assert not ql.gemm_configs(64, 4096, 4096, fmt, interpreted=False)[0].get("GLUON")
    with pytest.raises(ValueError, match="BLOCK_N"):
        qgl.check_config(dict(qgl.DEFAULT_CONFIG, BLOCK_N=128), ql.kernel_format("nvint4"))
    with pytest.raises(ValueError, match="multiple of the group"):
        qgl.check_config(dict(qgl.DEFAULT_CONFIG, BK=64), ql.kernel_format("w4a16_g128"))


def test_why_not_reasons():
    kf = ql.kernel_format("nvint4")
    _, qt = _pack(64, 256, "nvint4")
    x = torch.randn(64, 256).to(torch.bfloat16)
    assert "CUDA" in qgl.why_not(kf, x, qt.codes, qt.scales)
    assert "no Gluon decode" in qgl.why_not(ql.kernel_format("mxfp8"), x, qt.codes, qt.scales)
    _, q16 = _pack(64, 256, "w4a16_g128")
    assert "bf16" in qgl.why_not(ql.kernel_format("w4a16_g128"), x, q16.codes, q16.scales.float())


def test_why_not_refuses_a_partial_last_step_and_odd_int8_rows():
    # groups of the last 128-element step past the row's scales would be read unmasked (a NaN there poisons the
    # row: 0 x NaN): the Triton tiles run those shapes; int8 codes are read as int16 pairs
    x = torch.randn(64, 4000).to(torch.bfloat16)
    _, q = _pack(64, 4000, "nvint4")  # padded K 4000: 31.25 steps
    assert "multiple of the 128-element step" in qgl.why_not(ql.kernel_format("nvint4"), x, q.codes, q.scales)
    _, q = _pack(64, 4000, "w4a16_g128")  # padded K 4096: whole steps
    assert "multiple" not in qgl.why_not(ql.kernel_format("w4a16_g128"), x, q.codes, q.scales)
    _, q = _pack(64, 4001, "w8a16")
    assert "even row length" in qgl.why_not(ql.kernel_format("w8a16"), torch.randn(64, 4001).to(torch.bfloat16),
                                             q.codes, q.scales)
    from fxforge.runtime.kernels import device_index
    with pytest.raises(ValueError, match="not a CUDA device"):
        device_index(torch.device("cpu"))


def test_gluon_config_falls_back_in_the_interpreter():
    # a GLUON config asked for on CPU tensors runs the next config (the interpreter's tile) and records why
    fmt, m, n, k = "nvint4", 17, 40, 256
    _, qt = _pack(n, k, fmt, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5))
    qgl.SKIPPED.clear()
    y = ql.quant_linear_apply(x, *_args(qt, bias, fmt, k), config=dict(qgl.DEFAULT_CONFIG))
    _check_kernel(y, x, qt, bias, gemm=True)
    assert "CUDA" in qgl.SKIPPED[(fmt, m, n, k, "cpu")]


# ------------------------------------------------------------------------------------------------------ GPU
def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("fmt", GLUON_FORMATS)
def test_gpu_gluon_gemm_default_dispatch(fmt):
    # the default dispatch at 5 <= M <= 64 runs the Gluon GEMM (nothing skipped, no out-of-resources fallback) and
    # agrees with the float64 reference: N not a multiple of 64, K not a multiple of 128 (its padded K is), one K
    # step, a bias, one split and several, x boxes of 16 / 32 / 64 rows; random codes over every code and a wide
    # scale range, and Gaussian weights. Then explicit configs (2 stages, two warpgroups) and the refusals.
    kf = ql.kernel_format(fmt)
    big, mid = (4000, 2160) if kf["PER_ROW"] else (4088, 2168)  # int8 rows: 16-byte multiples for TMA
    qgl.SKIPPED.clear()
    ql.FALLBACKS.clear()
    cases = [(64, 1000, big, None, "gaussian"), (37, 520, big, 1, "random"), (17, 1000, mid, 3, "gaussian"),
             (64, 4096, 4096, None, "random"), (5, 300, 128 if kf["PER_ROW"] else 120, None, "gaussian"),
             (16, 200, 1024, 2, "random")]
    for i, (m, n, k, split, packed) in enumerate(cases):
        qt = _random_packed(n, k, fmt, seed=i) if packed == "random" else _pack(n, k, fmt, seed=i)[1]
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        bias = torch.randn(n, generator=g) if i % 2 == 0 else None
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, bias, fmt, k)]
        y = ql.quant_linear_apply(x.cuda(), *args, split_k=split).cpu()
        _check_kernel(y, x, qt, bias, gemm=True)
        if i == 0:  # explicit configs: 2 stages; two warpgroups on 128-row tiles
            bk = max(128, qgl.group_size(kf))
            for cfg in (dict(qgl.DEFAULT_CONFIG, BK=bk, STAGES=2), dict(qgl.DEFAULT_CONFIG, BK=bk, BLOCK_N=128,
                                                                         num_warps=8)):
                _check_kernel(ql.quant_linear_apply(x.cuda(), *args, config=cfg).cpu(), x, qt, bias, gemm=True)
            with pytest.raises(ValueError, match="split_k"):
                ql.quant_linear_apply(x.cuda(), *args, config=dict(qgl.DEFAULT_CONFIG, BK=bk), split_k=0)
    assert not qgl.SKIPPED and not ql.FALLBACKS
    if not kf["PER_ROW"] and kf["GB"] * kf["EPB"] < 128:  # a partial last step: the Triton tile runs, reason recorded
        _, qt = _pack(300, 4000, fmt, seed=9)
        x = torch.randn(40, 4000, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, None, fmt, 4000)]
        _check_kernel(ql.quant_linear_apply(x.cuda(), *args).cpu(), x, qt, None, gemm=True)
        assert "multiple of the 128-element step" in qgl.SKIPPED[(fmt, 40, 300, 4000, "cuda")]
