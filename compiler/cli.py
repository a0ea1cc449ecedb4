"""``fxforge`` command line: run / compile / explain.

    fxforge run [--model vit|llama|...] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
    fxforge compile MODEL -o DIR        # MODEL: a built-in name or ``package.module:attr``
    fxforge explain MODEL               # graph, fusion groups, fallbacks; runs nothing
    fxforge quantize MODEL --format w4a16_g128 [--hadamard 32] [--json report.json]
                                        # per-layer SQNR, sizes, output error vs the float model
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import fxforge
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .debug import flat_tensors, rel_err
from .models import BUILTIN_MODELS

console = Console(width=None if sys.stdout.isatty() else 140)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(spec: str, batch: int, device: str, dtype: torch.dtype, seed: int = 0):
    """(model, example_inputs) from a built-in name or ``module:attr`` (a Module, or a factory
    returning a Module or a ``(module, example_inputs)`` pair)."""
    if spec in BUILTIN_MODELS:
        b = BUILTIN_MODELS[spec]
        return b.factory(seed).to(device=device, dtype=dtype), b.example_inputs(batch, device, dtype)
    if ":" not in spec:
        raise SystemExit(f"unknown model {spec!r}: use a built-in ({', '.join(BUILTIN_MODELS)}) or module:attr")
    mod_name, attr = spec.split(":", 1)
    obj = getattr(importlib.import_module(mod_name), attr)
    obj = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if isinstance(obj, tuple):
        model, inputs = obj
    else:
        model, inputs = obj, getattr(obj, "example_inputs", None)
        if inputs is None:
            raise SystemExit(f"{spec} must be (module, example_inputs) or a Module with .example_inputs")
    return model.to(device=device).eval(), tuple(inputs)


def _progress():
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)


def _time(fn, args, device: str, reps: int) -> float:
    fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def cmd_run(a) -> int:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[a.dtype]
    models = [a.model] if a.model else ["vit", "llama"]
    summary = []
    for name in models:
        with _progress() as p:
            p.add_task(f"{name}: building", total=None)
            model, inputs = resolve_model(name, a.batch, device, dtype)
            ref_model, _ = resolve_model(name, a.batch, device, torch.float64 if device == "cpu" else torch.float32)
            ref_inputs = [x.to(ref_model_dtype(ref_model)) if x.is_floating_point() else x for x in inputs]
        with _progress() as p:
            p.add_task(f"{name}: compiling (passes → fusion → Triton)", total=None)
            compiled = fxforge.compile(model, inputs)
        with _progress() as p:
            p.add_task(f"{name}: running and checking against eager", total=None)
            with torch.no_grad():
                out = flat_tensors(compiled(*inputs))[0]
                eager_out = flat_tensors(model(*inputs))[0]
                ref = flat_tensors(ref_model(*ref_inputs))[0]
                t_ours = _time(compiled, inputs, device, a.reps)
                t_eager = _time(model, inputs, device, a.reps)
        err, eager_err = rel_err(out, ref), rel_err(eager_out, ref)
        console.rule(f"[bold]{name}[/] on {device}, {a.dtype}, batch {a.batch}")
        console.print(compiled.report.render())
        console.print(f"max |fxforge - eager| = {(out.float() - eager_out.float()).abs().max().item():.3e}   "
                      f"rel err vs fp64: fxforge {err:.2e}, eager {eager_err:.2e}")
        console.print(f"time: fxforge {t_ours * 1e3:.2f} ms, eager {t_eager * 1e3:.2f} ms  ({t_eager / t_ours:.2f}x)")
        ok = err <= max(2 * eager_err, 1e-5 if dtype == torch.float32 else 2e-3)
        summary.append((name, compiled.report.num_kernels, len(compiled.report.fallbacks), err, eager_err, t_ours, t_eager, ok))
    table = Table(title="fxforge run")
    for col in ("model", "kernels", "fallbacks", "err fxforge", "err eager", "ms fxforge", "ms eager", "ok"):
        table.add_column(col)
    for s in summary:
        table.add_row(s[0], str(s[1]), str(s[2]), f"{s[3]:.2e}", f"{s[4]:.2e}", f"{s[5] * 1e3:.2f}", f"{s[6] * 1e3:.2f}", "yes" if s[7] else "NO")
    console.print(table)
    return 0 if all(s[7] for s in summary) else 1


def ref_model_dtype(m: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in m.parameters()), torch.float32)


def cmd_compile(a) -> int:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, inputs = resolve_model(a.model, a.batch, device, DTYPES[a.dtype])
    with _progress() as p:
        p.add_task(f"compiling {a.model}", total=None)
        compiled = fxforge.compile(model, inputs, dynamic=a.dynamic)
        path = fxforge.save(compiled, a.output)
    console.print(compiled.report.render())
    console.print(f"artifact written to {path}")
    return 0


def cmd_explain(a) -> int:
    from fxforge.api import build_program
    from fxforge.capture import export_graph
    from fxforge.config import from_env

    model, inputs = resolve_model(a.model, a.batch, "cpu", DTYPES[a.dtype])
    cap = export_graph(model.eval(), inputs)
    console.rule("captured ATen graph")
    console.print(cap.gm.graph.python_code("self").src if a.graph else f"{len(cap.gm.graph.nodes)} nodes (--graph prints them)")
    program, _, report = build_program(cap.gm, from_env(), cap.user_inputs)
    console.rule("fusion groups")
    for name, k in program.kernels.items():
        console.print(f"[bold]{name}[/] ({k['kind']}): {', '.join(k['nodes'])}")
    console.rule("report")
    console.print(report.render())
    if a.json:
        print(json.dumps(report.to_json(), indent=1))
    return 0


def cmd_quantize(a) -> int:
    """Model-level quantization report: weight bytes before/after, per-layer SQNR on the example
    inputs, the compiled quantized model's output error against the float model, and the time per call
    of both compiled programs (same pipeline, with and without the quantize pass)."""
    from fxforge.config import DEFAULT_PASSES
    from fxforge.passes.quant.quantize_pass import Quantize
    from fxforge.passes.quant.report import layer_sqnr

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, inputs = resolve_model(a.model, a.batch, device, DTYPES[a.dtype])
    options = {"format": a.format} | ({"hadamard": a.hadamard if a.hadamard == "full" else int(a.hadamard)} if a.hadamard else {})
    with _progress() as p:
        p.add_task(f"quantizing {a.model} to {a.format}", total=None)
        report = layer_sqnr(model, inputs, **options)
        compiled = fxforge.compile(model, inputs, passes=[*DEFAULT_PASSES, Quantize(**options)])
        with torch.no_grad():
            out, ref = flat_tensors(compiled(*inputs)), flat_tensors(model(*inputs))
        speed = {}
        if a.reps > 0:  # the same pipeline without the quantize pass, timed on the same inputs
            p.add_task("timing the float and the quantized program", total=None)
            float_prog = fxforge.compile(model, inputs)
            with torch.no_grad():
                speed = {"device": device, "reps": a.reps, "ms_float": 1e3 * _time(float_prog, inputs, device, a.reps),
                         "ms_quantized": 1e3 * _time(compiled, inputs, device, a.reps)}
    err = max(rel_err(o, r) for o, r in zip(out, ref))
    console.print(report.render())
    console.print(f"output rel err vs the float model: {err:.3e}")
    if speed:
        note = "  (CPU: Triton interpreter, not a speed measure)" if device == "cpu" else ""
        console.print(f"speed on {device}: float {speed['ms_float']:.3f} ms, quantized {speed['ms_quantized']:.3f} ms "
                      f"({speed['ms_float'] / speed['ms_quantized']:.2f}x){note}")
    if a.json:
        doc = dict(report.to_json(), model=a.model, output_rel_err=err, speed=speed or None)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        console.print(f"report written to {a.json}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fxforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch", type=int, default=2)
    common.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r = sub.add_parser("run", parents=[common], help="compile built-in models, run, compare with eager")
    r.add_argument("--model", default=None, help=f"one of {', '.join(BUILTIN_MODELS)} (default: vit and llama)")
    r.add_argument("--reps", type=int, default=3)
    c = sub.add_parser("compile", parents=[common], help="AOT-compile a model to an artifact directory")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--dynamic", action="store_true")
    e = sub.add_parser("explain", parents=[common], help="show graph, fusion groups and fallbacks")
    e.add_argument("model")
    e.add_argument("--graph", action="store_true")
    e.add_argument("--json", action="store_true")
    q = sub.add_parser("quantize", parents=[common], help="quantize linear layers: per-layer SQNR, sizes, output error")
    q.add_argument("model")
    q.add_argument("--format", default="w8a16", help="a format of fxforge.passes.quant.FORMATS")
    q.add_argument("--hadamard", default=None, help="rotation block (a power of two) or 'full'")
    q.add_argument("--json", default=None, help="also write the report as JSON to this path")
    q.add_argument("--reps", type=int, default=3, help="timed calls of the float and the quantized program (0: skip)")
    from . import winograd_cli

    winograd_cli.add_parser(sub)
    a = ap.parse_args(argv)
    return {"run": cmd_run, "compile": cmd_compile, "explain": cmd_explain, "quantize": cmd_quantize,
            "search-winograd": winograd_cli.run}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
