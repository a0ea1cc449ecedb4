"""End-to-end model tests: built-in models and small random-config HF transformers models through
both front doors (AOT ``fxforge.compile`` and JIT ``torch.compile(backend="fxforge")``), checked
against a float64 reference of the same weights, plus the fusion contract of the built-in blocks.

Runs on the CPU through Triton's interpreter (``import fxforge`` selects it when there is no CUDA,
so fxforge is imported before anything that imports triton).
"""
from __future__ import annotations

import copy

import fxforge  # noqa: I001  (must precede triton: it picks the CPU interpreter)
import fxforge.backend as fx_backend
import pytest
import torch
from fxforge.debug import rel_err
from fxforge.models import BUILTIN_MODELS, get_builtin

# ---- tolerances -------------------------------------------------------------------------------
# float32: absolute bound on the relative-norm error against the float64 reference.
# bfloat16: at most ``eager_factor`` x the eager-bf16 model's own error against the float64
# reference, never below ``floor`` (tol = max(eager_factor * eager_err, floor)).
# NaN/Inf mismatches give rel_err == inf, so NaN never passes.
TOLERANCES = {
    torch.float32: {"rel": 1e-5},
    torch.bfloat16: {"eager_factor": 2.0, "floor": 2e-3},
}

#: Kernel counts by kind for the built-in blocks in float32 (both front doors). These are part of
#: the fusion contract: a change here must be deliberate.
EXPECTED_KERNEL_KINDS = {
    "vit_block": {"reduction": 2, "matmul": 4, "attention": 1},
    "llama_block": {"reduction": 2, "matmul": 7, "pointwise": 4, "attention": 1},  # RoPE: one kernel each for q, k
}
# AOT graphs hold weights as constants, so merge_linears makes q|k|v and gate|up one matmul each
# (and SiLU·up, no longer a matmul epilogue, one pointwise kernel).
EXPECTED_KERNEL_KINDS_AOT = {"llama_block": {"reduction": 2, "matmul": 4, "pointwise": 3, "attention": 1}}

KERNEL_KINDS = {"pointwise", "reduction", "matmul", "attention"}
DTYPES = [torch.float32, torch.bfloat16]
DOORS = ["aot", "jit"]
BATCH = 2


def _dtype_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def tolerance(dtype: torch.dtype, eager_err: float) -> float:
    t = TOLERANCES[dtype]
    if "rel" in t:
        return t["rel"]
    return max(t["eager_factor"] * eager_err, t["floor"])


def _to64(inputs):
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _cast(inputs, dtype):
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _check_report(report) -> None:
    """Structural invariants every compile report must satisfy."""
    assert report.num_kernels == len(report.kernels) == sum(report.kernel_kinds().values())
    for k in report.kernels:
        assert k["kind"] in KERNEL_KINDS, k
        assert isinstance(k["name"], str) and k["name"], k
        assert len(k["nodes"]) > 0, k
    for f in report.fallbacks:
        assert isinstance(f["reason"], str) and f["reason"].strip(), f
        assert isinstance(f["node"], str) and f["node"], f
        assert isinstance(f["op"], str) and f["op"], f


def run_door(door: str, model: torch.nn.Module, example_inputs: tuple, call_inputs: tuple):
    """Compile ``model`` through one front door and call it on ``call_inputs``.

    Returns (output, list of CompileReports produced by this compile)."""
    if door == "aot":
        compiled = fxforge.compile(model, example_inputs)
        out = compiled(*call_inputs)
        reports = [compiled.report]
    else:
        torch._dynamo.reset()
        n0 = len(fx_backend.reports)
        cm = torch.compile(model, backend="fxforge")
        with torch.no_grad():
            out = cm(*call_inputs)
        reports = list(fx_backend.reports[n0:])
        assert reports, "torch.compile(backend='fxforge') produced no compile report"
        for r in reports:  # under no_grad every graph must go through the inference compiler
            assert not any(f["reason"].startswith("training_graph") for f in r.fallbacks), r.fallbacks
    for r in reports:
        _check_report(r)
    assert sum(r.num_kernels for r in reports) > 0, "nothing was compiled to a Triton kernel"
    return out, reports


def assert_close(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype, what: str):
    assert isinstance(out, torch.Tensor), f"{what}: expected a tensor, got {type(out)}"
    assert out.shape == eager.shape, f"{what}: shape {tuple(out.shape)} != eager {tuple(eager.shape)}"
    assert out.dtype == eager.dtype, f"{what}: dtype {out.dtype} != eager {eager.dtype}"
    eager_err = rel_err(eager, ref64)
    err = rel_err(out, ref64)
    tol = tolerance(dtype, eager_err)
    assert err <= tol, f"{what}: rel err {err:.3g} > tol {tol:.3g} (eager {_dtype_id(dtype)} err {eager_err:.3g})"


# ---- 1. built-in models -----------------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_model_numerics(name, dtype, door):
    spec = get_builtin(name)
    model = spec.factory(0).to(dtype)
    ref = spec.factory(0).double()
    # Compile for seed-0 inputs, check on seed-1 inputs of the same shape: nothing about the
    # example inputs may be baked into the compiled program.
    example = spec.example_inputs(BATCH, "cpu", dtype, seed=0)
    inputs = spec.example_inputs(BATCH, "cpu", dtype, seed=1)
    with torch.no_grad():
        eager = model(*inputs)
        ref64 = ref(*_to64(inputs))
    out, _ = run_door(door, model, example, inputs)
    assert_close(out, ref64, eager, dtype, f"{name} {_dtype_id(dtype)} {door}")


# ---- 2. HF transformers models ----------------------------------------------------------------

try:
    import transformers
except ImportError:  # only the HF tests need it
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _hf_vit(attn: str, seed: int = 0):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()

    def inputs(seed):
        return (torch.randn(BATCH, 3, 32, 32, generator=_gen(seed)),)

    return model, inputs, "last_hidden_state"


def _hf_bert(attn: str, seed: int = 0):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    def inputs(seed, seq=12):
        ids = torch.randint(1, 100, (BATCH, seq), generator=_gen(seed))
        mask = torch.ones(BATCH, seq, dtype=torch.long)
        mask[1, seq - 4:] = 0  # right padding on the second sequence
        ids[1, seq - 4:] = 0
        return ids, mask

    return model, inputs, "last_hidden_state"


def _hf_llama(attn: str, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                   use_cache=False, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg).eval()

    def inputs(seed, seq=12):
        return (torch.randint(0, 128, (BATCH, seq), generator=_gen(seed)),)

    return model, inputs, "logits"


HF_MODELS = {"vit": _hf_vit, "bert": _hf_bert, "llama": _hf_llama}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(HF_MODELS))
@needs_transformers
def test_hf_model_numerics(name, attn, dtype, door):
    base, make_inputs, key = HF_MODELS[name](attn)
    ref = copy.deepcopy(base).double()
    model = copy.deepcopy(base).to(dtype)
    example = _cast(make_inputs(0), dtype)
    inputs = _cast(make_inputs(1), dtype)
    with torch.no_grad():
        eager = model(*inputs)
        ref64 = ref(*_to64(inputs))[key]
    # The HF forward's leading positional parameters are exactly these inputs
    # (pixel_values / input_ids, attention_mask), so the model compiles as is.
    out, _ = run_door(door, model, example, inputs)
    # Same output structure as the model: a ModelOutput carrying the same keys.
    assert type(out) is type(eager), f"output type {type(out).__name__} != {type(eager).__name__}"
    assert list(out.keys()) == list(eager.keys())
    assert_close(out[key], ref64, eager[key], dtype, f"HF {name} ({attn}) {_dtype_id(dtype)} {door}")


# ---- 3. fusion contract of the built-in blocks ------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("name", sorted(EXPECTED_KERNEL_KINDS))
def test_builtin_block_fusion(name, door):
    spec = get_builtin(name)
    model = spec.factory(0)
    inputs = spec.example_inputs(BATCH, "cpu", torch.float32)
    _, reports = run_door(door, model, inputs, inputs)
    assert len(reports) == 1, f"expected one compiled graph, got {len(reports)}"
    report = reports[0]
    expected = EXPECTED_KERNEL_KINDS_AOT.get(name, EXPECTED_KERNEL_KINDS[name]) if door == "aot" else EXPECTED_KERNEL_KINDS[name]
    assert report.kernel_kinds() == expected, report.render()
    assert report.num_kernels == sum(expected.values())
    for f in report.fallbacks:
        assert isinstance(f["reason"], str) and f["reason"].strip(), f


def test_vit_b16_kernel_count_per_layer():
    """Hugging Face ViT-B/16 (12 layers, hidden 768): per layer 2 LayerNorm kernels (residual adds
    fused in), 4 matmuls (q|k|v merged: at 2 images each projection fills 24 of 132 output tiles;
    o; fc1 with GELU; fc2 with the residual) and 1 attention; the patch convolution is one more matmul
    (patch_conv pass), so nothing falls back to eager. Compile only: nothing runs on the interpreter."""
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(), add_pooling_layer=False).eval()
    c = fxforge.compile(model, (torch.randn(2, 3, 224, 224),))
    # + 1 matmul: the 16x16/16 patch embedding (patch_conv pass) instead of a cuDNN convolution
    assert c.report.kernel_kinds() == {"reduction": 2 * 12 + 1, "matmul": 4 * 12 + 1, "attention": 12}, c.report.render()
    assert c.report.fallbacks == []


def test_decode_step_kernel_count_per_layer():
    """The static-cache decode step: per layer 2 RMSNorm, 4 matmuls (q|k|v, o, gate|up, down),
    RoPE q and RoPE k, SiLU·up, 1 attention, and 2 in-place cache updates (scatter kernels)."""
    from fxforge.models import KVCacheLlama, TinyLlama

    n = 3
    model = KVCacheLlama(TinyLlama(n_layers=n), batch=1, max_seq=32).eval()
    c = fxforge.compile(model, (torch.randint(0, 256, (1, 1)), torch.tensor([3])))
    kinds = c.report.kernel_kinds()
    assert kinds == {"reduction": 2 * n + 1, "matmul": 4 * n + 1, "pointwise": 3 * n + 1, "attention": n}, c.report.render()
    assert c.report.library_calls == 2 * n
    assert sorted(f["op"] for f in c.report.fallbacks) == ["aten::embedding.default", "aten::index.Tensor", "aten::index.Tensor"]
