"""The pass pipeline: a flat, ordered list of named graph rewrites.

Each pass follows torch.fx's pass-infrastructure shape: ``requires(gm)`` checks preconditions,
``call(gm)`` rewrites in place and returns whether it ``modified`` the graph, ``ensures(gm)`` checks
postconditions. ``cache_id()`` hashes the pass's source and its options, so a cache keyed on the
pipeline never survives an edit to a pass. After every pass the pipeline lints the graph and checks
that every value node still carries shape/dtype metadata; in debug mode it also dumps the graph and
compares the graph's numerics with the eager reference, naming the pass that broke them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .config import Config
from .errors import PassError
from .registry import registry


class Pass:
    """Base class of a graph rewrite. Subclasses set ``name`` and override ``call``."""

    name: str = ""

    def __init__(self, **options):
        self.options = options

    def requires(self, gm: fx.GraphModule) -> None:  # raise PassError when preconditions fail
        return None

    def call(self, gm: fx.GraphModule) -> bool:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        return None

    def cache_id(self) -> str:
        src = inspect.getsource(type(self))
        blob = json.dumps({"src": src, "options": self.options}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


@dataclass
class PassResult:
    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass
class PipelineReport:
    results: list[PassResult] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return [r.__dict__ for r in self.results]


def _value_nodes(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        t = node.target
        if node.op == "output" or (isinstance(t, torch._ops.OpOverload) and not t._schema.returns):
            continue  # asserts and other ops that produce no value
        yield node


def fill_meta(gm: fx.GraphModule, after: str) -> None:
    """Give nodes a pass created without metadata their fake values (FakeTensorProp in the graph's
    own fake mode); a graph that cannot be propagated is the pass's error."""
    if all("val" in n.meta for n in _value_nodes(gm)):
        return
    from .capture import propagate_meta

    by_name = {n.name: n for n in gm.graph.nodes}
    for _ in range(64):
        try:
            propagate_meta(gm)
            return
        except Exception as e:  # noqa: BLE001 — any propagation failure means the pass built a bad graph
            # Export records ``view`` where eager's strides allowed one. A pass that changes a
            # producer's layout (merged matmuls return column slices) can make such a view invalid;
            # ``reshape`` has the same values and copies only where it must.
            m = re.search(r"While executing %(\w+)", str(e))
            node = by_name.get(m.group(1)) if m else None
            if node is not None and node.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default) \
                    and re.search(r"view", str(e).split("While executing")[0], re.I):
                node.target = torch.ops.aten.reshape.default
                continue
            raise PassError(f"after pass {after!r}: shape/dtype propagation failed: {type(e).__name__}: {e}") from e
    raise PassError(f"after pass {after!r}: shape/dtype propagation kept failing")


def check_meta(gm: fx.GraphModule, after: str) -> None:
    """Every value-producing node must carry a fake value in ``meta['val']`` (shape and dtype)."""
    for node in _value_nodes(gm):
        if "val" not in node.meta:
            raise PassError(f"after pass {after!r}: node {node.name} ({node.op} {node.target}) lost its meta['val']")


class Pipeline:
    """Runs passes in order; ``Pipeline.from_names(cfg.passes)`` resolves names in the registry."""

    def __init__(self, passes: list[Pass], config: Config | None = None):
        self.passes = list(passes)
        self.config = config or Config()

    @classmethod
    def from_names(cls, names, config: Config | None = None) -> "Pipeline":
        import fxforge.passes  # noqa: F401  (registers the built-in passes)

        items = []
        for n in names:
            items.append(n if isinstance(n, Pass) else registry.make_pass(n))
        return cls(items, config)

    def cache_id(self) -> str:
        return hashlib.sha256("|".join(p.name + ":" + p.cache_id() for p in self.passes).encode()).hexdigest()[:16]

    def run(self, gm: fx.GraphModule, debug_inputs=None, reference=None) -> PipelineReport:
        from . import debug as dbg

        report = PipelineReport()
        cfg = self.config
        if cfg.debug:
            dbg.dump_graph(cfg, gm, "00_captured")
        for i, p in enumerate(self.passes, start=1):
            before = len(gm.graph.nodes)
            t0 = time.perf_counter()
            p.requires(gm)
            modified = bool(p.call(gm))
            if modified:
                gm.graph.lint()
                gm.recompile()
                fill_meta(gm, p.name)
            p.ensures(gm)
            check_meta(gm, p.name)
            report.results.append(PassResult(p.name, modified, time.perf_counter() - t0, before, len(gm.graph.nodes)))
            if cfg.debug:
                dbg.dump_graph(cfg, gm, f"{i:02d}_{p.name}")
                if debug_inputs is not None and reference is not None:
                    dbg.check_numerics(gm, debug_inputs, reference, stage=f"pass {p.name!r}", rtol=cfg.debug_rtol)
        return report
