"""Winograd F(4,3)/F(6,3) vs cuDNN direct convolution on a VGG-style layer (issue 5 speed rows).

Layer: N=32, C=K=256, 56×56, 3×3, pad 1, fp16. The fxforge path is the unfused pipeline of
runtime/winograd.py (Triton input transform → cuBLAS bmm over α² positions → Triton output
transform) with the library's fp16-error-optimal points. Launch blocks: the first BENCH_CONFIGS
(default 2) entries of runtime.winograd.CONFIGS[(layout, m)] (best guess first, ordered by
benchmarks/probe_winograd.py) are timed and the fastest is reported; a config that fails is skipped.
Reported: latency, direct-convolution TFLOP/s equivalent, bytes moved by the model in
runtime/winograd.py, achieved GB/s, the ratio to cuDNN, and errors against an fp32 direct
convolution (cuDNN fp32 with TF32 off) next to cuDNN fp16's own error. NCHW rows are `winograd`;
channels-last input (and output) rows are `winograd_channels_last` next to `cudnn_channels_last`.
"""
from __future__ import annotations

import dataclasses
import os

import fxforge
import torch
import torch.nn.functional as F
from common import Results, out_dirs, rel_err, time_cuda
from fxforge.config import DEFAULT_PASSES
from fxforge.passes.winograd import library
from fxforge.runtime.winograd import CONFIGS, WinogradConv2d
from torch import nn
from triton.testing import do_bench_cudagraph

N, C, K, HW = 32, 256, 256, 56
TRY = int(os.environ.get("BENCH_CONFIGS", "2"))


def ms(fn) -> float:
    """GPU time inside a CUDA graph, for every impl alike: compiled programs replay static shapes as
    one graph, so the host cost of launching three kernels (vs cuDNN's one) is not the kernels' cost."""
    return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))


def compiled_program(w, b, x, passes):
    """nn.Conv2d compiled by fxforge (its own CUDA graph) with ``passes`` (None: the default pipeline)."""
    conv = nn.Conv2d(C, K, 3, padding=1).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return fxforge.compile(conv, (x,), passes=passes) if passes else fxforge.compile(conv, (x,))


def fastest(w, b, transform, x, layout: str, m: int):
    """(ms, conv, config) of the fastest of the first TRY configs for this layout."""
    best = None
    for cfg in CONFIGS[(layout, m)][:TRY]:
        cfg = dataclasses.replace(cfg, layout=layout)
        try:
            conv = WinogradConv2d(w, b, transform, padding=1, config=cfg)
            conv(x)
            t = ms(lambda conv=conv: conv(x))
        except Exception as e:  # noqa: BLE001
            print(f"config {cfg.label()} failed: {type(e).__name__}: {e}")
            continue
        print(f"F({m},3) {layout} {cfg.label()}: {t:.4f} ms")
        if best is None or t < best[0]:
            best = (t, conv, cfg)
    return best


def main() -> None:
    torch.backends.cudnn.benchmark = True
    res = Results("winograd_gpu")
    torch.manual_seed(0)
    x = torch.randn(N, C, HW, HW, device="cuda", dtype=torch.float16)
    w = torch.randn(K, C, 3, 3, device="cuda", dtype=torch.float16) / 48
    b = torch.randn(K, device="cuda", dtype=torch.float16)
    torch.backends.cudnn.allow_tf32 = False
    ref = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    torch.backends.cudnn.allow_tf32 = True
    # The product path, both ways through the same compiled program (input copy into the CUDA graph,
    # output clone): the winograd_conv pass vs the default pipeline, where the convolution is an
    # ATen (cuDNN) step. Their ratio is what the pass buys inside fxforge.
    t_prog = {}
    for impl, passes in (("winograd_pass", [*DEFAULT_PASSES, "winograd_conv", "dce"]), ("fxforge_cudnn", None)):
        try:
            prog = compiled_program(w, b, x, passes)
            with torch.no_grad():
                for _ in range(3):
                    out = prog(x)
                torch.cuda.synchronize()
                t_prog[impl] = time_cuda(prog, x, warmup=5, reps=50)
            res.add("conv3x3_n32_c256_56_fp16_F4", impl, "latency", t_prog[impl], "ms")
            res.add("conv3x3_n32_c256_56_fp16_F4", impl, "rel_err_vs_fp32", rel_err(out, ref), "rel_err")
            print(impl, "cuda graph:", prog.report.cuda_graph, "library calls:", prog.report.library_calls)
        except Exception as e:  # noqa: BLE001 — the kernel rows are still worth recording
            print(f"compiled {impl} failed: {type(e).__name__}: {e}")
    flops = 2 * 9 * N * K * C * HW * HW
    xs = {"nchw": x, "nhwc": x.to(memory_format=torch.channels_last)}
    ws = {"nchw": w, "nhwc": w.to(memory_format=torch.channels_last)}
    t_cudnn = {lay: ms(lambda lay=lay: F.conv2d(xs[lay], ws[lay], b, padding=1)) for lay in xs}
    err_cudnn = {lay: rel_err(F.conv2d(xs[lay], ws[lay], b, padding=1), ref) for lay in xs}
    suffix = {"nchw": "", "nhwc": "_channels_last"}
    for m in (4, 6):
        name = f"conv3x3_n32_c256_56_fp16_F{m}"
        for lay in xs:
            res.add(name, "cudnn" + suffix[lay], "latency", t_cudnn[lay], "ms")
            res.add(name, "cudnn" + suffix[lay], "throughput", flops / t_cudnn[lay] / 1e9, "TFLOP/s")
            res.add(name, "cudnn" + suffix[lay], "rel_err_vs_fp32", err_cudnn[lay], "rel_err")
        entry = library.found(m, 3)
        std = WinogradConv2d(w, b, library.standard(m, 3).transform(), padding=1)
        res.add(name, "winograd_standard_points", "rel_err_vs_fp32", rel_err(std(x), ref), "rel_err")
        for lay, xl in xs.items():
            impl = "winograd" + suffix[lay]
            found = fastest(w, b, entry.transform(), xl, lay, m)
            if found is None:
                continue
            t, conv, cfg = found
            err = rel_err(conv(xl), ref)
            a = m + 2
            P = N * (-(-HW // m)) ** 2
            nbytes = 2 * (N * C * HW * HW + 2 * a * a * C * P + 2 * a * a * K * P + N * K * HW * HW + a * a * K * C)
            res.add(name, impl, "latency", t, "ms")
            res.add(name, impl, "throughput", flops / t / 1e9, "TFLOP/s")
            res.add(name, impl, "bytes_model", nbytes, "bytes")
            res.add(name, impl, "achieved_bandwidth", nbytes / t / 1e6, "GB/s")
            res.add(name, impl, "speed_vs_cudnn", t_cudnn["nchw"] / t, "x")
            res.add(name, impl, "speed_vs_cudnn_same_layout", t_cudnn[lay] / t, "x")
            res.add(name, impl, "rel_err_vs_fp32", err, "rel_err")
            res.add(name, impl, "err_ratio_vs_cudnn", err / err_cudnn["nchw"], "x")
            res.add(name, impl, "points", float(len(entry.points)), "count")
            print(name, impl, "points", entry.points, "config", cfg.label())
    if "winograd_pass" in t_prog:
        res.add("conv3x3_n32_c256_56_fp16_F4", "winograd_pass", "speed_vs_cudnn", t_cudnn["nchw"] / t_prog["winograd_pass"], "x")
        if "fxforge_cudnn" in t_prog:
            res.add("conv3x3_n32_c256_56_fp16_F4", "winograd_pass", "speed_vs_fxforge_cudnn",
                    t_prog["fxforge_cudnn"] / t_prog["winograd_pass"], "x")
    res.write(out_dirs())


if __name__ == "__main__":
    main()
