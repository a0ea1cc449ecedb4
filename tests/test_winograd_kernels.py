"""The generated Winograd transform kernels (CPU interpreter) against float64 direct convolution."""
import fxforge  # noqa: F401
import pytest
import torch
import torch.nn.functional as F
from fxforge.debug import rel_err
from fxforge.passes.winograd import library
from fxforge.runtime.winograd import WinogradConv2d


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape,pad", [((1, 5, 9, 7), 1), ((2, 3, 6, 11), 0), ((1, 4, 13, 13), 2)])
def test_winograd_matches_direct(m, shape, pad):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w, b = torch.randn(3, shape[1], 3, 3), torch.randn(3)
    conv = WinogradConv2d(w, b, library.found(m, 3).transform(), padding=pad)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=pad)
    assert rel_err(conv(x), ref) < 1e-5


def test_generated_source_unrolls_constants():
    conv = WinogradConv2d(torch.randn(2, 2, 3, 3), None, library.standard(2, 3).transform(), padding=1)
    assert "d3_3 = tl.load" in conv.source and "tl.dot" not in conv.source


def test_winograd_pass_on_a_cnn_and_artifact_roundtrip(tmp_path):
    from fxforge.config import DEFAULT_PASSES
    from fxforge.models import get_builtin

    b = get_builtin("cnn")
    model, x = b.factory(0), b.example_inputs(2, "cpu", torch.float32)
    c = fxforge.compile(model, x, passes=list(DEFAULT_PASSES) + ["winograd_conv", "dce"])
    assert c.report.library_calls == 2, c.report.render()
    assert not any("convolution" in f["op"] for f in c.report.fallbacks)
    ref = b.factory(0).double()(x[0].double())
    assert rel_err(c(*x), ref) < 1e-5
    loaded = fxforge.load(fxforge.save(c, tmp_path / "cnn"))
    assert torch.equal(loaded(*x), c(*x))
