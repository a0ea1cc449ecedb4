"""Pass infrastructure, registry, config-from-environment, debug mode, memory plan, dynamic shapes."""
import fxforge  # noqa: F401
import pytest
import torch
import torch.nn as nn
from fxforge import Config, ConfigError, NumericsError, Pass, PassError, registry
from fxforge.config import DEFAULT_PASSES, from_env
from fxforge.debug import rel_err

aten = torch.ops.aten


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *a):
        return self.fn(*a)


def test_default_pipeline_reports_every_pass():
    c = fxforge.compile(Fn(lambda x: (x * 2) * 2 + (x * 2)), (torch.randn(5),))
    names = [p["name"] for p in c.report.passes]
    assert names == list(DEFAULT_PASSES)
    cse = next(p for p in c.report.passes if p["name"] == "cse")
    assert cse["modified"] and cse["nodes_after"] < cse["nodes_before"]


def test_constant_folding_of_weights_only_subgraph():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return x * (self.w.exp() * 2 + 1)
    m, x = M().eval(), torch.randn(3, 8)
    c = fxforge.compile(m, (x,))
    fold = next(p for p in c.report.passes if p["name"] == "constant_fold")
    assert fold["modified"]
    assert c.report.num_kernels == 1 and len(c.report.kernels[0]["nodes"]) == 1  # only the mul remains
    assert rel_err(c(x), m(x)) < 1e-6


def test_pass_cache_id_depends_on_source_and_options():
    import fxforge.passes  # noqa: F401  (registers the built-in passes; a fresh xdist worker may not have)

    a, b = registry.make_pass("constant_fold"), registry.make_pass("constant_fold", max_bytes=1)
    assert a.cache_id() != b.cache_id() and a.cache_id() == registry.make_pass("constant_fold").cache_id()
    assert registry.make_pass("dce").cache_id() != a.cache_id()


def test_user_pass_registers_and_runs_and_duplicates_are_rejected():
    @registry.register_pass
    class ExpToExp2(Pass):
        """before: %y = exp(%x)   after: %y = exp2(mul(%x, log2(e)))"""
        name = "test_exp_to_exp2"

        def call(self, gm):
            modified = False
            for n in list(gm.graph.nodes):
                if n.target is aten.exp.default:
                    with gm.graph.inserting_before(n):
                        m = gm.graph.call_function(aten.mul.Tensor, (n.args[0], 1.4426950408889634))
                        e = gm.graph.call_function(aten.exp2.default, (m,))
                    m.meta["val"] = n.meta["val"]
                    e.meta["val"] = n.meta["val"]
                    n.replace_all_uses_with(e)
                    gm.graph.erase_node(n)
                    modified = True
            return modified
    try:
        x = torch.randn(9)
        c = fxforge.compile(Fn(torch.exp), (x,), passes=["test_exp_to_exp2", "dce"])
        assert c.report.passes[0]["name"] == "test_exp_to_exp2" and c.report.passes[0]["modified"]
        assert "tl.exp2" in next(iter(c.kernel_sources.values()))
        assert rel_err(c(x), x.double().exp()) < 1e-6
        with pytest.raises(ValueError, match="already registered"):
            registry.register_pass(ExpToExp2)
    finally:
        registry.passes.pop("test_exp_to_exp2", None)


def test_unknown_pass_and_bad_passes_argument():
    with pytest.raises(KeyError, match="unknown pass 'nope'"):
        fxforge.compile(Fn(torch.exp), (torch.randn(3),), passes=["nope"])
    with pytest.raises(ConfigError):
        fxforge.compile(Fn(torch.exp), (torch.randn(3),), passes="dce")


def test_pass_created_nodes_get_metadata_and_bad_graphs_are_named():
    @registry.register_pass
    class AddRelu(Pass):
        """before: %y = exp(%x)   after: %r = relu(%y) feeding the old users of %y (no meta set)"""
        name = "test_add_relu"

        def call(self, gm):
            for n in gm.graph.nodes:
                if n.target is aten.exp.default:
                    with gm.graph.inserting_after(n):
                        r = gm.graph.call_function(aten.relu.default, (n,))
                    n.replace_all_uses_with(r, delete_user_cb=lambda u: u is not r)
                    return True
            return False

    @registry.register_pass
    class Broken(Pass):
        name = "test_broken_shapes"

        def call(self, gm):
            for n in gm.graph.nodes:
                if n.target is aten.exp.default:
                    with gm.graph.inserting_after(n):
                        bad = gm.graph.call_function(aten.mm.default, (n, n))  # 1-D mm: invalid
                    n.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
                    return True
            return False
    try:
        x = torch.randn(5)
        c = fxforge.compile(Fn(torch.exp), (x,), passes=["test_add_relu"])
        assert torch.allclose(c(x), x.exp().relu())
        with pytest.raises(PassError, match="after pass 'test_broken_shapes': shape/dtype propagation failed"):
            fxforge.compile(Fn(torch.exp), (x,), passes=["test_broken_shapes"])
    finally:
        registry.passes.pop("test_add_relu", None)
        registry.passes.pop("test_broken_shapes", None)


def test_config_from_environment():
    cfg = from_env(environ={"FXFORGE_PASSES": "dce, cse", "FXFORGE_DEBUG": "1", "FXFORGE_MAX_PERSISTENT_RBLOCK": "256"})
    assert cfg.passes == ("dce", "cse") and cfg.debug and cfg.max_persistent_rblock == 256
    assert cfg.cache_id() != Config().cache_id()
    with pytest.raises(ValueError, match="FXFORGE_DEBUG"):
        from_env(environ={"FXFORGE_DEBUG": "maybe"})
    with pytest.raises(ConfigError, match="cuda_graphs"):
        from_env(environ={"FXFORGE_CUDA_GRAPHS": "sometimes"})


def test_current_config_follows_the_environment(monkeypatch, tmp_path):
    # current() and cache_dir() are memoized for kernel launchers' hot paths; a changed variable is still seen
    from fxforge.config import cache_dir, current

    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path / "a"))
    assert current().cache_dir == cache_dir() == str(tmp_path / "a")
    mine = current()
    mine.debug_rtol = -1.0  # a caller's change stays its own
    assert current().debug_rtol != -1.0 and current() is not mine
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path / "b"))
    monkeypatch.setenv("FXFORGE_AUTOTUNE", "max")
    assert current().cache_dir == cache_dir() == str(tmp_path / "b") and current().autotune == "max"
    monkeypatch.delenv("FXFORGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert current().cache_dir == cache_dir() == str(tmp_path / "xdg" / "fxforge")


def test_debug_mode_dumps_graphs_and_kernels_and_names_the_breaking_pass(tmp_path):
    x = torch.randn(4, 6)
    cfg = Config(debug=True, debug_dir=str(tmp_path / "dbg"))
    fxforge.compile(Fn(lambda x: torch.softmax(x, -1) + 1), (x,), config=cfg)
    files = {p.name for p in (tmp_path / "dbg").rglob("*")}
    assert "00_captured.graph.txt" in files and any(f.endswith("_cse.graph.txt") for f in files)
    assert any(f.startswith("fxf_reduction") and f.endswith(".py") for f in files)

    @registry.register_pass
    class Wrong(Pass):
        name = "test_wrong_numerics"

        def call(self, gm):
            for n in gm.graph.nodes:
                if n.target is aten.add.Tensor:
                    n.args = (n.args[0], 2.0)
                    return True
            return False
    try:
        with pytest.raises(NumericsError, match="pass 'test_wrong_numerics' broke numerics"):
            fxforge.compile(Fn(lambda x: torch.softmax(x, -1) + 1), (x,), passes=["test_wrong_numerics"],
                            config=Config(debug=True, debug_dir=str(tmp_path / "dbg2")))
    finally:
        registry.passes.pop("test_wrong_numerics", None)


def test_memory_plan_reuses_buffers():
    def fn(x):
        for _ in range(6):
            # the transpose (a view) ends each kernel; each output dies after the next kernel
            x = (torch.softmax(x, -1) * 2).t()
        return x
    x = torch.randn(32, 32)
    c = fxforge.compile(Fn(fn), (x,))
    m = c.report.memory
    assert m["bytes_planned"] < m["bytes_unplanned"], m
    assert rel_err(c(x), fn(x.double())) < 1e-6
    y = c(x)
    assert torch.equal(c(x), y), "outputs must not alias the reused pool"


def test_aot_dynamic_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 33)
    c = fxforge.compile(Fn(lambda x: torch.softmax(x, -1) * x.sum(-1, keepdim=True)), (x,), dynamic=True)
    assert c.program.symbols, "dims must be symbolic"
    for shape in [(4, 8, 33), (2, 5, 33), (1, 1, 7)]:
        y = torch.randn(*shape)
        ref = torch.softmax(y.double(), -1) * y.double().sum(-1, keepdim=True)
        assert rel_err(c(y), ref) < 1e-5  # fp32; a row sum near 0 amplifies relative error


def test_jit_recompiles_on_new_shape_and_dynamic():
    torch._dynamo.reset()
    before = len(fxforge.backend.reports)
    f = torch.compile(lambda x: torch.relu(x) * 2 + x.mean(-1, keepdim=True), backend="fxforge")
    with torch.no_grad():
        for shape in [(3, 7), (5, 7), (6, 9)]:
            x = torch.randn(*shape)
            assert rel_err(f(x), torch.relu(x.double()) * 2 + x.double().mean(-1, keepdim=True)) < 1e-6
    assert len(fxforge.backend.reports) > before


def test_jit_training_graph_runs_eagerly_and_correctly():
    torch._dynamo.reset()
    lin = nn.Linear(5, 3)
    f = torch.compile(lambda x: lin(x).relu().sum(), backend="fxforge")
    x = torch.randn(4, 5, requires_grad=True)
    f(x).backward()
    ref_x = x.detach().clone().requires_grad_()
    lin(ref_x).relu().sum().backward()
    assert torch.allclose(x.grad, ref_x.grad)
    assert any("training_graph" in fb["reason"] for r in fxforge.backend.reports for fb in r.fallbacks)


def test_every_node_carries_metadata_after_capture():
    from fxforge.capture import export_graph
    from fxforge.models import get_builtin
    b = get_builtin("llama_block")
    cap = export_graph(b.factory(0), b.example_inputs(1, "cpu", torch.float32))
    for n in cap.gm.graph.nodes:
        if n.op != "output" and not (isinstance(n.target, torch._ops.OpOverload) and not n.target._schema.returns):
            assert "val" in n.meta, n.format_node()


def test_buffer_mutation_is_written_back_on_both_front_doors():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.zeros(4))

        def forward(self, x):
            self.c.add_(x)
            return self.c * 2
    m = Counter()
    compiled = fxforge.compile(m, (torch.ones(4),))
    assert compiled.program.mutations
    m.c.zero_()  # export ran the model once; state is shared with the compiled program
    compiled(torch.ones(4))
    out = compiled(torch.ones(4))
    assert torch.equal(out, torch.full((4,), 4.0)) and torch.equal(m.c, torch.full((4,), 2.0))
    torch._dynamo.reset()
    m = Counter()
    f = torch.compile(m, backend="fxforge")
    with torch.no_grad():
        f(torch.ones(4))
        out = f(torch.ones(4))
    assert torch.equal(out, torch.full((4,), 4.0)) and torch.equal(m.c, torch.full((4,), 2.0))


def test_input_mutation_is_a_clear_error_on_aot():
    def bump(x):
        x.add_(1)
        return x * 2
    with pytest.raises(fxforge.FxforgeError, match="mutates its inputs"):
        fxforge.compile(bump, (torch.ones(4),))


def test_kv_cache_decode_is_reinplaced_gqa_and_matches_eager_over_steps():
    import copy

    from fxforge.models import KVCacheLlama, TinyLlama

    torch.manual_seed(0)
    model = KVCacheLlama(TinyLlama(), batch=2, max_seq=24).eval()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 9))
    compiled = fxforge.compile(model, (ids[:, :1], torch.tensor([0])))
    steps = compiled.program.steps
    ops = [getattr(s, "op", "") for s in steps]
    assert ops.count("aten::index_put_.default") == 4 and "aten::index_put.default" not in ops  # in place
    assert not any("clone" in o or "expand" in o for o in ops)  # repeat_kv copies are gone (GQA)
    assert sum(s.kind == "matmul" for s in steps if hasattr(s, "kind")) == 2 * 4 + 1  # qkv, o, gate|up, down; lm_head
    model.reset()
    ref.reset()
    for i in range(9):
        a = compiled(ids[:, i:i + 1], torch.tensor([i]))
        b = ref(ids[:, i:i + 1], torch.tensor([i]))
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), i
    assert torch.allclose(model.k_cache1, ref.k_cache1, atol=1e-6)


def test_autotune_modes():
    assert Config(autotune="0").autotune == "off" and Config(autotune=True).autotune == "fast"
    assert from_env(environ={"FXFORGE_AUTOTUNE": "max"}).autotune == "max"
    with pytest.raises(ConfigError, match="autotune"):
        Config(autotune="always")


def test_a_view_made_invalid_by_a_layout_change_becomes_a_reshape():
    """A pass that hands a view a non-contiguous producer (merge_linears does: column slices) must
    not break export's stride-dependent views; fill_meta turns such a view into a reshape."""
    aten = torch.ops.aten

    class TransposeThenFlatten(nn.Module):
        def forward(self, x):
            return (x.t().contiguous() * 2).view(-1)

    @registry.register_pass
    class DropContiguous(Pass):
        name = "test_drop_contiguous"

        def call(self, gm):
            for n in gm.graph.nodes:
                if n.target is aten.clone.default and n.kwargs.get("memory_format") is torch.contiguous_format:
                    with gm.graph.inserting_after(n):
                        alias = gm.graph.call_function(aten.permute.default, (n.args[0], [0, 1]))
                    n.replace_all_uses_with(alias)
                    gm.graph.erase_node(n)
                    return True
            return False
    try:
        x = torch.randn(3, 5)
        c = fxforge.compile(TransposeThenFlatten(), (x,), passes=["test_drop_contiguous", "dce"])
        assert torch.equal(c(x), (x.t().contiguous() * 2).view(-1))
        assert any(getattr(s, "op", "") == "aten::reshape.default" for s in c.program.steps)
    finally:
        registry.passes.pop("test_drop_contiguous", None)


@pytest.mark.parametrize("rows,width,merged", [
    (3, 8, True),          # decode-sized: bandwidth-bound siblings
    (300, 8, True),        # many rows but k/v fill 3 of 132 output tiles: merged (underfilled GPU)
    (4096, 640, False),    # every member has >= 132 tiles of 128x128: left to cuBLAS one by one
])
def test_merge_linears_merges_bandwidth_bound_or_underfilled_siblings_only(rows, width, merged):
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(16, 3 * width, bias=False), nn.Linear(16, width, bias=False),
                                      nn.Linear(16, width, bias=False))

        def forward(self, x):
            return self.q(x).view(-1, 3, width) * 2, self.k(x) + 1, self.v(x)
    torch.manual_seed(0)
    m, x = QKV().eval(), torch.randn(rows, 16)
    c = fxforge.compile(m, (x,))
    mms = sum(getattr(s, "kind", "") == "matmul" for s in c.program.steps)
    assert mms == (1 if merged else 3)
    assert [p["modified"] for p in c.report.passes if p["name"] == "merge_linears"] == [merged]
    for a, b in zip(c(x), m(x)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
