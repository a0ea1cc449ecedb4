"""Winograd F(4,3)/F(6,3) vs cuDNN direct convolution on a VGG-style layer (issue 5 speed rows).

Layer: N=32, C=K=256, 56×56, 3×3, pad 1, fp16. The fxforge path is the unfused baseline of
runtime/winograd.py (Triton input transform → cuBLAS bmm over α² positions → Triton output
transform) with the library's fp16-error-optimal points. Reported: latency, direct-convolution
TFLOP/s equivalent, bytes moved by the model in runtime/winograd.py, achieved GB/s, the ratio to
cuDNN, and errors against an fp32 direct convolution next to cuDNN fp16's own error.
"""
from __future__ import annotations

import fxforge  # noqa: F401
import torch
import torch.nn.functional as F
from common import Results, out_dirs, rel_err
from fxforge.passes.winograd import library
from fxforge.runtime.winograd import WinogradConv2d
from triton.testing import do_bench

N, C, K, HW = 32, 256, 256, 56


def ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def main() -> None:
    torch.backends.cudnn.benchmark = True
    res = Results("winograd_gpu")
    torch.manual_seed(0)
    x = torch.randn(N, C, HW, HW, device="cuda", dtype=torch.float16)
    w = torch.randn(K, C, 3, 3, device="cuda", dtype=torch.float16) / 48
    b = torch.randn(K, device="cuda", dtype=torch.float16)
    ref = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    flops = 2 * 9 * N * K * C * HW * HW
    t_cudnn = ms(lambda: F.conv2d(x, w, b, padding=1))
    err_cudnn = rel_err(F.conv2d(x, w, b, padding=1), ref)
    for m in (4, 6):
        name = f"conv3x3_n32_c256_56_fp16_F{m}"
        res.add(name, "cudnn", "latency", t_cudnn, "ms")
        res.add(name, "cudnn", "throughput", flops / t_cudnn / 1e9, "TFLOP/s")
        res.add(name, "cudnn", "rel_err_vs_fp32", err_cudnn, "rel_err")
        for kind, entry in (("winograd", library.found(m, 3)), ("winograd_standard_points", library.standard(m, 3))):
            conv = WinogradConv2d(w, b, entry.transform(), padding=1)
            y = conv(x)
            err = rel_err(y, ref)
            if kind != "winograd":
                res.add(name, kind, "rel_err_vs_fp32", err, "rel_err")
                continue
            t = ms(lambda: conv(x))
            a = m + 2
            P = N * (-(-HW // m)) ** 2
            nbytes = 2 * (N * C * HW * HW + 2 * a * a * C * P + 2 * a * a * K * P + N * K * HW * HW + a * a * K * C)
            res.add(name, "winograd", "latency", t, "ms")
            res.add(name, "winograd", "throughput", flops / t / 1e9, "TFLOP/s")
            res.add(name, "winograd", "bytes_model", nbytes, "bytes")
            res.add(name, "winograd", "achieved_bandwidth", nbytes / t / 1e6, "GB/s")
            res.add(name, "winograd", "speed_vs_cudnn", t_cudnn / t, "x")
            res.add(name, "winograd", "rel_err_vs_fp32", err, "rel_err")
            res.add(name, "winograd", "err_ratio_vs_cudnn", err / err_cudnn, "x")
            res.add(name, "winograd", "points", float(len(entry.points)), "count")
            print(name, "points", entry.points)
    res.write(out_dirs())


if __name__ == "__main__":
    main()
