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
# whole-tile epilogue; two column halves; then the TMA store (32- and 64-wide tiles in 1, 2 and 4
# column slices, 1 and 2 programs per "SM"); (BM, BN, BK, W, S, flatten, slices, CTAs/SM, TMA store)
STORE_CFGS = [SMALL_CFG, (*SMALL_CFG, True, 2), (*SMALL_CFG, True, 1, 1, True), (32, 64, 16, 4, 1, True, 2, 2, True),
              (32, 64, 16, 4, 1, False, 4, 1, True)]
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
    for cfg in STORE_CFGS:
        c.executor.force_tma = cfg
        out = c(x.to(dtype))
        assert rel_err(out, ref) < TOL[dtype], cfg
    assert len(calls) == 2 * len(STORE_CFGS), "both matmuls must run through the TMA twin"


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


def test_tma_store_output_refusal_reasons():
    h = torch.float16
    assert autotune.tma_store_refusal(torch.empty(2, 37, 40, dtype=h), 74, 40) is None  # leading dims flatten to M
    assert "16 bytes" in autotune.tma_store_refusal(torch.empty(74, 36, dtype=h), 74, 36)  # 72 B rows
    assert "contiguous" in autotune.tma_store_refusal(torch.empty(40, 74, dtype=h).t(), 74, 40)
    assert "aligned" in autotune.tma_store_refusal(torch.empty(74 * 40 + 1, dtype=h)[1:].view(74, 40), 74, 40)
    assert "dtype" in autotune.tma_store_refusal(torch.empty(74, 40, dtype=torch.bool), 74, 40)
    assert "rows" in autotune.tma_store_refusal(torch.empty(74, 48, dtype=h), 74, 40)
    assert autotune.tma_store_refusal(None, 74, 40) is not None


class _FakeKernel:
    """Records a launch instead of running it: (grid, args, kwargs)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.launches.append((grid, a, kw))


def test_tma_launch_store_descriptor_grid_and_fallback():
    h = torch.float16
    a, w = torch.randn(300, 64, dtype=h), torch.randn(96, 64, dtype=h)
    k = _FakeKernel()
    cfg = (128, 32, 64, 8, 3, True, 2, 2, True)
    assert autotune.tma_name(cfg) == "tma_128x32x64x8x3_e2_c2_ts"
    autotune.tma_launch(k, a, w.t(), [], [300, 96, 64], [], cfg, num_sms=4, out=torch.empty(300, 96, dtype=h))
    grid, args, kw = k.launches[-1]
    assert kw["OUT_TMA"] and args[2].block_shape == [128, 16] and kw["EPI_N"] == 16
    assert kw["NUM_SMS"] == 8 and grid == (8,), "two programs per SM: 8 programs for 3 x 3 tiles on 4 SMs"
    autotune.tma_launch(k, a, w.t(), [], [300, 96, 64], [], cfg, num_sms=100, out=torch.empty(300, 96, dtype=h))
    assert k.launches[-1][0] == (9,) and k.launches[-1][2]["NUM_SMS"] == 200, "grid: at most #tiles; stride: a constant"
    # an output TMA cannot store (row-major 96-wide rows transposed): plain stores, same launch otherwise
    autotune.tma_launch(k, a, w.t(), [], [300, 96, 64], [], cfg, num_sms=4, out=torch.empty(96, 300, dtype=h).t())
    assert k.launches[-1][2]["OUT_TMA"] is False and k.launches[-1][1][2] is None
    autotune.tma_launch(k, a, w.t(), [], [300, 96, 64], [], (128, 128, 64, 8, 4), num_sms=4, out=torch.empty(300, 96, dtype=h))
    assert k.launches[-1][2]["OUT_TMA"] is False and k.launches[-1][2]["EPI_SPLIT"] == 1, "no TMA store unless asked"
    # full-tile epilogue operands (ptrs indices 2 and 3): a row-major M x N one gets a descriptor (bit 0 of
    # IN_TMA), a broadcast one ([100, 96] over 3 x 100 rows) keeps its plain loads; none without the TMA store
    res, bcast, out = torch.randn(3, 100, 96, dtype=h), torch.randn(100, 96, dtype=h), torch.empty(300, 96, dtype=h)
    ptrs = [a, w, res, bcast, out]
    autotune.tma_launch(k, a, w.t(), ptrs, [300, 96, 64], [], cfg, num_sms=4, out=out, tile_loads=[2, 3])
    grid, args, kw = k.launches[-1]
    assert kw["IN_TMA"] == 1 and args[3].block_shape == [128, 16] and args[4] is None
    assert all(x is y for x, y in zip(args[5:], ptrs)) and args[10:] == (300, 96, 64)
    autotune.tma_launch(k, a, w.t(), ptrs, [300, 96, 64], [], cfg[:5], num_sms=4, out=out, tile_loads=[2, 3])
    assert k.launches[-1][2]["IN_TMA"] == 0


def test_tma_store_refused_output_keeps_plain_stores(monkeypatch):
    torch.manual_seed(0)
    h = torch.float16
    x, w, b = torch.randn(50, 40, dtype=h), torch.randn(36, 40, dtype=h), torch.randn(36, dtype=h)  # 72 B output rows
    c = fxforge.compile(lambda_module(lambda x, w, b: F.gelu(F.linear(x, w, b))), (x, w, b))
    calls = _count_tma(monkeypatch)
    c.executor.force_tma = (32, 32, 16, 4, 1, True, 2, 2, True)
    out = c(x, w, b)
    assert len(calls) == 1
    assert rel_err(out, F.gelu(F.linear(x.double(), w.double(), b.double()))) < TOL[h]


@pytest.mark.parametrize("batch_broadcast", [False, True], ids=["tile_operand", "broadcast_operand"])
def test_tma_full_tile_operand_loads(batch_broadcast, monkeypatch):
    """SiLU(x @ wᵀ) * u: u is a full-tile epilogue operand, loaded through a descriptor with the TMA store
    when it is a row-major M x N matrix, and with plain masked loads when it broadcasts over the batch."""
    torch.manual_seed(0)
    h = torch.float16
    x, w = torch.randn(2, 25, 40, dtype=h), torch.randn(48, 40, dtype=h)
    u = torch.randn(*((25,) if batch_broadcast else (2, 25)), 48, dtype=h)
    c = fxforge.compile(lambda_module(lambda x, w, u: F.silu(x @ w.t()) * u), (x, w, u))
    st = next(s for s in c.program.steps if getattr(s, "kind", None) == "matmul")
    assert len(st.launch["tma_tile_loads"]) == 1
    calls = _count_tma(monkeypatch)
    for cfg in ((32, 32, 16, 4, 1, True, 2, 2, True), (32, 64, 16, 4, 1, True, 4, 1, True), SMALL_CFG):
        c.executor.force_tma = cfg
        out = c(x, w, u)
        assert rel_err(out, F.silu(x.double() @ w.double().t()) * u.double()) < TOL[h], cfg
    assert len(calls) == 3


def test_tma_configs_are_pruned_and_short():
    fast = autotune.tma_configs(12608, 3072, 768, fast=True, epilogue=True)
    # the measured-best fc1 config (probe 2): 2 CTAs/SM, 4 epilogue slices
    assert len(fast) == 1 and autotune.tma_fields(fast[0])[7] == 2 and autotune.tma_fields(fast[0])[6] == 4
    assert all(autotune.tma_fields(c)[8] for c in fast), "fast mode: TMA-store configs"
    assert autotune.tma_configs(12608, 3072, 768, fast=True, epilogue=False) == []  # bare: cuBLAS
    assert len(autotune.tma_configs(12608, 3072, 768, fast=False, epilogue=False)) > 1
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


_SM90_COMPILE = r"""
import inspect, json, os, re, subprocess, sys, tempfile
import torch, torch.nn as nn, torch.nn.functional as F
import fxforge, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from fxforge.runtime.autotune import tma_fields
from fxforge.runtime.kernels import load_kernel

cfg, cache = json.loads(sys.argv[1]), sys.argv[2]
class M(nn.Module):
    def forward(self, x, w, b):
        return F.gelu(F.linear(x, w, b))
h = torch.float16
x, w, b = torch.randn(70, 64, dtype=h), torch.randn(40, 64, dtype=h), torch.randn(40, dtype=h)
k = next(iter(fxforge.compile(M(), (x, w, b)).program.kernels.values()))
fn = load_kernel(k["entry"] + "_tma", k["source"], "sm90_aot", cache)
jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)
bm, bn, bk, warps, stages, flat, split, ctas, store = tma_fields(cfg)
split = split or (2 if bm * bn // (32 * warps) >= 128 else 1)
consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "NUM_SMS": 132 * ctas, "A_T": False, "B_T": True,
          "FLATTEN": flat, "EPI_SPLIT": split, "EPI_N": bn // split, "OUT_TMA": store, "INTERPRETED": False}
if not store:
    consts["c_desc"] = None
params = list(inspect.signature(jit.fn).parameters)
sig = {p: "constexpr" if p in consts else f"tensordesc<fp16[{bm}, {bk}]>" if p == "a_desc" else
       f"tensordesc<fp16[{bn}, {bk}]>" if p == "b_desc" else f"tensordesc<fp16[{bm}, {bn // split}]>" if p == "c_desc" else
       "*fp16" if p.startswith(("in", "out")) and "_s" not in p else "i32" for p in params}
src = ASTSource(jit, sig, {(params.index(p),): v for p, v in consts.items()})
ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(ck.asm["cubin"])
    f.flush()
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
ptx = ck.asm["ptx"]
print(json.dumps({"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": ck.metadata.shared,
                  "wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx}))
"""


@pytest.mark.parametrize("cfg", autotune.TMA_CONFIGS[:3], ids=autotune.tma_name)
def test_tma_twin_compiles_for_sm90_without_spills(cfg, tmp_path):
    """Compile the fc1 kernel's TMA twin (bias + erf-GELU) for sm_90 on the CPU (Triton's bundled ptxas;
    no GPU; a subprocess without the interpreter) at the first autotune configs: it must lower to
    wgmma + TMA, must not spill, and a 2-CTA/SM config must leave room for two CTAs per SM
    (<= 65536 / (2 x threads) registers, <= 113 KB of shared memory)."""
    import json
    import os
    import subprocess
    import sys

    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(tools, "ptxas")) or not os.path.exists(os.path.join(tools, "cuobjdump")):
        pytest.skip("Triton's bundled ptxas/cuobjdump are not installed")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    run = subprocess.run([sys.executable, "-c", _SM90_COMPILE, json.dumps(list(cfg)), str(tmp_path / "kernels")],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    st = json.loads(run.stdout.strip().splitlines()[-1])
    assert st["wgmma"] and st["tma"] and st["stack"] == 0, st
    _, _, _, warps, _, _, _, ctas, _ = autotune.tma_fields(cfg)
    if ctas == 2:
        assert st["regs"] * 32 * warps * 2 <= 65536 and st["smem"] <= 113 * 1024, st
