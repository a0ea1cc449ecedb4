"""Decode-step benchmark (issue 3, row ``decoder_decode_b1``): one token at batch 1 through the
853M Llama-style decoder (``fxforge.models.llama_decoder_853m``, random init, bf16) with a static
KV cache of 2048 positions (``fxforge.models.KVCacheLlama``), the new token at position 1024.

Impls, same run: eager; Inductor ``mode="reduce-overhead"`` (CUDA graphs; cache buffers marked
static, as HF's StaticCache does); fxforge AOT (``fxforge.compile``; its own CUDA graph).
Bytes model: every weight is read once per step except the embedding table (one row):
1.574 GB in bf16, plus the KV cache (16 layers x 2 x 8 heads x 2048 x 64 x 2 B = 67 MB) read
once by attention. Ceiling: HBM 3.0 TB/s -> 0.547 ms. Reported: latency, tokens/s, weight
traffic in TB/s, speedup vs Inductor, and the logits' error against an fp32 eager reference.

Usage: ``python benchmarks/bench_decode.py [--reps N]`` -> results/decode_gpu.{json,md}
"""
from __future__ import annotations

import argparse
import time

import fxforge
import torch
from common import Results, out_dirs, rel_err, time_cuda
from fxforge.models import KVCacheLlama, TinyLlama, llama_decoder_853m

POS = 1024
MAX_SEQ = 2048


def build(dtype, batch: int = 1):
    torch.manual_seed(0)
    base = TinyLlama(**llama_decoder_853m()).eval()
    model = KVCacheLlama(base, batch=batch, max_seq=MAX_SEQ).cuda().to(dtype).eval()
    # A filled cache: positions < POS hold random keys/values, as after a prefill.
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, buf in model.named_buffers():
        if "_cache" in name:
            buf.normal_(generator=g)
            buf[:, :, POS:].zero_()
    return model


def run_inductor(model, ids, pos, reps):
    """Inductor ``mode="reduce-overhead"`` (CUDA graphs) with the cache buffers marked static, as HF's
    StaticCache does: (ms per step, cold compile s, fp32 logits of one more step)."""
    for name, buf in model.named_buffers():
        if "_cache" in name:
            torch._dynamo.mark_static_address(buf)
    t = time.perf_counter()
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(3):  # cudagraph trees record on the 2nd/3rd call
        out = compiled(ids, pos)
    torch.cuda.synchronize()
    cold = time.perf_counter() - t
    ms = time_cuda(compiled, ids, pos, reps=reps)
    out = compiled(ids, pos).float()
    del compiled
    torch._dynamo.reset()
    return ms, cold, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    res = Results("decode_gpu")
    wl = "decoder_decode_b1"
    ids = torch.randint(0, 32000, (1, 1), device="cuda")
    pos = torch.tensor([POS], device="cuda")
    with torch.no_grad():
        ref = build(torch.float32)(ids, pos).float()
    torch.cuda.empty_cache()
    model = build(torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    kv_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "_cache" in n)
    res.add(wl, "model", "weight_bytes_read", weight_bytes, "bytes")
    res.add(wl, "model", "kv_cache_bytes", kv_bytes, "bytes")
    times = {}
    with torch.no_grad():
        out = model(ids, pos)
        res.add(wl, "eager", "rel_err_vs_fp32", rel_err(out.float(), ref), "rel_err")
        times["eager"] = time_cuda(model, ids, pos, reps=a.reps)

        times["inductor"], cold, out = run_inductor(model, ids, pos, a.reps)
        res.add(wl, "inductor", "compile_cold", cold, "s")
        res.add(wl, "inductor", "rel_err_vs_fp32", rel_err(out, ref), "rel_err")

        try:
            t = time.perf_counter()
            compiled = fxforge.compile(model, (ids, pos))
            out = compiled(ids, pos)
            torch.cuda.synchronize()
            res.add(wl, "fxforge", "compile_cold", time.perf_counter() - t, "s")
            res.add(wl, "fxforge", "rel_err_vs_fp32", rel_err(out.float(), ref), "rel_err")
            times["fxforge"] = time_cuda(compiled, ids, pos, reps=a.reps)
            rep = compiled.report
            res.add(wl, "fxforge", "kernel_launches", rep.num_kernels, "count")
            res.add(wl, "fxforge", "fallbacks", len(rep.fallbacks), "count")
            print(rep.render(), flush=True)
        except Exception as e:  # noqa: BLE001 — the baselines are still worth recording
            import traceback

            traceback.print_exc()
            print(f"fxforge failed: {type(e).__name__}: {e}", flush=True)
    for impl, ms in times.items():
        res.add(wl, impl, "latency", ms, "ms")
        res.add(wl, impl, "throughput", 1e3 / ms, "tok/s")
        res.add(wl, impl, "weight_traffic", weight_bytes / (ms * 1e-3) / 1e12, "TB/s")
        res.add(wl, impl, "fraction_of_hbm", (weight_bytes + kv_bytes) / (ms * 1e-3) / 3.0e12, "ratio")
    if "fxforge" in times:
        for impl in ("eager", "inductor"):
            res.add(wl, "fxforge", f"speedup_vs_{impl}", times[impl] / times["fxforge"], "x")
    res.write(out_dirs())


if __name__ == "__main__":
    main()
