"""Decode tokens/s with quantized weights (issue 4, rows ``decode_tokens_b1`` / ``decode_tokens_b16``).

The 853M Llama-style decoder of ``bench_decode.py`` (random init, bf16, static KV cache of 2048
positions, the new token at position 1024), one decode step at batch 1 and 16, weights in:

- fxforge: ``bf16`` (default pipeline), ``w8a16`` and ``w4a16`` (= w4a16_g128): the ``quantize`` pass
  after the default pipeline (q|k|v and gate|up already merged), default filter: every linear but
  ``lm_head`` (kept bf16, as usual and as in the baselines). fxforge's own CUDA graph.
- Inductor (``mode="reduce-overhead"``, cache buffers static): ``inductor`` on the bf16 model;
  ``inductor_w8a16`` with torchao's int8 weight-only form (``int8_weight_only``: the linear computes
  ``(x @ W_int8.to(x.dtype).T) * scale``, left to Inductor to fuse); ``inductor_w4a16`` with torchao's
  ``int4_weight_only`` kernel (tinygemm ``aten._weight_int4pack_mm``, group 128, asymmetric with a
  float zero point) where this torch build has it — otherwise a row says why it is missing.
- eager bf16 (reference point).

Bytes model per step: every weight once (lm_head in bf16 for all; the quantized layers at their
packed size incl. scales) + the KV cache read by attention (batch x 67 MB). Reported: latency (ms),
tokens/s (= batch / latency), the speedup against Inductor with the same weight format, and the
logits' error against the fp32 eager model with unquantized weights.

Usage: ``python benchmarks/bench_decode_tokens.py [--batches 1 16] [--reps N]`` ->
results/decode_tokens_gpu.{json,md}
"""
from __future__ import annotations

import argparse
import gc
import time

import fxforge
import torch
import torch.nn.functional as F
from bench_decode import POS, build, run_inductor
from common import Results, out_dirs, rel_err, time_cuda
from fxforge.config import DEFAULT_PASSES
from fxforge.passes.quant.quantize_pass import Quantize, default_filter
from torch import nn

GROUP = 128


class Int8WeightOnlyLinear(nn.Module):
    """torchao ``int8_weight_only``: symmetric per-output-channel int8, dequantized in the matmul's
    input expression, which Inductor may fuse."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("w_int8", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.bias = lin.bias

    def forward(self, x):
        y = F.linear(x, self.w_int8.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


class Int4TinygemmLinear(nn.Module):
    """torchao ``int4_weight_only`` (group 128): asymmetric uint4 codes with a bf16 scale and float zero
    per group, packed for tinygemm (``aten._weight_int4pack_mm``): w = (q - 8) * scale + zero."""

    def __init__(self, lin: nn.Linear, inner_k_tiles: int = 8):
        super().__init__()
        w = lin.weight.detach().float()
        n, k = w.shape
        g = w.view(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        zero = lo + 8 * scale
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.register_buffer("w_packed", torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles))
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # [K/group, N, 2]
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.bias = lin.bias
        self.n = n

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, shape[-1]), self.w_packed, GROUP,
                                               self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.n)
        return y if self.bias is None else y + self.bias


def swap_linears(model: nn.Module, make) -> nn.Module:
    """Replace every nn.Linear the fxforge default filter would quantize (all but lm_head)."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and default_filter(full, child.weight):
                setattr(mod, child_name, make(child))
    return model


def step_bytes(model: nn.Module) -> int:
    """Bytes of parameters and non-cache buffers read per step (embedding: one row, ignored)."""
    total = 0
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed" in n or "_cache" in n or "rope" in n:
            continue
        total += t.numel() * t.element_size()
    return total


def bench_batch(res: Results, batch: int, reps: int, inductor_quant: bool) -> None:
    wl = f"decode_tokens_b{batch}"
    ids = torch.randint(0, 32000, (batch, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    pos = torch.tensor([POS], device="cuda")
    with torch.no_grad():
        ref = build(torch.float32, batch)(ids, pos).float()
    gc.collect()
    torch.cuda.empty_cache()
    model = build(torch.bfloat16, batch)
    kv_read = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "_cache" in n) * POS / model.max_seq
    times: dict[str, float] = {}

    def record(impl, ms, out, wbytes, cold=None):
        times[impl] = ms
        res.add(wl, impl, "latency", ms, "ms")
        res.add(wl, impl, "tokens_per_s", batch * 1e3 / ms, "tok/s")
        res.add(wl, impl, "weight_bytes", wbytes, "bytes")
        res.add(wl, impl, "fraction_of_hbm", (wbytes + kv_read) / (ms * 1e-3) / 3.0e12, "ratio")
        res.add(wl, impl, "rel_err_vs_fp32", rel_err(out, ref), "rel_err")
        if cold is not None:
            res.add(wl, impl, "compile_cold", cold, "s")

    with torch.no_grad():
        out = model(ids, pos).float()
        record("eager", time_cuda(model, ids, pos, reps=5), out, step_bytes(model))
        ms, cold, out = run_inductor(model, ids, pos, reps)
        record("inductor", ms, out, step_bytes(model), cold)
        for fmt, impl in (("bf16", "bf16"), ("w8a16", "w8a16"), ("w4a16_g128", "w4a16")):
            # The same model (weights and filled cache) for every format: the quantize pass packs
            # copies of the weights into the compiled program and leaves the module untouched.
            try:
                quant = None if fmt == "bf16" else Quantize(format=fmt)
                passes = DEFAULT_PASSES if quant is None else [*DEFAULT_PASSES, quant]
                t = time.perf_counter()
                compiled = fxforge.compile(model, (ids, pos), passes=passes)
                out = compiled(ids, pos)
                torch.cuda.synchronize()
                cold = time.perf_counter() - t
                ms = time_cuda(compiled, ids, pos, reps=reps)
                wbytes = step_bytes(model)
                if quant is not None:
                    wbytes += sum(r["bytes_after"] - r["bytes_before"] for r in quant.layers)
                record(impl, ms, out.float(), wbytes, cold)
                res.add(wl, impl, "kernel_launches", compiled.report.num_kernels, "count")
                res.add(wl, impl, "fallbacks", len(compiled.report.fallbacks), "count")
                del compiled
            except Exception as e:  # noqa: BLE001 — the other formats are still worth recording
                import traceback

                traceback.print_exc()
                print(f"fxforge {fmt} failed: {type(e).__name__}: {e}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        if inductor_quant:
            for impl, make in (("inductor_w8a16", Int8WeightOnlyLinear), ("inductor_w4a16", Int4TinygemmLinear)):
                try:
                    qm = swap_linears(build(torch.bfloat16, batch), make)
                    ms, cold, out = run_inductor(qm, ids, pos, reps)
                    record(impl, ms, out, step_bytes(qm), cold)
                    del qm
                except Exception as e:  # noqa: BLE001 — e.g. no tinygemm kernel in this build
                    print(f"{impl} unavailable: {type(e).__name__}: {e}", flush=True)
                    res.add(wl, impl, "unavailable", 1, "flag")
                gc.collect()
                torch.cuda.empty_cache()
    for impl, base in (("bf16", "inductor"), ("w8a16", "inductor_w8a16"), ("w4a16", "inductor_w4a16"),
                       ("w8a16", "inductor"), ("w4a16", "inductor")):
        if impl in times and base in times:
            res.add(wl, impl, f"speedup_vs_{base}", times[base] / times[impl], "x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip-inductor-quant", action="store_true")
    a = ap.parse_args()
    # one file per batch set, so batch 1 and 16 can run in separate device calls without overwriting
    res = Results("decode_tokens_gpu" + ("" if a.batches == [1, 16] else "_b" + "_".join(map(str, a.batches))))
    for batch in a.batches:
        bench_batch(res, batch, a.reps, not a.skip_inductor_quant)
        gc.collect()
        torch.cuda.empty_cache()
    res.write(out_dirs())


if __name__ == "__main__":
    main()
