"""End-to-end GPU benchmark for issue 2: fxforge vs eager vs torch.compile (Inductor), one run.

Workloads
- ``vit_b16_b64_fp16``: timm ViT-B/16 (random init), batch 64, fp16, 224x224.
- ``decoder_prefill_2048``: the Llama-style decoder of ``fxforge.models.llama_decoder_853m`` (hidden
  2048, 16 layers, GQA 32/8, random init, bf16), one prefill of 2048 tokens at batch 1.

For each impl: median latency (CUDA events), throughput, cold compile seconds, and the relative
error of the output against an fp32 eager reference. Issue 2 sets no speed target; correctness on
the GPU is the criterion. Usage: ``python benchmarks/bench_e2e.py [--only vit|decoder] [--reps N]``.
"""
from __future__ import annotations

import argparse
import time

import fxforge
import torch
from common import Results, out_dirs, rel_err, time_cuda

MATMUL_PEAK = 792e12  # bf16/fp16 cuBLAS 8192^3 measured on the H100 (benchmarks/NOTES.md ceilings)


def measure(res: Results, workload: str, model: torch.nn.Module, inputs: tuple, ref: torch.Tensor,
            items: int, unit: str, reps: int, logits=lambda o: o) -> None:
    impls = {}
    t0 = time.perf_counter()
    impls["eager"] = model
    t = time.perf_counter()
    inductor = torch.compile(model)
    with torch.no_grad():
        inductor(*inputs)
    torch.cuda.synchronize()
    res.add(workload, "inductor", "compile_cold", time.perf_counter() - t, "s")
    impls["inductor"] = inductor
    t = time.perf_counter()
    compiled = fxforge.compile(model, inputs)
    with torch.no_grad():
        compiled(*inputs)
    torch.cuda.synchronize()
    res.add(workload, "fxforge", "compile_cold", time.perf_counter() - t, "s")
    rep = compiled.report
    res.add(workload, "fxforge", "kernel_launches", rep.num_kernels, "count")
    res.add(workload, "fxforge", "fallbacks", len(rep.fallbacks), "count")
    impls["fxforge"] = compiled
    no_graph = fxforge.compile(model, inputs, config=fxforge.Config(cuda_graphs="off"))
    times = {}
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # matmul/attention FLOPs of one forward
        model(*inputs)
    flops = counter.get_total_flops()
    res.add(workload, "model", "flops_per_forward", flops, "FLOP")
    with torch.no_grad():
        for name, fn in impls.items():
            out = logits(fn(*inputs))
            res.add(workload, name, "rel_err_vs_fp32", rel_err(out, ref), "rel_err")
            ms = time_cuda(fn, *inputs, reps=reps)
            times[name] = ms
            res.add(workload, name, "latency", ms, "ms")
            res.add(workload, name, "throughput", items / (ms / 1e3), unit)
            res.add(workload, name, "tflops", flops / (ms / 1e3) / 1e12, "TFLOP/s")
            res.add(workload, name, "fraction_of_matmul_peak", flops / (ms / 1e3) / MATMUL_PEAK, "ratio")
        res.add(workload, "fxforge", "latency_no_cuda_graph", time_cuda(no_graph, *inputs, reps=reps), "ms")
    print(rep.render(), flush=True)
    for kind in ("matmul", "attention"):
        tuned = [t for t in rep.autotune if t["kernel"].startswith(f"fxf_{kind}")]
        for winner in sorted({t["winner"].split("_")[0] for t in tuned}):
            res.add(workload, "fxforge", f"{kind}_{winner}_won", sum(t["winner"].startswith(winner) for t in tuned), "count")
    for name in ("eager", "inductor"):
        res.add(workload, "fxforge", f"speedup_vs_{name}", times[name] / times["fxforge"], "x")
    del impls, inductor, compiled, no_graph
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    print(f"{workload}: total {time.perf_counter() - t0:.1f}s", flush=True)


def bench_vit(res: Results, reps: int) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().eval()
    x = torch.randn(64, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x).float()
    model = model.half()
    measure(res, "vit_b16_b64_fp16", model, (x.half(),), ref, 64, "img/s", reps)


def bench_decoder(res: Results, reps: int) -> None:
    from fxforge.models import TinyLlama, llama_decoder_853m

    torch.manual_seed(0)
    model = TinyLlama(**llama_decoder_853m()).cuda().eval()
    ids = torch.randint(0, llama_decoder_853m()["vocab"], (1, 2048), device="cuda")
    with torch.no_grad():
        ref = model(ids).float()
    model = model.bfloat16()
    measure(res, "decoder_prefill_2048", model, (ids,), ref, 2048, "tok/s", reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["vit", "decoder"], default=None)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    res = Results("e2e_gpu")
    try:
        if a.only in (None, "vit"):
            bench_vit(res, a.reps)
        if a.only in (None, "decoder"):
            bench_decoder(res, a.reps)
    finally:
        res.write(out_dirs())


if __name__ == "__main__":
    main()
