"""The ``quantize_w8a8`` graph pass (issue 4): the same op and tensors as the module-swapping form, bit for
bit; calibrated SmoothQuant factors by module path; placement before merge_linears; clear errors.
Accuracy bounds are those of tests/test_w8a8.py (W8A8 per token / per channel: ~1% per layer)."""
import copy

import fxforge
import pytest
import torch
from fxforge.config import DEFAULT_PASSES
from fxforge.debug import rel_err
from fxforge.errors import ConfigError, PassError
from fxforge.models import get_builtin
from fxforge.passes.quant.smoothquant import calibrate_smoothquant, swap_linears_w8a8
from fxforge.passes.quant.w8a8_pass import QuantizeW8A8, w8a8_passes
from test_w8a8 import _MLP  # the same small MLP as the module-swapping tests
from test_w8a8 import _outlier_batches as _batches

OP = torch.ops.fxforge.w8a8_linear.default


def _mlp():
    torch.manual_seed(0)
    return _MLP().eval()


def test_pass_equals_the_swapped_module_bit_for_bit_and_round_trips(tmp_path):
    model = _mlp()
    smoothing = calibrate_smoothquant(model, _batches(64, 3, seed=1, rows=32))
    x = _batches(64, 1, seed=2, rows=24)[0].reshape(2, 12, 64)
    with torch.no_grad():
        ref = model(x)
    q = QuantizeW8A8(smoothing=smoothing)
    compiled = fxforge.compile(model, (x,), passes=[*DEFAULT_PASSES, q])
    assert [r["name"] for r in q.layers] == ["up", "down"]
    assert all(r["alpha"] == smoothing[r["name"]][0] for r in q.layers)
    assert compiled.report.library_calls == 2
    out = compiled(x)
    swapped = copy.deepcopy(model)
    swap_linears_w8a8(swapped, smoothing)
    # same op, same int8 tensors, same GELU kernel in between (eager's GELU rounds differently)
    assert torch.equal(out, fxforge.compile(swapped, (x,))(x))
    assert rel_err(out, ref) < 0.03
    loaded = fxforge.load(fxforge.save(compiled, tmp_path / "w8a8"))
    assert torch.equal(loaded(x), out)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_smoothing_lowers_the_error_on_outlier_inputs():
    model = _mlp()
    smoothing = calibrate_smoothquant(model, _batches(64, 3, seed=3, rows=32))
    x = _batches(64, 1, seed=4, rows=32)[0]
    with torch.no_grad():
        ref = model(x)
    plain = fxforge.compile(model, (x,), passes=[*DEFAULT_PASSES, QuantizeW8A8()])
    smooth = fxforge.compile(model, (x,), passes=[*DEFAULT_PASSES, QuantizeW8A8(smoothing=smoothing)])
    assert rel_err(smooth(x), ref) < rel_err(plain(x), ref)


def test_llama_before_merge_linears_every_linear_but_the_head():
    b = get_builtin("llama")
    model, inputs = b.factory(), b.example_inputs(1)
    with torch.no_grad():
        ref = model(*inputs)
    smoothing = calibrate_smoothquant(model, [inputs], filter=lambda name, m: "lm_head" not in name)
    passes = w8a8_passes(smoothing)
    q = passes[passes.index("merge_linears") - 1]
    compiled = fxforge.compile(model, inputs, passes=passes)
    n_layers = len(model.layers)
    assert len(q.layers) == 7 * n_layers  # q, k, v, o, gate, up, down: nothing merged away first
    assert all(r["alpha"] is not None for r in q.layers)
    assert compiled.report.library_calls == 7 * n_layers
    assert rel_err(compiled(*inputs), ref) < 0.05


def test_placement_after_merge_linears_is_refused_with_smoothing():
    b = get_builtin("llama")
    model, inputs = b.factory(), b.example_inputs(1)
    smoothing = calibrate_smoothquant(model, [inputs])
    with pytest.raises(PassError, match="before merge_linears"):
        fxforge.compile(model, inputs, passes=[*DEFAULT_PASSES, QuantizeW8A8(smoothing=smoothing)])
    # unsmoothed W8A8 may run after the merge (a merged q|k|v is one int8 GEMM)
    q = QuantizeW8A8()
    fxforge.compile(model, inputs, passes=[*DEFAULT_PASSES, q])
    assert any(r["weight"].startswith("merged_weight") for r in q.layers)


def test_clear_errors_for_bad_configuration():
    with pytest.raises(ConfigError, match="unknown option"):
        QuantizeW8A8(alpha=0.5)
    with pytest.raises(ConfigError, match="must be a dict"):
        QuantizeW8A8(smoothing=[0.5])
    with pytest.raises(ConfigError, match="as calibrate_smoothquant returns"):
        QuantizeW8A8(smoothing={"up": 0.5})
    with pytest.raises(ConfigError, match="filter must be a callable"):
        QuantizeW8A8(filter="up")
    model, x = _mlp(), torch.randn(4, 64)
    with pytest.raises(ConfigError, match="factors, the layer's K is 64"):
        fxforge.compile(model, (x,), passes=[*DEFAULT_PASSES, QuantizeW8A8(smoothing={"up": (0.5, torch.ones(32))})])


def test_cache_id_follows_the_factor_values():
    s = torch.ones(64)
    a = QuantizeW8A8(smoothing={"up": (0.5, s)}).cache_id()
    b = QuantizeW8A8(smoothing={"up": (0.5, s * 2)}).cache_id()
    assert a != b and a == QuantizeW8A8(smoothing={"up": (0.5, s.clone())}).cache_id()
