"""The Hopper TMA matmul twin (codegen/emit_matmul_tma.py): numerics in Triton's interpreter against
float64 at irregular shapes with the fused epilogues, the alignment refusal, and the epilogue policy
(which matmul groups keep their epilogue on CUDA). GPU tests (marked ``gpu``) compare against torch
at the ViT-B/16 shapes on sm_90+."""
import fxforge  # first: sets up Triton's interpreter without CUDA
import pytest
import torch
import torch.nn.functional as F
from fxforge.debug import rel_err
from fxforge.runtime import autotune
from torch import nn

SMALL_CFG = (32, 32, 16, 4, 1)  # small tiles: several tiles per program (3 "SMs"), partial M/N/K tiles
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


class Mlp(nn.Module):
    """fc1 + bias + GELU(erf), fc2 + bias + residual: the ViT MLP's epilogues."""

    def __init__(self, d=40, h=72):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))) + x


def _count_tma(monkeypatch) -> list:
    calls = []
    real = autotune.tma_launch

    def spy(*a, **k):
        calls.append(a[6])
        return real(*a, **k)
    monkeypatch.setattr(autotune, "tma_launch", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_tma_twin_matches_float64_with_fused_epilogues(dtype, monkeypatch):
    torch.manual_seed(0)
    m, x = Mlp().eval(), torch.randn(2, 37, 40)  # M = 74, N = 72 / 40, K = 40 / 72: none a tile multiple
    c = fxforge.compile(m.to(dtype), (x.to(dtype),))  # CPU: every epilogue fuses into its matmul
    assert c.report.kernel_kinds() == {"matmul": 2}
    assert all("_tma(a_desc, b_desc" in src for src in c.kernel_sources.values())
    calls = _count_tma(monkeypatch)
    ref = m.double()(x.double())
    for cfg in (SMALL_CFG, (*SMALL_CFG, True, 2)):  # whole-tile epilogue, then in two column halves
        c.executor.force_tma = cfg
        out = c(x.to(dtype))
        assert rel_err(out, ref) < TOL[dtype], cfg
    assert len(calls) == 4, "both matmuls must run through the TMA twin"


def test_tma_twin_transposed_a_and_row_major_b(monkeypatch):
    torch.manual_seed(0)
    a, b, r = torch.randn(24, 52), torch.randn(24, 36), torch.randn(52, 36)  # A = a.T: column-major
    c = fxforge.compile(lambda_module(lambda a, b, r: torch.sigmoid(a.t() @ b) * r), (a, b, r))
    calls = _count_tma(monkeypatch)
    # a 6th entry: the persistent loop nest not flattened; a 7th: the epilogue in two column halves
    c.executor.force_tma = (*SMALL_CFG, False, 2)
    assert autotune.tma_name(c.executor.force_tma) == "tma_32x32x16x4x1_nf_e2"
    out = c(a, b, r)
    assert len(calls) == 1
    assert rel_err(out, torch.sigmoid(a.double().t() @ b.double()) * r.double()) < 1e-6


def lambda_module(fn):
    class M(nn.Module):
        def forward(self, *a):
            return fn(*a)
    return M()


def test_alignment_refusal_reasons():
    h = torch.float16
    ok = torch.randn(64, 48, dtype=h)
    w = torch.randn(40, 48, dtype=h).t()  # a linear's weight: column-major B
    assert autotune.tma_refusal(ok, w, 1, 64) is None
    odd = torch.randn(64, 33, dtype=h)  # row stride 66 B
    assert "16 bytes" in autotune.tma_refusal(odd, torch.randn(33, 40, dtype=h), 1, 64)
    shifted = torch.randn(64 * 48 + 1, dtype=h)[1:].view(64, 48)  # base 2 B past an aligned one
    assert "aligned" in autotune.tma_refusal(shifted, w, 1, 64)
    assert "unit stride" in autotune.tma_refusal(torch.randn(64, 96, dtype=h)[:, ::2], w, 1, 64)
    assert "bmm" in autotune.tma_refusal(ok, w, 2, 64)
    assert "GEMV" in autotune.tma_refusal(ok[:4], w, 1, 4)
    assert "dtype" in autotune.tma_refusal(ok.float(), w.float(), 1, 64)


def test_refused_matmul_falls_back_to_the_regular_kernel(monkeypatch):
    torch.manual_seed(0)
    x, w, b = torch.randn(20, 33), torch.randn(17, 33), torch.randn(17)  # K = 33 fp32: 132 B rows
    c = fxforge.compile(lambda_module(lambda x, w, b: F.silu(F.linear(x, w, b))), (x, w, b))
    calls = _count_tma(monkeypatch)
    c.executor.force_tma = SMALL_CFG
    out = c(x, w, b)
    assert calls == []
    assert rel_err(out, F.silu(F.linear(x.double(), w.double(), b.double()))) < 1e-6


def test_tma_configs_are_pruned_and_short():
    fast = autotune.tma_configs(12608, 3072, 768, fast=True, epilogue=True)
    assert len(fast) == 2 and fast[0][:2] == (128, 256)
    assert len(autotune.tma_configs(12608, 3072, 768, fast=True, epilogue=False)) == 1
    assert autotune.tma_configs(12608, 768, 3072, fast=True, epilogue=True)[0][1] == 128  # N = 768: narrow first
    assert all(c[0] <= 64 for c in autotune.tma_configs(48, 768, 768, fast=False, epilogue=True))


def vit_mlp_groups(policy):
    """The fusion groups of a pre-norm ViT MLP block (LN -> fc1+GELU -> fc2 + residual -> LN)."""
    from fxforge.capture import export_graph
    from fxforge.codegen.fusion import fuse_graph
    from fxforge.config import Config
    from fxforge.pipeline import Pipeline

    class Block(nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.ln1, self.mlp, self.ln2 = nn.LayerNorm(d), Mlp(d, 64), nn.LayerNorm(d)

        def forward(self, x):
            return self.ln2(self.mlp(self.ln1(x)))
    cap = export_graph(Block().eval(), (torch.randn(2, 5, 32),))
    Pipeline.from_names(Config().passes, Config()).run(cap.gm, None, None)
    groups, _ = fuse_graph(cap.gm, defer_epilogues=policy)
    return [g for g in groups if g.kind == "matmul"], [g for g in groups if g.kind != "matmul"]


def _has(g, name):
    return any(name in str(n.target) for n in g.nodes)


def test_epilogue_policy_defers_only_what_a_norm_absorbs():
    mms, others = vit_mlp_groups("norm")  # matmul_epilogue="auto" on CUDA
    fc1, fc2 = mms
    assert _has(fc1, "erf"), "bias+GELU feeds fc2 (a matmul): deferring buys nothing, so it stays fused"
    assert not any(_has(g, "add.Tensor") for g in [fc2]), "the residual add feeds LayerNorm: deferred"
    assert any(_has(g, "add.Tensor") and g.kind == "reduction" for g in others), "and fused as its prologue"
    assert not any(g.kind == "pointwise" for g in others), "no stand-alone epilogue kernel is left"
    deferred, _ = vit_mlp_groups("defer")
    assert not _has(deferred[0], "erf")
    fused, _ = vit_mlp_groups("fuse")
    assert _has(fused[1], "add.Tensor")


# ---- GPU (sm_90+): the ViT-B/16 shapes, batch 64, fp16 -----------------------------------------------
VIT = {"qkv": (768, 2304, False), "proj": (768, 768, True), "fc1": (768, 3072, False), "fc2": (3072, 768, True)}


@pytest.mark.parametrize("name", list(VIT))
@pytest.mark.parametrize("cfg", autotune.TMA_CONFIGS[:2], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.gpu
def test_tma_twin_vit_shapes_on_cuda(name, cfg, monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm_90+ GPU")
    torch.manual_seed(0)
    k, n, residual = VIT[name]
    lin = nn.Linear(k, n).cuda().half()
    x = torch.randn(64, 197, k, device="cuda", dtype=torch.float16)
    r = torch.randn(64, 197, n, device="cuda", dtype=torch.float16)

    def fn(x, r, lin=lin):  # proj/fc2: bias + residual; qkv/fc1: bias + GELU (r unused but an input)
        y = F.linear(x, lin.weight.to(x.dtype), lin.bias.to(x.dtype))
        return y + r if residual else F.gelu(y) + 0 * r
    c = fxforge.compile(lambda_module(fn), (x, r), config=fxforge.Config(autotune="off", cuda_graphs="off"))
    calls = _count_tma(monkeypatch)
    c.executor.force_tma = cfg
    with torch.no_grad():
        out = c(x, r)
        ref = fn(x.double(), r.double())
        eager_err = rel_err(fn(x, r), ref)
    assert len(calls) == 1
    assert rel_err(out, ref) <= max(2 * eager_err, 1e-3)


@pytest.mark.gpu
def test_autotune_offers_tma_and_reports_the_winner():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm_90+ GPU")
    fc1 = nn.Linear(768, 3072).cuda().half()
    fc2 = nn.Linear(3072, 768).cuda().half()
    x = torch.randn(64, 197, 768, device="cuda", dtype=torch.float16)
    c = fxforge.compile(lambda_module(lambda x: fc2(F.gelu(fc1(x)))), (x,), config=fxforge.Config(autotune="fast"))
    assert c.report.kernel_kinds() == {"matmul": 2}, "auto on CUDA: GELU stays fc1's epilogue"
    with torch.no_grad():
        out = c(x)
        assert rel_err(out, fc2(F.gelu(fc1(x)))) < 1e-2
    fc1_entry = c.report.autotune[0]
    assert any(k.startswith("tma_") for k in fc1_entry["ms"]) and "cublas" in fc1_entry["ms"], fc1_entry


def test_tma_twin_compiles_for_sm90_without_spills():
    """Compile the fc1 kernel's TMA twin for sm_90 on the CPU (Triton's bundled ptxas; no GPU) at the
    first autotune config: it must lower to wgmma + TMA loads, and the split epilogue must not spill."""
    import inspect
    import os
    import subprocess
    import tempfile

    import triton
    from fxforge.runtime.kernels import load_kernel

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(tools, "ptxas")) or not os.path.exists(os.path.join(tools, "cuobjdump")):
        pytest.skip("Triton's bundled ptxas/cuobjdump are not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    h = torch.float16
    x, w, b = torch.randn(70, 64, dtype=h), torch.randn(40, 64, dtype=h), torch.randn(40, dtype=h)
    c = fxforge.compile(lambda_module(lambda x, w, b: F.gelu(F.linear(x, w, b))), (x, w, b))
    k = next(iter(c.program.kernels.values()))
    fn = load_kernel(k["entry"] + "_tma", k["source"], "cpu", c.config.cache_dir, c.config.cache_id())
    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)
    bm, bn, bk, warps, stages = autotune.TMA_CONFIGS[0]
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "NUM_SMS": 132, "A_T": False, "B_T": True,
              "FLATTEN": True, "EPI_SPLIT": 2, "EPI_N": bn // 2, "INTERPRETED": False}
    params = list(inspect.signature(jit.fn).parameters)
    sig = {p: "constexpr" if p in consts else f"tensordesc<fp16[{bm}, {bk}]>" if p == "a_desc" else
           f"tensordesc<fp16[{bn}, {bk}]>" if p == "b_desc" else "*fp16" if p.startswith(("in", "out")) and "_s" not in p
           else "i32" for p in params}
    src = ASTSource(jit, sig, {(params.index(p),): v for p, v in consts.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = ck.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    assert "STACK:0 " in usage, usage
