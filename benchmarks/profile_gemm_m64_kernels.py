"""Where the M = 64 dequant GEMM's time goes: the main kernel vs the split-K reduce (one H100 call).

For every format at 4096 x 4096, M = 64, with the default config (runtime/quant_linear.py gemm_configs):
the per-launch time of the whole op inside a CUDA graph of 20 launches (weights rotating over > 200 MB of
copies, as bench_quant.py), and under torch.profiler the mean device time of each kernel the op launches
(``dequant_gemm`` and, with K splits, ``dequant_splitk_reduce``); bf16 cuBLAS in the same run.

Usage (repo root): ``python benchmarks/profile_gemm_m64_kernels.py`` -> $OUT and
benchmarks/results/profile_gemm_m64_kernels.*
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, graph_time_us, out_dirs
from fxforge.passes.quant.formats import quantize
from fxforge.runtime import quant_linear as ql

FORMATS = ["w8a16", "w4a16_g128", "mxint8", "mxfp4", "nvfp4", "nvint4"]


def kernel_times(fn, copies: int) -> dict:
    """Mean device microseconds per launch of each kernel ``fn`` launches (torch.profiler)."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(40):
            fn(i % copies)
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time
            count[ev.name] += 1
    return {name: total[name] / 40 for name in total}


def main() -> None:
    N = K = 4096
    M = 64
    res = Results("profile_gemm_m64_kernels")
    lines = ["| impl | graph us | kernel | device us per launch |", "|---|---|---|---|"]
    copies = max(2, -(-200_000_000 // (N * K * 2)))
    torch.manual_seed(0)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    wl = "gemm_4096x4096_m64"
    bf = graph_time_us(lambda i: torch.mm(x, ws[i % copies].t(), out=y))
    res.add(wl, "bf16", "time", bf, "us")
    for name, us in kernel_times(lambda i: torch.mm(x, ws[i].t(), out=y), copies).items():
        lines.append(f"| bf16 | {bf:.2f} | {name[:60]} | {us:.2f} |")
    for fmt in FORMATS:
        qts = [quantize(w, fmt) for w in ws]
        impl = fmt.split("_")[0]
        cfg = ql.triton_gemm_configs(M, N, K, fmt, False)[0]

        def run(i, qts=qts, fmt=fmt):
            q = qts[i % copies]
            ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K, check=False)
        us = graph_time_us(run)
        res.add(wl, impl, "time", us, "us")
        for name, kus in kernel_times(run, copies).items():
            short = "reduce" if "reduce" in name else ("main" if "dequant" in name else name[:40])
            res.add(wl, impl, f"kernel_{short}", kus, "us")
            lines.append(f"| {impl} | {us:.2f} | {name[:60]} | {kus:.2f} |")
        lines.append(f"| {impl} | | config | {cfg} |")
        print("\n".join(lines[-4:]), flush=True)
        del qts
        torch.cuda.empty_cache()
    res.write(out_dirs(), notes=["", "## Kernels", ""] + lines)


if __name__ == "__main__":
    main()
