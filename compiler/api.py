"""``fxforge.compile``: ahead-of-time compilation through torch.export, and the compiled model."""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree

from . import config as config_mod
from . import debug as dbg
from .capture import export_graph
from .config import Config
from .errors import ConfigError
from .pipeline import Pipeline
from .report import CompileReport


def build_program(gm, cfg: Config, user_inputs=None, debug_inputs=None, reference=None):
    """Pass pipeline + lowering: the part both front doors share."""
    from fxforge.codegen.lower import lower_graph

    t0 = time.perf_counter()
    pipe = Pipeline.from_names(cfg.passes, cfg)
    pipe_report = pipe.run(gm, debug_inputs, reference)
    program, constants, fallbacks = lower_graph(gm, cfg, user_inputs)
    if cfg.debug:
        for name, k in program.kernels.items():
            dbg.dump_text(cfg, f"kernels/{name}.py", k["source"])
        dbg.dump_text(cfg, "program.json", program.dumps())
    report = CompileReport.from_program(program, fallbacks, pipe_report.results, time.perf_counter() - t0,
                                        sum(1 for n in gm.graph.nodes if n.op == "call_function"))
    return program, constants, report


def call_program(executor, out_spec, args: tuple, kwargs: dict):
    """Run a program on the tensor/number leaves of ``(args, kwargs)`` and rebuild the model's
    output structure. Extra or missing leaves are neither dropped nor padded: the executor's
    signature check names them."""
    flat = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, (torch.Tensor, int, float, bool))]
    with torch.no_grad():
        outs = executor(*flat)
    if out_spec is not None:
        return pytree.tree_unflatten(outs, out_spec)
    return outs[0] if len(outs) == 1 else tuple(outs)


class CompiledModel:
    """A compiled program with its weights; call it like the original model."""

    def __init__(self, program, constants: dict, report: CompileReport, cfg: Config, out_spec=None, in_spec=None):
        from fxforge.runtime.executor import Executor

        self.program = program
        self.constants = constants
        self.report = report
        self.config = cfg
        self.out_spec = out_spec
        self.in_spec = in_spec
        self.executor = Executor(program, constants, cfg.cache_dir, cfg.cache_id(), autotune=cfg.autotune, report=report,
                                 cuda_graphs=cfg.cuda_graphs)

    def __call__(self, *args, **kwargs):
        return call_program(self.executor, self.out_spec, args, kwargs)

    @property
    def kernel_sources(self) -> dict:
        return {n: k["source"] for n, k in self.program.kernels.items()}


def compile(model, example_inputs: Sequence[Any], *, passes: Sequence[str] | None = None, dynamic: bool = False,
            dynamic_shapes=None, config: Config | None = None) -> CompiledModel:
    """Compile ``model`` ahead of time for inputs like ``example_inputs``.

    The result checks every call against the compiled signature (shape, dtype, device) and raises
    ``SignatureMismatch`` naming expected and given signatures. ``dynamic=True`` makes every input
    dim symbolic (torch.export ``Dim.AUTO``); export may still specialize dims the model fixes.
    """
    cfg = config_mod.from_env(config or Config())
    if passes is not None:
        if isinstance(passes, str) or not all(isinstance(p, str) or hasattr(p, "call") for p in passes):
            raise ConfigError("passes must be a sequence of registered pass names or Pass objects")
        cfg = cfg.replace(passes=tuple(p if isinstance(p, str) else p for p in passes))
    example_inputs = tuple(example_inputs)
    if isinstance(model, torch.nn.Module) and model.training:
        model = model.eval()
    captured = export_graph(model, example_inputs, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
    reference = None
    debug_inputs = None
    if cfg.debug:
        with torch.no_grad():
            reference = model(*example_inputs)
        debug_inputs = [x for x in pytree.tree_leaves(example_inputs) if isinstance(x, torch.Tensor)]
    program, constants, report = build_program(captured.gm, cfg, captured.user_inputs, debug_inputs, reference)
    try:
        program.out_spec = pytree.treespec_dumps(captured.out_spec)
    except Exception:
        program.out_spec = None  # custom output containers: a loaded artifact returns a flat tuple
    compiled = CompiledModel(program, constants, report, cfg, captured.out_spec, captured.in_spec)
    if cfg.debug:
        dbg.check_numerics(lambda *a: compiled(*a), debug_inputs, reference, stage="compiled program", rtol=cfg.debug_rtol)
    return compiled
