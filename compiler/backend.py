"""The ``torch.compile`` backend, registered as ``fxforge`` through the ``torch_dynamo_backends``
entry point.

Dynamo captures a graph; AOTAutograd functionalizes and decomposes it with the same table as the
AOT path; our inference compiler runs the pass pipeline and lowers it. Dynamo's guards recompile on
a new shape/dtype/device. Graphs that need gradients run their AOT forward/backward graphs eagerly
(a recorded fallback) — correct, not yet compiled.
"""
from __future__ import annotations

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from . import config as config_mod
from .capture import decomposition_table
from .report import CompileReport

#: One report per graph this process compiled (newest last), for ``fxforge.backend.last_report()``.
reports: list[CompileReport] = []


def last_report() -> CompileReport | None:
    return reports[-1] if reports else None


def _inference_compiler(gm: torch.fx.GraphModule, example_inputs):
    from fxforge.api import build_program
    from fxforge.runtime.executor import Executor

    cfg = config_mod.from_env()
    debug_inputs = reference = None
    if cfg.debug and all(isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor) for x in example_inputs):
        debug_inputs = list(example_inputs)
        with torch.no_grad():
            reference = gm(*debug_inputs)
    program, constants, report = build_program(gm, cfg, None, debug_inputs, reference)
    reports.append(report)
    executor = Executor(program, constants, cfg.cache_dir, cfg.cache_id(), autotune=cfg.autotune, report=report,
                                 cuda_graphs=cfg.cuda_graphs)

    def run(args):
        outs = executor(*args)
        args.clear()
        return outs

    run._boxed_call = True
    return run


def _training_compiler(kind: str):
    def compile_eager(gm: torch.fx.GraphModule, example_inputs):
        n = sum(1 for x in gm.graph.nodes if x.op == "call_function")
        reports.append(CompileReport(fallbacks=[{"node": f"<{kind} graph>", "op": f"{n} ops",
                                                 "reason": "training_graph: graphs that need gradients run eagerly"}],
                                     graph_nodes=n))
        return make_boxed_func(gm.forward)
    return compile_eager


fxforge_backend = aot_autograd(
    fw_compiler=_training_compiler("forward"),
    bw_compiler=_training_compiler("backward"),
    inference_compiler=_inference_compiler,
    decompositions=decomposition_table(),
)
