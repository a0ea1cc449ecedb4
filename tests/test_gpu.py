"""GPU checks (skipped without CUDA): the same kernels compiled for the device, against float64."""
import fxforge  # noqa: F401
import pytest
import torch
from fxforge.debug import rel_err
from fxforge.models import BUILTIN_MODELS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# fp32 matmuls use IEEE dots (no TF32), so fp32 stays tight; half types are judged against eager's own error.
@pytest.fixture(autouse=True)
def _no_autotune_unless_asked(request, monkeypatch):
    # Autotuning compiles several configs per matmul: keep it to the test that checks it.
    if "autotune" not in request.node.name:
        monkeypatch.setenv("FXFORGE_AUTOTUNE", "0")


FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_models_on_cuda(name, dtype):
    b = BUILTIN_MODELS[name]
    model = b.factory(0).cuda().to(dtype)
    x = b.example_inputs(2, "cuda", dtype)
    ref = b.factory(0).double()(*[t.cpu().double() if t.is_floating_point() else t.cpu() for t in x])
    with torch.no_grad():
        eager_err = rel_err(model(*x), ref)
        aot = fxforge.compile(model, x)
        assert rel_err(aot(*x), ref) <= max(2 * eager_err, FLOOR[dtype])
        torch._dynamo.reset()
        jit = torch.compile(model, backend="fxforge")
        assert rel_err(jit(*x), ref) <= max(2 * eager_err, FLOOR[dtype])


@pytest.mark.parametrize("m,n,k", [(1, 7, 33), (3, 100, 1000), (1, 4100, 2048), (33, 65, 7), (129, 257, 1000), (1000, 33, 65)])
def test_matmul_epilogue_irregular_on_cuda(m, n, k):
    a, w, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda"), torch.randn(n, device="cuda")

    class M(torch.nn.Module):
        def forward(self, a, w, b):
            return torch.nn.functional.gelu(torch.nn.functional.linear(a, w, b)) + 1
    c = fxforge.compile(M(), (a, w, b), config=fxforge.Config(matmul_epilogue="fuse"))
    assert c.report.kernel_kinds() == {"matmul": 1}
    # auto on CUDA: GELU + 1 feeds no reduction, so it stays fused (autotune: TMA with the epilogue
    # vs cuBLAS + an epilogue launch); only epilogues a following norm/softmax absorbs are deferred
    d = fxforge.compile(M(), (a, w, b))
    assert d.report.kernel_kinds() == {"matmul": 1}
    assert torch.allclose(d(a, w, b), c(a, w, b), rtol=1e-4, atol=1e-4)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(a.double(), w.double(), b.double())) + 1
    assert rel_err(c(a, w, b), ref) < 1e-5


def test_artifact_roundtrip_on_cuda(tmp_path):
    b = BUILTIN_MODELS["vit_block"]
    model, x = b.factory(0).cuda().half(), b.example_inputs(2, "cuda", torch.float16)
    c = fxforge.compile(model, x)
    loaded = fxforge.load(fxforge.save(c, tmp_path / "a"))
    assert torch.equal(loaded(*x), c(*x))


def test_cuda_graph_replay_and_autotune_report():
    b = BUILTIN_MODELS["mlp"]
    model = b.factory(0).cuda().half()
    x = b.example_inputs(8, "cuda", torch.float16)
    c = fxforge.compile(model, x)
    first = c(*x)
    assert c.report.cuda_graph == "captured", c.report.cuda_graph
    assert c.report.autotune and all(t["winner"] for t in c.report.autotune)
    y = (torch.randn_like(x[0]),)
    out_y = c(*y)
    assert torch.equal(c(*x), first), "replay must reproduce the first (non-graph) run"
    with torch.no_grad():
        assert rel_err(out_y, model(*y)) < 1e-2
    assert not torch.equal(out_y, first), "returned outputs must not alias the graph's static buffers"
    off = fxforge.compile(model, x, config=fxforge.Config(cuda_graphs="off", autotune=False))
    assert torch.allclose(off(*x), first, atol=1e-2, rtol=1e-2) and off.report.cuda_graph == ""


def test_winograd_pass_on_cuda():
    from fxforge.config import DEFAULT_PASSES
    b = BUILTIN_MODELS["cnn"]
    model, x = b.factory(0).cuda().half(), b.example_inputs(2, "cuda", torch.float16)
    c = fxforge.compile(model, x, passes=list(DEFAULT_PASSES) + ["winograd_conv", "dce"])
    assert c.report.library_calls == 2
    ref = b.factory(0).double()(x[0].cpu().double())
    with torch.no_grad():
        eager_err = rel_err(model(*x), ref)
    # F(4,3) in fp16 measured ~4.5x direct's error on a VGG layer (benchmarks/results/winograd_gpu.md)
    assert rel_err(c(*x), ref) <= max(6 * eager_err, 5e-3)


def test_kv_cache_decode_steps_on_cuda_with_graphs():
    """The static-cache decode step: in-place cache updates, GEMV matmuls, CUDA-graph replay, over
    several positions, against eager on an identical copy (bf16)."""
    import copy

    from fxforge.models import KVCacheLlama, TinyLlama

    torch.manual_seed(0)
    model = KVCacheLlama(TinyLlama(dim=128, n_heads=8, n_kv_heads=2, ffn_dim=344), batch=1, max_seq=64).cuda().bfloat16().eval()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 12), device="cuda")
    with torch.no_grad():
        compiled = fxforge.compile(model, (ids[:, :1], torch.tensor([0], device="cuda")))
        model.reset()
        ref.reset()
        for i in range(12):
            pos = torch.tensor([i], device="cuda")
            a, b = compiled(ids[:, i:i + 1], pos), ref(ids[:, i:i + 1], pos)
            assert rel_err(a, b) < 2e-2, i
    assert compiled.report.cuda_graph == "captured"
    assert rel_err(model.k_cache0, ref.k_cache0) < 1e-2
