"""Shared benchmark plumbing: CUDA-event timing, relative error, and the results file format
(DEVELOPERS.md: {"device", "torch", "triton", "date", "command", "rows": [...]} plus a markdown table)."""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def time_cuda(fn, *args, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of ``fn(*args)`` over ``reps`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_us(fn, launches: int = 20, reps: int = 10, tries: int = 1) -> float:
    """Median per-launch microseconds of ``fn(i)`` for i in range(launches), captured in one CUDA
    graph (decode-sized kernels run inside graphs, so host launch overhead is excluded). ``tries`` > 1: that many
    graphs captured and timed, the smallest median kept (a config's first graph was seen 20% slow: session 21)."""
    if tries > 1:
        return min(graph_time_us(fn, launches, reps) for _ in range(tries))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            fn(i)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / launches)
    return statistics.median(times)


def chain_time_us(step, x0, K: int, launches: int = 20, tries: int = 1) -> tuple[float, torch.Tensor]:
    """Per-launch us of ``step(x, i) -> y`` chained as the layers of a decode step (x_{i+1} = y_i[:, :K]) in one CUDA
    graph (graph_time_us, ``tries`` graphs), and the chain's last y."""
    state = {"x": x0, "y": None}

    def fn(i):
        y = step(state["x"], i)
        state["x"], state["y"] = y[:, :K], y
    return graph_time_us(fn, launches=launches, tries=tries), state["y"]


def autotune_lines(report) -> list[str]:
    """One line per autotuned kernel of a compile report: kernel, shape, winner and every candidate's ms."""
    return [f"{t.get('kernel', '')[:48]} {t.get('shape')} -> {t.get('winner')} "
            f"{ {k: round(v, 4) for k, v in t.get('ms', {}).items() if isinstance(v, float)} }"
            for t in report.autotune]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        return float("inf")
    return ((o - r).norm() / r.norm()).item()


class Results:
    def __init__(self, name: str):
        import triton

        self.name = name
        self.meta = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
        }
        self.rows: list[dict] = []

    def add(self, workload: str, impl: str, metric: str, value: float, unit: str):
        self.rows.append({"workload": workload, "impl": impl, "metric": metric, "value": value, "unit": unit})
        print(f"{workload:<28} {impl:<10} {metric:<14} {value:>12.4g} {unit}", flush=True)

    def write(self, out_dirs, notes: list[str] | None = None) -> None:
        """JSON + markdown table in each directory; ``notes`` lines are appended to the markdown."""
        doc = dict(self.meta, rows=self.rows)
        md = [f"# {self.name}", "", f"device: {self.meta['device']}; torch {self.meta['torch']}; triton {self.meta['triton']}; "
              f"date {self.meta['date']}", f"command: `{self.meta['command']}`", "",
              "| workload | impl | metric | value | unit |", "|---|---|---|---|---|"]
        md += [f"| {r['workload']} | {r['impl']} | {r['metric']} | {r['value']:.4g} | {r['unit']} |" for r in self.rows]
        for d in out_dirs:
            if not d:
                continue
            d = Path(d)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{self.name}.json").write_text(json.dumps(doc, indent=1))
            (d / f"{self.name}.md").write_text("\n".join(md + (notes or [])) + "\n")


def sweep_shapes(name: str, header: list[str], shapes: dict, probe_shape) -> None:
    """A probe's main: ``probe_shape(res, lines, t0, workload, N, K)`` for each (workload, (N, K)) of
    ``shapes``, seeded once, the CUDA cache emptied between shapes; the rows it adds go to the results file
    ``name`` (``PROBE_NAME`` overrides) with its table lines (after ``header``) under "## Sweep"."""
    t0 = time.time()
    res = Results(os.environ.get("PROBE_NAME", name))
    lines = list(header)
    torch.manual_seed(0)
    for wl, (N, K) in shapes.items():
        probe_shape(res, lines, t0, wl, N, K)
        torch.cuda.empty_cache()
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


def bf16_baseline(N: int, K: int, M: int = 1) -> tuple[list, torch.Tensor, int, float]:
    """The GEMV / small-M GEMM probes' setup: bf16 weights [N, K] (x 0.02) in enough copies to span > 200 MB
    (every rotating launch reads HBM), M rows of x, and bf16 cuBLAS's per-launch us over them
    (graph_time_us). Returns (weights, x, copies, us)."""
    copies = max(2, -(-200_000_000 // (N * K * 2)))
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    return ws, x, copies, graph_time_us(lambda i: torch.mm(x, ws[i % copies].t(), out=y))


def gemv_probe_start(res, lines: list, t0: float, wl: str, N: int, K: int):
    """A GEMV probe's shape: the bf16 baseline (bf16_baseline, M = 1) recorded, and ``row(what, cfg_name, us,
    nbytes)``, which records a variant's time and TB/s of its bytes and prints its table line (columns:
    workload, what, config, us, TB/s, x bf16). Returns (weights, x, copies, bf16 us, row)."""
    wb, x, copies, bf = bf16_baseline(N, K)
    res.add(wl, "bf16", "time", bf, "us")
    lines.append(f"| {wl} | bf16 | cuBLAS | {bf:.2f} | {N * K * 2 / bf / 1e6:.2f} | 1.00 |")

    def row(what, cfg_name, us, nbytes):
        res.add(wl, f"{what}[{cfg_name}]", "time", us, "us")
        res.add(wl, f"{what}[{cfg_name}]", "tbps", nbytes / us / 1e6, "TB/s")
        lines.append(f"| {wl} | {what} | {cfg_name} | {us:.2f} | {nbytes / us / 1e6:.2f} | {bf / us:.2f} |")
        print(lines[-1], f"[{time.time() - t0:.0f}s]", flush=True)
    return wb, x, copies, bf, row


def out_dirs() -> list:
    return [Path(__file__).parent / "results", os.environ.get("OUT")]
