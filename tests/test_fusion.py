"""Tests of generated code: how many kernels, which nodes they fuse, and the fallback report."""
import re

import fxforge  # noqa: F401  (first: sets up Triton's interpreter without CUDA)
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxforge.debug import rel_err


def compile_fn(fn, *inputs, **kw):
    class M(nn.Module):
        def forward(self, *a):
            return fn(*a)
    return fxforge.compile(M(), inputs, **kw)


class LnGeluLinearResidual(nn.Module):
    def __init__(self, d=48):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return self.fc(F.gelu(self.ln(x))) + x


def test_layernorm_gelu_linear_residual_is_two_kernels():
    torch.manual_seed(0)
    m, x = LnGeluLinearResidual().eval(), torch.randn(3, 7, 48)
    c = fxforge.compile(m, (x,))
    assert c.report.kernel_kinds() == {"reduction": 1, "matmul": 1}
    red = next(k for k in c.report.kernels if k["kind"] == "reduction")
    assert any("erf" in n for n in red["nodes"]), "GELU must be the layer norm kernel's epilogue"
    mm = next(k for k in c.report.kernels if k["kind"] == "matmul")
    assert any(n.startswith("add") for n in mm["nodes"]), "the residual add must be the matmul's epilogue"
    assert c.report.fallbacks == []
    assert rel_err(c(x), m.double()(x.double())) < 1e-5


def test_softmax_is_one_kernel_with_one_read():
    x = torch.randn(5, 33)
    c = compile_fn(lambda x: torch.softmax(x * 0.5, dim=-1), x)
    assert c.report.kernel_kinds() == {"reduction": 1}
    src = next(iter(c.kernel_sources.values()))
    assert src.count("tl.load(") == 1, "softmax must read its input once"
    assert rel_err(c(x), torch.softmax(x.double() * 0.5, -1)) < 1e-6


def test_pointwise_chain_is_one_kernel_and_source_has_provenance():
    x, y = torch.randn(7, 33), torch.randn(33)
    c = compile_fn(lambda x, y: torch.sigmoid(x * 2 + y).exp() - 1, x, y)
    assert c.report.kernel_kinds() == {"pointwise": 1}
    src = next(iter(c.kernel_sources.values()))
    for op in ("aten.mul.Tensor", "aten.add.Tensor", "aten.sigmoid.default", "aten.exp.default", "aten.sub.Tensor"):
        assert op in src, f"kernel comment must name the FX node {op}"


def test_sibling_reductions_over_same_rows_fuse():
    x = torch.randn(4, 9, 17)
    c = compile_fn(lambda x: torch.softmax(x, -1) * x.sum(-1, keepdim=True) + x.pow(2).mean(-1, keepdim=True).rsqrt(), x)
    assert c.report.kernel_kinds() == {"reduction": 1}
    ref = torch.softmax(x.double(), -1) * x.double().sum(-1, keepdim=True) + x.double().pow(2).mean(-1, keepdim=True).rsqrt()
    assert rel_err(c(x), ref) < 1e-6


def test_fallback_is_reported_with_reason_and_runs():
    x, i = torch.randn(10, 8), torch.tensor([3, 1, 4, 1, 5])
    c = compile_fn(lambda x, i: torch.cat([x[i] * 2, x[:2]]).relu(), x, i)
    reasons = {f["op"]: f["reason"] for f in c.report.fallbacks}
    assert any(op.startswith("aten::index") for op in reasons)
    assert all(r and ":" in r for r in reasons.values()), "each fallback names a typed reason"
    assert torch.allclose(c(x, i), torch.cat([x[i] * 2, x[:2]]).relu())


def test_deferred_matmul_epilogue_fuses_into_the_next_layer_norm():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, d=48):
            super().__init__()
            self.fc, self.ln = nn.Linear(d, d), nn.LayerNorm(d)

        def forward(self, x):
            h = self.fc(x) + x  # residual
            return self.ln(h), h
    m, x = Block().eval(), torch.randn(3, 7, 48)
    c = fxforge.compile(m, (x,), config=fxforge.Config(matmul_epilogue="defer"))
    assert c.report.kernel_kinds() == {"matmul": 1, "reduction": 1}
    mm = next(k for k in c.report.kernels if k["kind"] == "matmul")
    is_add = re.compile(r"add(_\d+)?$").match
    assert not any(is_add(n) for n in mm["nodes"]), "deferred: the residual add leaves the matmul"
    red = next(k for k in c.report.kernels if k["kind"] == "reduction")
    assert any(is_add(n) for n in red["nodes"]), "and becomes the layer norm's prologue"
    out, h = c(x)
    ref_out, ref_h = m.double()(x.double())
    assert rel_err(out, ref_out) < 1e-5 and rel_err(h, ref_h) < 1e-5


def test_no_fusion_config_gives_one_kernel_per_op():
    x = torch.randn(7, 33)
    fn = lambda x: (x * 2 + 1).relu()  # noqa: E731
    fused = compile_fn(fn, x)
    unfused = compile_fn(fn, x, config=fxforge.Config(fuse=False))
    assert fused.report.num_kernels == 1 and unfused.report.num_kernels == 3
    assert torch.allclose(fused(x), unfused(x))


def test_fusion_never_creates_a_cycle():
    # b depends on a through an extern op (cat), so a and b cannot share a kernel.
    x = torch.randn(6, 5)

    def fn(x):
        a = x.exp()
        mid = torch.cat([a, a], 0)[:6]
        return a + mid.sin()
    c = compile_fn(fn, x)
    assert torch.allclose(c(x), fn(x), atol=1e-6)


def test_matmul_epilogue_with_bias_activation_and_cast():
    torch.manual_seed(0)
    x, w, b = torch.randn(33, 65), torch.randn(7, 65), torch.randn(7)
    c = compile_fn(lambda x, w, b: F.silu(F.linear(x, w, b)).to(torch.bfloat16), x, w, b)
    assert c.report.kernel_kinds() == {"matmul": 1}
    ref = F.silu(F.linear(x.double(), w.double(), b.double()))
    assert rel_err(c(x, w, b), ref) < 5e-3


@pytest.mark.parametrize("shape,dim", [((1000, 3), 0), ((3, 1, 5), 1), ((2, 7, 33), 1)])
def test_reduction_over_non_last_dim(shape, dim):
    x = torch.randn(*shape)
    c = compile_fn(lambda x: (x.amax(dim, keepdim=True) - x).exp().sum(dim), x)
    assert c.report.kernel_kinds() == {"reduction": 1}
    assert rel_err(c(x), (x.double().amax(dim, keepdim=True) - x.double()).exp().sum(dim)) < 1e-6


def test_long_reduction_falls_back_with_reason():
    x = torch.randn(3, 5000)
    c = compile_fn(lambda x: x.sum(-1), x, config=fxforge.Config(max_persistent_rblock=1024))
    assert any(f["reason"].startswith("reduction_too_long") for f in c.report.fallbacks)
    assert rel_err(c(x), x.double().sum(-1)) < 1e-6


def test_64bit_index_path_and_clear_error_for_huge_matmuls(monkeypatch):
    import fxforge.runtime.executor as ex
    x = torch.randn(7, 33)
    c = compile_fn(lambda x: torch.softmax(x, -1) * 2 + x.exp(), x)
    monkeypatch.setattr(ex, "INT32_MAX", 10)  # pretend every tensor is past 32-bit offsets
    assert rel_err(c(x), torch.softmax(x.double(), -1) * 2 + x.double().exp()) < 1e-6
    m = compile_fn(lambda a, b: a @ b, torch.randn(5, 6), torch.randn(6, 7))
    with pytest.raises(fxforge.FxforgeError, match="2\\*\\*31"):
        m(torch.randn(5, 6), torch.randn(6, 7))


def test_long_rows_stay_persistent_by_default():
    x = torch.randn(2, 5000)
    c = compile_fn(lambda x: torch.softmax(x, -1), x)
    assert c.report.kernel_kinds() == {"reduction": 1} and not c.report.fallbacks
    assert rel_err(c(x), torch.softmax(x.double(), -1)) < 1e-6


CAT_CASES = {  # name -> (fn, input shapes, expected kernels)
    "last_dim_2": (lambda a, b: torch.cat([a, b], -1), [(3, 5, 7), (3, 5, 2)], {"pointwise": 1}),
    "dim0_3_inputs": (lambda a, b, c: torch.cat([a, b, c], 0) * 2, [(2, 33), (1, 33), (5, 33)], {"pointwise": 1}),
    "middle_dim_same_tensor_twice": (lambda a: torch.cat([a, a], 1) + 1, [(3, 4, 6)], {"pointwise": 1}),
    "rotate_half_rope": (lambda x, c, s: x * c + torch.cat([-x[..., 8:], x[..., :8]], -1) * s,
                         [(2, 3, 5, 16), (5, 16), (5, 16)], {"pointwise": 1}),
    "softmax_over_cat": (lambda a, b: torch.cat([a, b], -1).softmax(-1), [(4, 9), (4, 30)], {"reduction": 1}),
    "cat_of_computed": (lambda a, b: torch.cat([a.exp(), b * 3], 1), [(3, 4), (3, 5)], {"pointwise": 3}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CAT_CASES))
def test_cat_lowers_into_pointwise_kernels(name, dtype):
    fn, shapes, kinds = CAT_CASES[name]
    torch.manual_seed(0)
    xs = [torch.randn(s, dtype=dtype) for s in shapes]
    c = compile_fn(fn, *xs)
    assert c.report.kernel_kinds() == kinds, c.report.render()
    assert not [f for f in c.report.fallbacks if "cat" in f["op"]]
    ref = fn(*[x.double() for x in xs])
    same = fn(*xs)
    assert rel_err(c(*xs), ref) <= max(2 * rel_err(same, ref), 1e-6)


def test_cat_with_dynamic_size_along_axis_falls_back_with_reason():
    a, b = torch.randn(3, 5), torch.randn(3, 4)
    c = compile_fn(lambda a, b: torch.cat([a, b], -1) + 1, a, b, dynamic=True)
    assert any(f["reason"].startswith("cat: dynamic size") for f in c.report.fallbacks)
    assert torch.allclose(c(a, b), torch.cat([a, b], -1) + 1)
