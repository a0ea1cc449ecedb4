"""The tensor-core w4a16 GEMV (codegen/templates/dequant_gemv_mma.py, runtime/quant_gemv_mma.py).

Gluon kernels do not run in Triton's CPU interpreter and the kernel's arithmetic is one inline-PTX block per scale
group (decode + mma.sync), so the CPU tests check what can be checked without a GPU:
- the PTX block itself, executed by a warp-level emulator below (32 lanes in lock step: shr / lop3 / prmt bit-exact,
  fma.rn.{bf16,f16}x2 with one rounding, mma.sync m16n8k16 from the PTX ISA's fragment layout in float64 then fp32)
  on the data layout the template's header describes (lane 4g + t: words 4t .. 4t + 3 of rows g and g + 8, their x
  pairs, the rows' zero points; built here by hand), against the float64 dot of the dequantized rows -- a wrong
  selector, mask or constant fails. That the kernel really hands the block this layout (the split order of x's pairs,
  pack=4's operand numbering) only the GPU tests show;
- the kernel compiles for sm_90 with the installed Triton (every layout conversion it asserts trivial is): the
  unrolled loop issues 8 mma.sync per group, and with WAIT only code words are loaded before griddepcontrol.wait;
- config selection, the refusals, and the recorded fallback of an MMA config on CPU tensors.
Marked gpu: the default dispatch against the fp32 reference at EVEN and masked shapes (N, K tails, fp16 x, M = 1..4,
bias, every config kind), and a chain of dependent layers in a CUDA graph with PDL, bit-identical to eager.
"""
import importlib.util
import re

import numpy as np
import pytest
import torch
from fxforge.passes.quant.formats import quantize
from fxforge.runtime import quant_gemv_mma as qm
from fxforge.runtime import quant_linear as ql
from test_inline_ptx_decodes import _f32, _half_bits, _lop3, _prmt
from test_inline_ptx_decodes import _half_value as _hv

_spec = importlib.util.spec_from_file_location("dequant_gemv_mma", qm.MMA_TEMPLATE)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)
FMT = "w4a16_g128"


# ------------------------------------------------------------------------------------- warp-level PTX emulator
# (the single-lane ops -- lop3, prmt, the half <-> float conversions -- are test_inline_ptx_decodes.py's)
def _half(h, kind):
    return _hv(h & 0xFFFF, kind)  # the low 16 bits of a register


def run_warp(asm: str, lanes: list) -> list:
    """Execute ``asm`` (one straight-line block) on 32 lanes; ``lanes[l]`` maps "$n" to an int (32-bit bits; f32
    operands as their bits). Returns each lane's register dict after the block."""
    regs = [dict(r) for r in lanes]
    body = asm.strip()[1:-1]  # the block's braces
    for ins in body.split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        if op.startswith("mma.sync.aligned.m16n8k16.row.col.f32"):
            kind = "bf16" if ".bf16.bf16." in op else "f16"
            groups = [[t.strip() for t in g.split(",")] for g in re.findall(r"\{([^}]*)\}", rest)]
            d, a, b, c = groups
            A, B = np.zeros((16, 16)), np.zeros((16, 8))
            C = np.zeros((16, 8))
            for lane in range(32):
                g, t = lane // 4, lane % 4
                r = regs[lane]
                av = [r[x] for x in a]
                for j, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                    A[row, col], A[row, col + 1] = _half(av[j], kind), _half(av[j] >> 16, kind)
                bv = [r[x] for x in b]
                for j, k0 in enumerate((2 * t, 2 * t + 8)):
                    B[k0, g], B[k0 + 1, g] = _half(bv[j], kind), _half(bv[j] >> 16, kind)
                for j, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                    C[row, col] = _f32(r[c[j]])
            D = (A @ B + C).astype(np.float32)
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
                    regs[lane][d[j]] = int(np.array([D[row, col]], dtype=np.float32).view(np.uint32)[0])
            continue
        args = [t.strip() for t in rest.split(",")]
        for r in regs:
            def val(tok, r=r):
                if tok in r:
                    return r[tok]
                if tok.startswith("0f"):
                    return int("0x" + tok[2:], 0)  # PTX 0f<hex>: float bits
                return int(tok, 0)
            dst, src = args[0], [val(t) for t in args[1:]]
            if op in ("mov.b32", "mov.f32"):
                v = src[0]
            elif op == "shr.u32":
                v = src[0] >> src[1]
            elif op == "lop3.b32":
                v = _lop3(*src)
            elif op == "prmt.b32":
                v = _prmt(*src)
            elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
                kind = "bf16" if "bf16" in op else "f16"
                v = 0
                for h in range(2):
                    x, y, z = (_half(s >> (16 * h), kind) for s in src)
                    v |= _half_bits(x * y + z, kind) << (16 * h)
            else:
                raise NotImplementedError(op)
            r[dst] = v & 0xFFFFFFFF
    return regs


def _group_case(seed, kind):
    """One instance's data as the kernel lays it out: 16 rows x 16 code words (a 128-element group), zero points,
    x (exact in bf16 / fp16). Returns (per-lane inputs, float64 dot per row)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(16, 128))  # every nibble value, every position
    z = rng.integers(0, 16, size=16)
    x = rng.standard_normal(128).astype(np.float16 if kind == "f16" else np.float32)
    if kind == "bf16":
        x = np.array([_half(_half_bits(float(v), "bf16"), "bf16") for v in x])
    x = x.astype(np.float64)
    words = [[sum(int(codes[r, 8 * w + e]) << (4 * e) for e in range(8)) for w in range(16)] for r in range(16)]
    xb = [_half_bits(float(v), kind) for v in x]
    pairs = [[xb[8 * w + 2 * p] | (xb[8 * w + 2 * p + 1] << 16) for p in range(4)] for w in range(16)]
    base = 0x4300 if kind == "bf16" else 0x6400
    lanes = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        inp = {}
        for i in range(4):
            w = 4 * t + i
            inp[f"${4 + i}"], inp[f"${8 + i}"] = words[g][w], words[g + 8][w]
            for p in range(4):
                inp[f"${12 + 4 * p + i}"] = pairs[w][p]
            inp[f"${28 + i}"] = ((base | 0x8000) | int(z[g])) * 0x10001  # -(base + z) pairs
            inp[f"${32 + i}"] = ((base | 0x8000) | int(z[g + 8])) * 0x10001
        lanes.append(inp)
    ref = ((codes - z[:, None]).astype(np.float64) @ x)
    return lanes, ref


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_group_asm_matches_the_dequantized_dot(kind):
    asm = T._ASM_BF16.value if kind == "bf16" else T._ASM_F16.value
    for seed in range(3):
        lanes, ref = _group_case(seed, kind)
        out = run_warp(asm, lanes)
        for lane in range(32):
            g = lane // 4
            c = [_f32(out[lane][f"${j}"]) for j in range(4)]
            # every column of B carries x: c0 = c1 = row g, c2 = c3 = row g + 8
            np.testing.assert_allclose(c[:2], [ref[g]] * 2, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(c[2:], [ref[g + 8]] * 2, rtol=1e-6, atol=1e-6)


def test_group_asm_emulator_catches_a_wrong_selector_or_constant():
    lanes, ref = _group_case(7, "bf16")
    good = T._ASM_BF16.value
    for bad in (good.replace("0x5410", "0x3210"), good.replace("shr.u32 l2, $4, 8", "shr.u32 l2, $4, 4"),
                good.replace("0x43004300", "0x43804380")):
        assert bad != good
        out = run_warp(bad, lanes)
        got = np.array([_f32(out[4 * g][f"${0}"]) for g in range(8)])
        assert not np.allclose(got, ref[:8], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- offline sm_90 compile
def _compile_sm90(cfg, n=14336, k=4096, even=True):
    """The kernel compiled for sm_90 without a GPU (skipped when this Triton cannot); returns its PTX."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource
    except ImportError as e:  # pragma: no cover - depends on the installed Triton
        pytest.skip(f"this Triton cannot compile Gluon offline: {e}")
    nb = -(-k // 128)
    fn = T.dequant_gemv_mma
    vals = {"x32": torch.zeros(1, k // 2, dtype=torch.int32), "codes": torch.zeros(n, nb * 16, dtype=torch.int32),
            "scales": torch.zeros(n, nb, dtype=torch.bfloat16), "zeros": torch.zeros(n, nb, dtype=torch.uint8),
            "bias": torch.zeros(n, dtype=torch.bfloat16), "out": torch.zeros(1, n, dtype=torch.bfloat16), "N": n,
            "NB": nb, "KX": k // 2, "s_xm": k // 2, "s_cn": nb * 16, "s_sn": nb, "s_zn": nb, "s_om": n,
            "QW": cfg["QW"], "BF16": True, "HAS_BIAS": False, "EVEN": even, "PREFETCH": cfg["PREFETCH"],
            "WAIT": bool(cfg["WAIT"]), "num_warps": cfg["num_warps"], "AUX": bool(cfg.get("AUX", True)),
            "ADJ": bool(cfg.get("ADJ", False))}
    types = {torch.bfloat16: "bf16", torch.uint8: "u8", torch.int32: "i32"}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = vals[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + types[v.dtype], [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    ck = triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg["num_warps"]})
    return ck.asm["ptx"]


@pytest.mark.parametrize("cfg", [dict(qm.DEFAULT_CONFIG), dict(qm.DEFAULT_CONFIG, PREFETCH=2, AUX=False),
                                 dict(qm.DEFAULT_CONFIG, QW=2, ADJ=True, num_warps=8, PREFETCH=1)])
def test_kernel_compiles_for_sm90_with_codes_before_the_wait(cfg):
    ptx = _compile_sm90(cfg)
    mma = re.findall(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", ptx)
    # the loop is unrolled by PREFETCH: 8 mma per group, QW groups per warp and step
    assert len(mma) == 8 * cfg["QW"] * cfg["PREFETCH"]
    wait = ptx.index("griddepcontrol.wait")
    assert ptx.index("griddepcontrol.launch_dependents") > wait
    before = re.findall(r"ld\.global[^;]*\.v4\.b32", ptx[:wait])
    # the first PREFETCH steps' code words of rows g and g + 8 (one 16-byte load each per group), nothing else
    assert len(before) == 2 * cfg["QW"] * cfg["PREFETCH"]
    assert not re.findall(r"ld\.global\S*\.(?:u8|b8|u16|b16)", ptx[:wait])  # no zero point / scale yet
    assert "griddepcontrol" not in _compile_sm90(dict(cfg, WAIT=False))


def test_kernel_compiles_for_the_masked_shapes():
    ptx = _compile_sm90(dict(qm.DEFAULT_CONFIG), n=4104, k=1160, even=False)
    assert "mma.sync.aligned.m16n8k16" in ptx


# ------------------------------------------------------------------------------------ selection and fallbacks
def test_config_selection():
    first = ql.gemv_configs(1, 14336, 4096, FMT, interpreted=False)[0]
    assert first.get("MMA") and first == qm.DEFAULT_CONFIG
    qm.check_config(first)
    assert ql.gemv_configs(4, 8192, 4096, FMT, interpreted=False)[0].get("MMA")
    assert ql.gemv_configs(2, 8192, 4096, FMT, interpreted=False)[0].get("MMA")
    assert ql.gemv_configs(1, 32000, 2048, FMT, interpreted=False)[0].get("MMA")
    for m, n, k, fmt in [(1, 4096, 4096, FMT), (1, 8192, 4096, FMT), (1, 4096, 14336, FMT), (1, 14336, 8192, FMT),
                         (1, 14336, 4096, "w4a16_g64"),
                         (1, 14336, 4096, "w8a16"), (1, 14336, 4096, "nvint4"), (5, 14336, 4096, FMT)]:
        assert not any(c.get("MMA") for c in ql.gemv_configs(m, n, k, fmt, interpreted=False)), (m, n, k, fmt)
    assert not any(c.get("MMA") for c in ql.gemv_configs(1, 14336, 4096, FMT, interpreted=True))
    for bad in ({"num_warps": 3}, {"QW": 3}, {"PREFETCH": 5}):
        with pytest.raises(ValueError, match="MMA configs"):
            qm.check_config(dict(qm.DEFAULT_CONFIG, **bad))


def test_why_not_reasons():
    kf = ql.kernel_format(FMT)
    q = quantize(torch.randn(32, 256) * 0.02, FMT)
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert "CUDA" in qm.why_not(kf, x, q.codes, q.scales, q.zeros)
    assert "w4a16_g128" in qm.why_not(ql.kernel_format("w4a16_g64"), x, q.codes, q.scales, q.zeros)
    assert "bf16 / fp16" in qm.why_not(kf, x.float(), q.codes, q.scales, q.zeros)
    assert "multiple of 8" in qm.why_not(kf, torch.randn(1, 252).to(torch.bfloat16), q.codes, q.scales, q.zeros)
    assert "bf16" in qm.why_not(kf, x, q.codes, q.scales.float(), q.zeros)
    wide = torch.randn(1, 260).to(torch.bfloat16)[:, 2:258]  # a row not 16-byte aligned
    assert "aligned" in qm.why_not(kf, wide, q.codes, q.scales, q.zeros)


def test_mma_config_falls_back_on_cpu_tensors():
    # an MMA config asked for on CPU tensors runs the next config (the interpreter's tile) and records why
    n, k = 40, 1000
    q = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02, FMT)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    qm.SKIPPED.clear()
    y = ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, None, None, FMT, k, config=dict(qm.DEFAULT_CONFIG))
    ref = ql.reference(x, q.codes, q.scales, q.zeros, None, None, FMT, k)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert "CUDA" in qm.SKIPPED[(FMT, 3, n, k, "cpu")]


def test_run_returns_a_compile_error_as_a_reason(monkeypatch):
    # a Gluon compile error (an API this Triton lacks) comes back as the reason to record and fall back on
    from triton.compiler.errors import CompilationError

    def broken(*args, **kwargs):
        raise CompilationError("src", None, "no such Gluon op")
    monkeypatch.setattr(qm, "launch", broken)
    why = qm.run(None, None, None, None, None, None, dict(qm.DEFAULT_CONFIG), False)
    assert why is not None and "did not compile" in why


# ------------------------------------------------------------------------------------------------------ GPU
def _cuda_sm80():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


CONFIGS = [dict(qm.DEFAULT_CONFIG), dict(qm.DEFAULT_CONFIG, PREFETCH=2, AUX=False),
           dict(qm.DEFAULT_CONFIG, QW=2, ADJ=True, num_warps=8, PREFETCH=3),
           dict(qm.DEFAULT_CONFIG, WAIT=False, num_warps=2, PREFETCH=4)]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_sm80(), reason="needs an sm_80+ GPU")
def test_gpu_mma_gemv_against_the_reference():
    # every config kind at EVEN shapes (N % 16 == 0, whole steps, K = 128 * groups) and masked ones (N, K tails, a
    # partial last step), bf16 / fp16 x, M = 1..4, a bias; the fp32 reference of the same quantized weights
    cases = [(14336, 4096, 1, torch.bfloat16, False), (1000, 3000, 3, torch.bfloat16, True),
             (4104, 1160, 4, torch.float16, True), (48, 1024, 2, torch.bfloat16, True), (8192, 640, 1, torch.float16, False)]
    for i, (n, k, m, dt, has_bias) in enumerate(cases):
        g = torch.Generator(device="cuda").manual_seed(i)
        q = quantize(torch.randn(n, k, device="cuda", generator=g) * 0.02, FMT)
        # x as a strided view (rows k + 64 apart) for M > 1
        x = torch.randn(m, k + 64, device="cuda", generator=g).to(dt)[:, :k] if m > 1 else \
            torch.randn(m, k, device="cuda", generator=g).to(dt)
        bias = torch.randn(n, device="cuda", generator=g).to(dt) if has_bias else None
        ref = ql.reference(x, q.codes, q.scales, q.zeros, None, bias, FMT, k)
        for cfg in CONFIGS:
            qm.SKIPPED.clear()
            y = ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, None, bias, FMT, k, config=dict(cfg))
            assert not qm.SKIPPED, (n, k, m, cfg, qm.SKIPPED)  # the MMA kernel ran, not a fallback
            assert _rel(y, ref) < 5e-3, (n, k, m, dt, cfg)
    # an explicit K split is not the MMA GEMV's: the next config runs, the reason recorded
    qm.SKIPPED.clear()
    y = ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, None, None, FMT, k, config=dict(qm.DEFAULT_CONFIG),
                              split_k=2)
    assert "K splits" in qm.SKIPPED[(FMT, 1, 8192, 640, "cuda")]
    assert _rel(y, ql.reference(x, q.codes, q.scales, q.zeros, None, None, FMT, k)) < 5e-3
    qm.SKIPPED.clear()
    ql.FALLBACKS.clear()
    q = quantize(torch.randn(14336, 4096, device="cuda") * 0.02, FMT)
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    y = ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, None, None, FMT, 4096)  # the default dispatch
    assert _rel(y, ql.reference(x, q.codes, q.scales, q.zeros, None, None, FMT, 4096)) < 5e-3
    assert not qm.SKIPPED and not ql.FALLBACKS


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs an sm_90 GPU (PDL)")
def test_gpu_mma_gemv_pdl_chain_in_a_cuda_graph():
    # six dependent layers x_{i+1} = y_i[:, :K] in one CUDA graph, each MMA GEMV launched with PDL and its first code
    # words read before griddepcontrol.wait: a fresh x0 before every replay, bit-identical to the chain run eagerly
    # with PDL off
    n, k = 8192, 4096
    qs = [quantize(torch.randn(n, k, device="cuda") * 0.02, FMT) for _ in range(6)]
    x0 = torch.empty(1, k, device="cuda", dtype=torch.bfloat16)

    def chain(cfg):
        xi = x0
        for q in qs:
            xi = ql.quant_linear_apply(xi, q.codes, q.scales, q.zeros, None, None, FMT, k, config=dict(cfg))[:, :k]
        return xi
    cfg = dict(qm.DEFAULT_CONFIG)
    x0.copy_(torch.randn(1, k, device="cuda"))
    chain(cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(cfg)
    for rep in range(3):
        x0.copy_(torch.randn(1, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(rep)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, chain(dict(cfg, PDL=False, WAIT=False))), rep
