"""A decode step with KIVI in the runtime's decode path (issue 4: the KV cache "used by the runtime's decode
attention"): the ``kivi_cache`` pass turns KVCacheLlama's static cache into KIVI state appended on the device.

Model: a 4-layer slice of the 853M decoder (hidden 2048, 32 / 8 heads, head dim 64, ffn 5632), bf16, static
cache of MAX_SEQ = 8192 tokens of which POS = 8000 hold random keys / values (as after a prefill; the KIVI
state is filled with the same tokens through ``KIVIDecodeCache.append``). One decode step at POS, batch 1 and 8:
eager, Inductor (reduce-overhead, static cache), fxforge on the bf16 cache, fxforge + kivi_cache 2- and 4-bit
(G = 32, R = 128, bf16 scales). Reported per impl: step latency, tokens/s, KV bytes, error of the logits vs
the fp32 eager model on the float cache (KIVI's includes its quantization error).
Usage: ``python benchmarks/bench_kivi_decode.py`` -> results/kivi_decode_gpu.{json,md};
``--smoke``: a tiny model on the CPU interpreter (checks the script, no timings worth reading).
"""
from __future__ import annotations

import argparse
import gc
import time

import fxforge
import torch
from common import Results, out_dirs, rel_err, time_cuda
from fxforge.config import DEFAULT_PASSES
from fxforge.models import KVCacheLlama, TinyLlama, llama_decoder_853m
from fxforge.passes.quant.kv_pass import KIVIKVCache

from bench_decode import run_inductor


def build(cfg: dict, batch: int, max_seq: int, pos: int, dtype, device):
    torch.manual_seed(0)
    model = KVCacheLlama(TinyLlama(**cfg).eval(), batch=batch, max_seq=max_seq).to(device).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(1)
    for name, buf in model.named_buffers():
        if "_cache" in name:
            buf.normal_(generator=g)
            buf[:, :, pos:].zero_()
    return model


def kv_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "_cache" in n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.smoke:
        cfg = {"vocab": 64, "dim": 128, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 96, "max_seq": 256}
        max_seq, pos, batches, device, reps = 256, 200, (1,), "cpu", 1
    else:
        cfg = dict(llama_decoder_853m(), n_layers=4, max_seq=8192)
        max_seq, pos, batches, device, reps = 8192, 8000, (1, 8), "cuda", args.reps
    res = Results("kivi_decode_gpu" if not args.smoke else "kivi_decode_smoke")

    def timer(f, *a, reps):
        if device == "cuda":
            return time_cuda(f, *a, reps=reps)
        t = time.perf_counter()  # smoke run: one call, wall time
        f(*a)
        return (time.perf_counter() - t) * 1e3
    for batch in batches:
        wl = f"decode_{cfg['n_layers']}l_ctx{pos}_b{batch}"
        ids = torch.randint(0, cfg["vocab"], (batch, 1), device=device, generator=torch.Generator(device).manual_seed(0))
        posv = torch.tensor([pos], device=device)
        with torch.no_grad():
            ref = build(cfg, batch, max_seq, pos, torch.float32, device)(ids, posv).float()
        gc.collect()
        model = build(cfg, batch, max_seq, pos, torch.bfloat16 if device == "cuda" else torch.float32, device)
        times = {}

        def record(impl, ms, out, nbytes, cold=None, wl=wl, batch=batch, times=times, ref=ref):
            times[impl] = ms
            res.add(wl, impl, "latency", ms, "ms")
            res.add(wl, impl, "tokens_per_s", batch * 1e3 / ms, "tok/s")
            res.add(wl, impl, "kv_bytes", nbytes, "bytes")
            res.add(wl, impl, "rel_err_vs_fp32", rel_err(out, ref), "rel_err")
            if cold is not None:
                res.add(wl, impl, "compile_cold", cold, "s")

        with torch.no_grad():
            record("eager", timer(model, ids, posv, reps=max(reps // 4, 1)), model(ids, posv).float(), kv_bytes(model))
            if device == "cuda":
                ms, cold, out = run_inductor(model, ids, posv, reps)
                record("inductor", ms, out, kv_bytes(model), cold)
            t = time.perf_counter()
            compiled = fxforge.compile(model, (ids, posv))
            out = compiled(ids, posv).float()
            record("bf16", timer(compiled, ids, posv, reps=reps), out, kv_bytes(model), time.perf_counter() - t)
            del compiled
            for bits in (2, 4):
                kv = KIVIKVCache(bits=bits, group=32, residual=128)
                t = time.perf_counter()
                compiled = fxforge.compile(model, (ids, posv), passes=[*DEFAULT_PASSES, kv])
                assert len(kv.layers) == cfg["n_layers"] and not kv.skipped, kv.skipped
                zeros = torch.zeros(batch, dtype=torch.int32, device=device)
                for i in range(cfg["n_layers"]):  # the prefilled history, as the float cache holds it
                    cache = kv.caches[kv.layers[i]["layer"]]
                    cache.append(getattr(model, f"k_cache{i}")[:, :, :pos], getattr(model, f"v_cache{i}")[:, :, :pos],
                                 zeros)
                out = compiled(ids, posv).float()  # appends token POS (repeated calls rewrite that same slot)
                cold = time.perf_counter() - t
                nbytes = sum(c.nbytes() for c in kv.caches.values())
                record(f"kivi{bits}", timer(compiled, ids, posv, reps=reps), out, nbytes, cold)
                res.add(wl, f"kivi{bits}", "kv_memory_reduction_vs_bf16", kv_bytes(model) / nbytes, "x")
                res.add(wl, f"kivi{bits}", "cuda_graph", float(str(compiled.report.cuda_graph).startswith("captured")),
                        "flag")
                del compiled, kv
                gc.collect()
        for impl in ("bf16", "kivi2", "kivi4"):
            for base in ("eager", "inductor"):
                if impl in times and base in times:
                    res.add(wl, impl, f"speedup_vs_{base}", times[base] / times[impl], "x")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        res.write(out_dirs())  # after each batch: a cut run keeps what it measured


if __name__ == "__main__":
    main()
