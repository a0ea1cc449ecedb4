"""The ``patch_conv`` pass: stride == kernel convolutions (ViT patch embedding) become a patch gather and
one matmul; every other convolution is left to ATen. Exact rewrite: fp32 results match eager to fp32
rounding (same C·kh·kw products, summed in a different order)."""
import fxforge
import pytest
import torch
from fxforge.capture import export_graph
from fxforge.debug import rel_err
from fxforge.models import get_builtin
from fxforge.pipeline import Pipeline
from torch import nn

aten = torch.ops.aten


class PatchEmbed(nn.Module):
    def __init__(self, c=3, k=8, p=4, bias=True, tokens=True):
        super().__init__()
        self.proj = nn.Conv2d(c, k, p, stride=p, bias=bias)
        self.tokens = tokens

    def forward(self, x):
        y = self.proj(x)
        return y.flatten(2).transpose(1, 2) if self.tokens else y


def _convs(model, x):
    gm = export_graph(model, (x,)).gm
    Pipeline.from_names(["remove_noops", "patch_conv", "dce"]).run(gm)
    return sum(n.target is aten.convolution.default for n in gm.graph.nodes), gm


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 12, 16), (1, 5, 8, 4)])
def test_patch_embedding_is_one_matmul_and_matches_eager(bias, tokens, shape):
    torch.manual_seed(0)
    model = PatchEmbed(c=shape[1], bias=bias, tokens=tokens).eval()
    x = torch.randn(*shape)
    n_conv, _ = _convs(model, x)
    assert n_conv == 0
    compiled = fxforge.compile(model, (x,))
    assert not any("convolution" in str(f) for f in compiled.report.fallbacks)
    out = compiled(x)
    with torch.no_grad():
        ref = model(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    if not tokens:  # the convolution was the graph output: eager's contiguous layout
        assert out.is_contiguous()


def test_bf16_within_eager_error():
    torch.manual_seed(0)
    model = PatchEmbed(c=3, k=16, p=4).eval()
    x = torch.randn(2, 3, 16, 20)
    with torch.no_grad():
        ref = model.double()(x.double())
    model = model.float().bfloat16()
    xb = x.bfloat16()
    out = fxforge.compile(model, (xb,))(xb)
    with torch.no_grad():
        eager_err = rel_err(model(xb), ref)
    assert rel_err(out, ref) <= max(2 * eager_err, 2e-3)


@pytest.mark.parametrize("kwargs, shape", [
    ({"kernel_size": 4, "stride": 2}, (1, 3, 12, 12)),              # overlapping windows
    ({"kernel_size": 4, "stride": 4, "padding": 1}, (1, 3, 12, 12)),
    ({"kernel_size": 4, "stride": 4, "dilation": 2}, (1, 3, 16, 16)),
    ({"kernel_size": 4, "stride": 4, "groups": 3}, (1, 3, 12, 12)),
    ({"kernel_size": 1, "stride": 1}, (1, 3, 12, 12)),              # 1x1: cuDNN's NCHW path is fine
    ({"kernel_size": 4, "stride": 4}, (1, 3, 13, 12)),              # H not a multiple of the kernel
])
def test_other_convolutions_are_left_alone(kwargs, shape):
    conv = nn.Conv2d(3, 6, **kwargs).eval()
    x = torch.randn(*shape)
    n_conv, _ = _convs(conv, x)
    assert n_conv == 1
    with torch.no_grad():
        assert torch.allclose(fxforge.compile(conv, (x,))(x), conv(x), rtol=1e-5, atol=1e-5)


def test_builtin_vit_has_no_convolution_left():
    b = get_builtin("vit")
    model, inputs = b.factory(), b.example_inputs(2)
    gm = export_graph(model, inputs).gm
    had = sum(n.target is aten.convolution.default for n in gm.graph.nodes)
    n_conv, _ = _convs(model, inputs[0])
    compiled = fxforge.compile(model, inputs)
    with torch.no_grad():
        ref = model(*inputs)
    assert had == 1 and n_conv == 0
    assert rel_err(compiled(*inputs), ref) < 1e-5
