"""GPU probe for the Winograd pass (issue 5 speed row): per-launch breakdown and a block-size sweep.

Layer: N=32, C=K=256, 56×56, 3×3, pad 1, fp16 (the VGG-style layer of bench_winograd.py).
For F(4,3) and F(6,3) with the library's fp16-error-optimal points, and for NCHW and channels-last
inputs, this times, through the real runtime (fxforge.runtime.winograd):

* the input transform for every WinogradConfig in runtime.winograd.CONFIGS[(layout, m)]
  (GB/s by the bytes model: read x + write V),
* the cuBLAS bmm over the α² tile positions (TFLOP/s by 2·α²·K·C·P; GB/s by V + M + U),
* the output transform for every config (GB/s: read M + write y + bias),
* the whole pipeline with the best input and best output blocks (and the default, CONFIGS[0]; for NCHW
  outputs both store forms, per element and joined tile rows (out_rows), are swept),
  plain and captured in a CUDA graph, against cuDNN (F.conv2d, NCHW and channels-last), with the
  relative error of each against an fp32 direct convolution (cuDNN fp32 with TF32 off).

One call, hard budget: PROBE_BUDGET_S (default 120) seconds of wall time from the start; configs
left when it runs out are skipped (printed), the pipeline rows and the files are still written.
A failing config prints its error and the sweep continues.

    python benchmarks/probe_winograd.py          # ~60-100 s on an H100 (mostly Triton compiles)

Writes probe_winograd.json / .md (benchmarks/common.py format; workloads
conv3x3_n32_c256_56_fp16_F4 / _F6; impls cudnn, cudnn_channels_last, winograd_<layout>[_<config>])
to $OUT, default benchmarks/results/.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

T0 = time.time()
BUDGET = float(os.environ.get("PROBE_BUDGET_S", "120"))

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import fxforge  # noqa: F401
from common import Results, graph_time_us, rel_err
from fxforge.passes.winograd import library
from fxforge.runtime import winograd as wr
from triton.testing import do_bench

DRY = os.environ.get("PROBE_DRY") == "1"  # CPU smoke test of this script (interpreter, tiny layer)
N, C, K, HW, PAD = (2, 8, 8, 10, 1) if DRY else (32, 256, 256, 56, 1)
DEV = "cpu" if DRY else "cuda"
MS = [int(v) for v in os.environ.get("PROBE_M", "4,6").split(",")]
LAYOUTS = os.environ.get("PROBE_LAYOUTS", "nchw,nhwc").split(",")


def left() -> float:
    return BUDGET - (time.time() - T0)


def ms(fn) -> float:
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def fail(what: str, e: BaseException) -> None:
    print(f"  FAILED {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    traceback.print_exc(limit=2)


def in_sweep(cfgs: list) -> list:
    """The distinct input-transform blocks of a CONFIGS list, in order."""
    seen, out = set(), []
    for c in cfgs:
        if (c.in_p, c.in_c, c.in_warps) not in seen:
            seen.add((c.in_p, c.in_c, c.in_warps))
            out.append(c)
    return out


def out_sweep(cfgs: list, layout: str) -> list:
    """The distinct output-transform blocks of a CONFIGS list, in order; for NCHW also the default
    block with the other out_rows setting (per-element stores vs joined tile rows)."""
    cand = list(cfgs)
    if layout == "nchw":
        cand.insert(1, dataclasses.replace(cfgs[0], out_rows=not cfgs[0].out_rows))
    seen, out = set(), []
    for c in cand:
        key = (c.out_p, c.out_k, c.out_warps, c.out_rows and layout == "nchw")
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def probe(res: Results, table: list, notes: list, name: str, m: int, layout: str, ctx: dict) -> None:
    """Sweep the input and output blocks of one (m, layout), time the bmm and the whole pipeline."""
    x, U, b, ref, g, entry, pts, scaling = (ctx[k] for k in ("x", "U", "b", "ref", "g", "entry", "pts", "scaling"))
    cudnn, t_ref, flops = ctx["cudnn"], ctx["t_ref"], ctx["flops"]
    in_bytes, gemm_flops, gemm_bytes, out_bytes = ctx["in_bytes"], ctx["gemm_flops"], ctx["gemm_bytes"], ctx["out_bytes"]
    xl = x
    base = f"winograd_{layout}"
    cfgs = wr.CONFIGS[(layout, m)]
    print(f"[{time.time() - T0:5.1f}s] F({m},3) {layout}: points {entry.points}, {left():.0f} s of budget left", flush=True)
    # input transform sweep
    V0, best_in = None, None
    Vbuf = None
    for cfg in in_sweep(cfgs):
        tag = f"in{cfg.in_p}x{cfg.in_c}w{cfg.in_warps}"
        if left() < 0:
            print(f"  skip {tag} (budget)")
            continue
        try:
            V = wr.input_transform(xl, m, pts, PAD, layout, cfg, scaling)
            if not DRY:
                torch.cuda.synchronize()
            if V0 is None:
                V0, Vbuf = V, torch.empty_like(V)
            err = rel_err(V, V0)
            tm = ms(lambda cfg=cfg, out=Vbuf: wr.input_transform(xl, m, pts, PAD, layout, cfg, scaling, out=out))
        except Exception as e:  # noqa: BLE001
            fail(f"F{m} {layout} {tag}", e)
            continue
        gbs = in_bytes / tm / 1e6
        flag = "" if err < 1e-3 else f"  MISMATCH vs first config: {err:.3g}"
        table.append(f"F{m} {layout:4s} input  {tag:14s} {tm * 1e3:8.1f} us {gbs:7.0f} GB/s{flag}")
        print("  " + table[-1], flush=True)
        res.add(name, f"{base}_{tag}", "in_transform_latency", tm, "ms")
        res.add(name, f"{base}_{tag}", "in_transform_bandwidth", gbs, "GB/s")
        if not flag and (best_in is None or tm < best_in[0]):
            best_in = (tm, cfg)
    if V0 is None:
        return
    # calibration: a plain device copy of V (read + write the same bytes) in this harness
    if layout == LAYOUTS[0]:
        try:
            tc = ms(lambda: Vbuf.copy_(V0))
            cbytes = 2 * V0.numel() * V0.element_size()
            table.append(f"F{m} {layout:4s} copy   {'V.copy_':14s} {tc * 1e3:8.1f} us {cbytes / tc / 1e6:7.0f} GB/s (harness ceiling)")
            print("  " + table[-1], flush=True)
            res.add(name, "copy_V", "latency", tc, "ms")
            res.add(name, "copy_V", "achieved_bandwidth", cbytes / tc / 1e6, "GB/s")
        except Exception as e:  # noqa: BLE001
            fail("copy", e)
    # GEMM
    try:
        M0 = wr.winograd_gemm(U, V0, layout)
        tg = ms(lambda: wr.winograd_gemm(U, V0, layout))
        table.append(f"F{m} {layout:4s} bmm    {'cuBLAS':14s} {tg * 1e3:8.1f} us {gemm_flops / tg / 1e9:7.0f} TFLOP/s "
                     f"{gemm_bytes / tg / 1e6:6.0f} GB/s")
        print("  " + table[-1], flush=True)
        res.add(name, f"{base}_bmm", "gemm_latency", tg, "ms")
        res.add(name, f"{base}_bmm", "gemm_throughput", gemm_flops / tg / 1e9, "TFLOP/s")
        res.add(name, f"{base}_bmm", "gemm_bandwidth", gemm_bytes / tg / 1e6, "GB/s")
    except Exception as e:  # noqa: BLE001
        fail(f"F{m} {layout} bmm", e)
        return
    # output transform sweep
    best_out = None
    for cfg in out_sweep(cfgs, layout):
        tag = f"out{cfg.out_p}x{cfg.out_k}w{cfg.out_warps}{'r' if cfg.out_rows and layout == 'nchw' else ''}"
        if left() < 0:
            print(f"  skip {tag} (budget)")
            continue
        try:
            y = wr.output_transform(M0, b, g, layout, cfg, pts, scaling)
            err = rel_err(y, ref)
            tm = ms(lambda cfg=cfg: wr.output_transform(M0, b, g, layout, cfg, pts, scaling))
        except Exception as e:  # noqa: BLE001
            fail(f"F{m} {layout} {tag}", e)
            continue
        gbs = out_bytes / tm / 1e6
        flag = "" if err < 0.05 else f"  WRONG: rel err {err:.3g}"
        table.append(f"F{m} {layout:4s} output {tag:14s} {tm * 1e3:8.1f} us {gbs:7.0f} GB/s  err {err:.3g}{flag}")
        print("  " + table[-1], flush=True)
        res.add(name, f"{base}_{tag}", "out_transform_latency", tm, "ms")
        res.add(name, f"{base}_{tag}", "out_transform_bandwidth", gbs, "GB/s")
        if not flag and (best_out is None or tm < best_out[0]):
            best_out = (tm, cfg)
    if best_in is None or best_out is None:
        return
    # whole pipeline: best blocks, and the default (first config) when different
    bi, bo = best_in[1], best_out[1]
    best = wr.WinogradConfig(bi.in_p, bi.in_c, bi.in_warps, bo.out_p, bo.out_k, bo.out_warps, layout, bo.out_rows)
    variants = [("", best)]
    notes.append(f"- suggest CONFIGS[({layout!r}, {m})][0] = {dataclasses.replace(best, layout='auto')!r}")
    print("  " + notes[-1][2:], flush=True)
    d = dataclasses.replace(cfgs[0], layout=layout)
    if d != best:
        variants.append(("_default", d))
    for suffix, cfg in variants:
        impl = base + suffix
        def fn(cfg=cfg):
            return wr.winograd_apply(xl, U, b, m, pts, PAD, scaling, config=cfg)

        try:
            y = fn()
            err = rel_err(y, ref)
            tp = ms(fn)
        except Exception as e:  # noqa: BLE001
            fail(f"F{m} {impl} pipeline", e)
            continue
        try:
            if DRY:
                raise RuntimeError("no CUDA graphs in the dry run")
            tgraph = graph_time_us(lambda i, fn=fn: fn(), launches=5, reps=5) / 1e3
        except Exception as e:  # noqa: BLE001
            fail(f"F{m} {impl} cuda graph", e)
            tgraph = float("nan")
        t_same = cudnn.get(layout, t_ref)[0]
        nbytes = in_bytes + gemm_bytes + out_bytes
        res.add(name, impl, "latency", tp, "ms")
        res.add(name, impl, "latency_cuda_graph", tgraph, "ms")
        res.add(name, impl, "throughput", flops / tp / 1e9, "TFLOP/s")
        res.add(name, impl, "bytes_model", nbytes, "bytes")
        res.add(name, impl, "achieved_bandwidth", nbytes / tp / 1e6, "GB/s")
        res.add(name, impl, "speed_vs_cudnn", t_ref[0] / tp, "x")
        res.add(name, impl, "speed_vs_cudnn_same_layout", t_same / tp, "x")
        res.add(name, impl, "rel_err_vs_fp32", err, "rel_err")
        res.add(name, impl, "err_ratio_vs_cudnn", err / t_ref[1], "x")
        line = (f"F{m} {layout:4s} pipeline{suffix or ' (best)'} {cfg.label()}: {tp * 1e3:.1f} us "
                f"(graph {tgraph * 1e3:.1f} us) = {t_ref[0] / tp:.2f}x cuDNN NCHW, {t_same / tp:.2f}x cuDNN {layout}; "
                f"rel err {err:.3g} ({err / t_ref[1]:.2f}x cuDNN's)")
        table.append(line)
        notes.append("- " + line)
        print("  " + line, flush=True)


def main() -> None:
    torch.backends.cudnn.benchmark = True
    res = Results("probe_winograd")
    notes: list[str] = ["", "## best configs", ""]
    table: list[str] = []
    torch.manual_seed(0)
    x = torch.randn(N, C, HW, HW, device=DEV, dtype=torch.float16)
    w = torch.randn(K, C, 3, 3, device=DEV, dtype=torch.float16) / 48
    b = torch.randn(K, device=DEV, dtype=torch.float16)
    torch.backends.cudnn.allow_tf32 = False
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=PAD).float() if DRY else \
        F.conv2d(x.float(), w.float(), b.float(), padding=PAD)
    torch.backends.cudnn.allow_tf32 = True
    xs = {"nchw": x, "nhwc": x.to(memory_format=torch.channels_last)}
    flops = 2 * 9 * N * K * C * HW * HW

    cudnn = {}
    for layout, impl in (("nchw", "cudnn"), ("nhwc", "cudnn_channels_last")):
        wl = w if layout == "nchw" else w.to(memory_format=torch.channels_last)
        xl = xs[layout]
        try:
            cudnn[layout] = (ms(lambda xl=xl, wl=wl: F.conv2d(xl, wl, b, padding=PAD)),
                             rel_err(F.conv2d(xl, wl, b, padding=PAD), ref))
        except Exception as e:  # noqa: BLE001
            fail(impl, e)
    print(f"[{time.time() - T0:5.1f}s] cuDNN: " + ", ".join(f"{k} {v[0]:.4f} ms" for k, v in cudnn.items()), flush=True)
    t_ref = cudnn.get("nchw", (float("nan"), float("nan")))

    for m in MS:
        name = f"conv3x3_n32_c256_56_fp16_F{m}"
        for layout, impl in (("nchw", "cudnn"), ("nhwc", "cudnn_channels_last")):
            if layout in cudnn:
                res.add(name, impl, "latency", cudnn[layout][0], "ms")
                res.add(name, impl, "throughput", flops / cudnn[layout][0] / 1e9, "TFLOP/s")
                res.add(name, impl, "rel_err_vs_fp32", cudnn[layout][1], "rel_err")
        entry = library.found(m, 3)
        t = entry.transform()
        pts, scaling = " ".join(t.points_str()), t.scaling
        U = wr.filter_transform(w, t)
        g = wr.Geometry(N, C, HW, HW, K, m, PAD)
        a, P = g.alpha, g.P
        in_bytes = 2 * (N * C * HW * HW + a * a * C * P)
        gemm_flops = 2 * a * a * K * C * P
        gemm_bytes = 2 * (a * a * C * P + a * a * K * P + a * a * K * C)
        out_bytes = 2 * (a * a * K * P + N * K * HW * HW + K)
        ctx = {"U": U, "b": b, "ref": ref, "g": g, "entry": entry, "pts": pts, "scaling": scaling, "cudnn": cudnn,
               "t_ref": t_ref, "flops": flops, "in_bytes": in_bytes, "gemm_flops": gemm_flops, "gemm_bytes": gemm_bytes,
               "out_bytes": out_bytes}
        for layout in LAYOUTS:
            probe(res, table, notes, name, m, layout, {**ctx, "x": xs[layout]})

    print("\n== summary ==")
    print("cuDNN: " + ", ".join(f"{k} {v[0] * 1e3:.1f} us (rel err {v[1]:.3g})" for k, v in cudnn.items()))
    print("\n".join(table))
    print(f"total wall {time.time() - T0:.1f} s")
    out = os.environ.get("OUT") or str(Path(__file__).parent / "results")
    if DRY and not os.environ.get("OUT"):
        out = "/tmp/probe_winograd_dry"
    res.write([out], notes + ["", "## all launches", "", "```"] + table + ["```"])
    print("wrote", Path(out) / "probe_winograd.json")


if __name__ == "__main__":
    main()
