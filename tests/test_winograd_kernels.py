"""The generated Winograd transform kernels (CPU interpreter) against float64 direct convolution."""
import fxforge
import pytest
import torch
import torch.nn.functional as F
from fxforge.debug import rel_err
from fxforge.passes.winograd import library
from fxforge.runtime.winograd import (
    CONFIGS,
    Geometry,
    WinogradConfig,
    WinogradConv2d,
    filter_transform,
    input_transform,
    output_transform,
    winograd_conv2d,
    winograd_gemm,
)


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape,pad", [((1, 5, 9, 7), 1), ((2, 3, 6, 11), 0), ((1, 4, 13, 13), 2)])
def test_winograd_matches_direct(m, shape, pad):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w, b = torch.randn(3, shape[1], 3, 3), torch.randn(3)
    conv = WinogradConv2d(w, b, library.found(m, 3).transform(), padding=pad)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=pad)
    assert rel_err(conv(x), ref) < 1e-5


# Small blocks so that every launch has several programs with ragged tile and channel edges.
SMALL = {"nchw": WinogradConfig(8, 2, 1, 4, 4, 1, "nchw"), "nhwc": WinogradConfig(2, 4, 1, 4, 2, 1, "nhwc")}
ROWS = WinogradConfig(4, 2, 1, 2, 4, 1, out_rows=True)  # NCHW output rows joined (tl.join, m padded to 2^k)


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("N,C,H,W,K,pad,layout", [
    (1, 3, 7, 10, 5, 0, "nchw"),     # H, W not multiples of m; pad 0
    (3, 5, 9, 6, 3, 1, "nhwc"),      # batch 3, odd channels, channels-last in and out
    (1, 7, 11, 13, 4, 2, "nchw"),    # pad 2 (output larger than input)
    (3, 1, 5, 8, 7, 1, "nchw"),      # one input channel
    (1, 9, 6, 5, 1, 2, "nhwc"),      # one output channel, W < H
])
@pytest.mark.parametrize("blocks", ["small", "rows", "default"])
def test_irregular_shapes_and_layouts(m, N, C, H, W, K, pad, layout, blocks):
    torch.manual_seed(m * 100 + C)
    x = torch.randn(N, C, H, W)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(K, C, 3, 3), torch.randn(K)
    conv = WinogradConv2d(w, b, library.found(m, 3).transform(), padding=pad,
                          config={"small": SMALL[layout], "rows": ROWS}.get(blocks))
    y = conv(x)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=pad)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_transforms_against_float64_matrices(layout):
    """V = Bᵀ d B per tile and channel in the documented layout; y from a float64 M; no bias."""
    torch.manual_seed(1)
    m, pad, (N, C, H, W, K) = 4, 1, (2, 3, 7, 9, 5)
    t = library.found(m, 3).transform()
    BT = torch.tensor(t.numpy()[2], dtype=torch.float64)
    pts = " ".join(t.points_str())
    x = torch.randn(N, C, H, W)
    g = Geometry(N, C, H, W, K, m, pad)
    a = g.alpha
    V = input_transform(x, m, pts, pad, layout, SMALL[layout], t.scaling)
    xp = F.pad(x.double(), (pad, pad + a, pad, pad + a))[:, :, : g.NH * m + 2, : g.NW * m + 2]
    d = xp.unfold(2, a, m).unfold(3, a, m)                       # (N, C, NH, NW, a, a)
    ref = (BT @ d @ BT.T).permute(4, 5, 1, 0, 2, 3).reshape(a * a, C, g.P)
    assert rel_err(V if layout == "nchw" else V.transpose(1, 2), ref) < 1e-6
    w = torch.randn(K, C, 3, 3)
    U = filter_transform(w, t)
    Mt = winograd_gemm(U, V, layout)
    y = output_transform(Mt, None, g, layout, SMALL[layout], pts, t.scaling)
    assert rel_err(y, F.conv2d(x.double(), w.double(), padding=pad)) < 1e-5


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_forced_layout_on_the_other_memory_format(layout):
    """x and y are addressed through strides: the layout only decides speed and y's format."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, 7, 9)
    x = x if layout == "nhwc" else x.to(memory_format=torch.channels_last)
    w, b = torch.randn(4, 5, 3, 3), torch.randn(4)
    cfg = WinogradConfig(4, 2, 1, 4, 2, 1, layout, out_rows=True)
    y = WinogradConv2d(w, b, library.found(4, 3).transform(), padding=1, config=cfg)(x)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    assert rel_err(y, F.conv2d(x.double(), w.double(), b.double(), padding=1)) < 1e-5


def test_fp16_and_custom_op_channels_last():
    torch.manual_seed(2)
    t = library.found(4, 3).transform()
    x = torch.randn(3, 6, 10, 9).to(memory_format=torch.channels_last)
    w, b = torch.randn(5, 6, 3, 3) / 8, torch.randn(5)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    y = winograd_conv2d(x, filter_transform(w, t), b, 4, " ".join(t.points_str()), 1, t.scaling)
    assert y.is_contiguous() and rel_err(y, ref) < 1e-5   # the op's output is NCHW, as its fake says
    y16 = WinogradConv2d(w.half(), b.half(), t, padding=1)(x.half())
    assert y16.dtype == torch.float16 and rel_err(y16, ref) < 5e-3


def test_config_lists_start_with_the_default():
    for (layout, m), cfgs in CONFIGS.items():
        assert cfgs and all(c.in_p & (c.in_p - 1) == 0 and c.in_c & (c.in_c - 1) == 0 for c in cfgs), (layout, m)


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
