"""One-call H100 probe for issue 3: sweep the attention template's launch options against SDPA
(dense causal 8K / 32K) and FlexAttention (128 sink + 4096 window at 32K); B=1, 16 heads, D=128, bf16.

    OUT=/some/dir python benchmarks/probe_attention.py      # ~120-190 s including compiles

Variants are (BLOCK_M, BLOCK_N, warps, stages, TMA, LPT, WS, PIPE) tuples, the format of
runtime.attention.LONG_CONFIGS; each runs through the real fxforge.runtime.attention.attention.
A variant that fails to compile or run is reported and skipped. Phases stop starting new variants
at soft deadlines (PROBE_BUDGET_S, default 185 s) and results are rewritten after every variant,
so a run cut short still leaves probe_attention.json/.md in $OUT (default benchmarks/results/).
Risky variants (warp specialization) run last.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()

import fxforge  # noqa: F401
import fxforge.runtime.attention as fx_attn
import torch
import torch.nn.functional as F
from common import Results, rel_err
from fxforge.runtime.attention import attention, block_layout
from triton.testing import do_bench

# PROBE_SMOKE=1: tiny shapes through the CPU interpreter, to check this script's own logic.
SMOKE = os.environ.get("PROBE_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
B, H, D = 1, (2 if SMOKE else 16), 128
SINK, WINDOW = (16, 64) if SMOKE else (128, 4096)
N_SHORT, N_LONG = (256, 320) if SMOKE else (8192, 32768)
BUDGET = float(os.environ.get("PROBE_BUDGET_S", "185"))
OUT = Path(os.environ.get("OUT") or Path(__file__).parent / "results")

# Priority order: the old default (pointer loads) as the baseline, then TMA/LPT isolations, then
# tile/stage sweeps with host descriptors, in-kernel descriptors, and warp specialization last.
VARIANTS = [  # (BLOCK_M, BLOCK_N, warps, stages, TMA, LPT, WS, PIPE); LPT 1: heads interleaved, 2: head-major
    # second H100 probe: the winners of the first (benchmarks/results/probe_attention.md, 1st run:
    # 128x128 TMA2 LPT 543 TFLOP/s at 8K, 128x64 TMA1 LPT 498 at 32K) against head-major order
    (128, 128, 8, 3, 2, 1, False, False),
    (128, 128, 8, 3, 2, 2, False, False),
    (128, 64, 8, 3, 1, 1, False, False),
    (128, 64, 8, 3, 1, 2, False, False),
    (128, 64, 8, 3, 2, 2, False, False),
    (128, 128, 8, 3, 1, 2, False, False),
    (128, 128, 8, 3, 1, 1, False, False),
    (64, 64, 4, 3, 2, 2, False, False),
    (128, 128, 8, 3, 0, 2, False, False),
    (128, 64, 8, 3, 0, 0, False, False),   # the pre-TMA default, for reference
]
WS_VARIANTS = []  # warp specialization lost every row of the first probe (0.68-0.81x SDPA)


def name(v) -> str:
    bm, bn, w, s, tma, lpt, ws, pipe = v
    return f"tma{tma}{('_lpt' + ('2' if lpt == 2 else '')) if lpt else ''}{'_ws' if ws else ''}{'_pipe' if pipe else ''}_{bm}x{bn}_w{w}s{s}"


def blocks(v) -> dict:
    bm, bn, w, s, tma, lpt, ws, pipe = v
    return {"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": D, "num_warps": w, "num_stages": s, "TMA": tma, "LPT": lpt,
            "WS": ws, "PIPE": pipe}


def ms(fn) -> float:
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))  # as bench_attention.py


def elapsed() -> float:
    return time.perf_counter() - T0


def resources() -> str:
    """Registers, spills and shared memory of the kernel compiled for the last launch."""
    ck = fx_attn.LAST_COMPILED
    md = getattr(ck, "metadata", None)
    return f"regs {getattr(ck, 'n_regs', '?')} spills {getattr(ck, 'n_spills', '?')} smem {getattr(md, 'shared', '?')}"


def run_variant(label, fn):
    """(fn() output, seconds incl. compile), or (None, seconds) after printing the error."""
    t = time.perf_counter()
    try:
        out = fn()
        if not SMOKE:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 — a config that fails to compile must not stop the sweep
        print(f"!! {label}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        traceback.print_exc(limit=2)
        return None, time.perf_counter() - t


class Probe:
    def __init__(self):
        self.res = Results("probe_attention")
        self.summary: dict[str, dict] = {}
        self.sdpa: dict[str, float] = {}

    def save(self):
        self.res.write([OUT], notes=["", "Summary (causal: TFLOP/s (x SDPA); sink+window: kernel ms):", ""] + [
            f"- {n}: " + ", ".join(f"{k} {v}" for k, v in row.items()) for n, row in self.summary.items()])

    def causal(self, n: int, wl: str, variants: list, deadline: float):
        res = self.res
        q, k, v = (torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * n * n * D / 2
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if wl not in self.sdpa:
            self.sdpa[wl] = t_sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            res.add(wl, "sdpa", "latency", t_sdpa, "ms")
            res.add(wl, "sdpa", "throughput", flops / t_sdpa / 1e9, "TFLOP/s")
        t_sdpa = self.sdpa[wl]
        for var in variants:
            if elapsed() > deadline * BUDGET:
                print(f"-- {wl}: soft deadline, skipping {name(var)} and later", flush=True)
                break
            label = f"fxforge_{name(var)}"
            out, first = run_variant(f"{wl} {label}", lambda var=var: attention(q, k, v, causal=True, blocks=blocks(var)))
            if out is None:
                continue
            rsrc = resources()
            t, _ = run_variant(f"{wl} {label} timing", lambda var=var: ms(lambda: attention(q, k, v, causal=True, blocks=blocks(var))))
            if t is None:
                continue
            tf = flops / t / 1e9
            err = (out.float() - ref.float()).abs().max().item()
            res.add(wl, label, "latency", t, "ms")
            res.add(wl, label, "throughput", tf, "TFLOP/s")
            res.add(wl, label, "speed_vs_sdpa", t_sdpa / t, "x")
            res.add(wl, label, "max_abs_err_vs_sdpa", err, "abs")
            res.add(wl, label, "rel_err_vs_sdpa", rel_err(out, ref), "rel_err")
            self.summary.setdefault(name(var), {})[wl] = f"{tf:.0f} ({t_sdpa / t:.3f}x; {rsrc})"
            print(f"== {wl} {name(var):<28} {tf:7.1f} TFLOP/s  {t_sdpa / t:.3f}x SDPA  max|err| {err:.2e}  "
                  f"{rsrc}  (first call {first:.1f}s, t={elapsed():.0f}s)", flush=True)
            self.save()

    def sink_window_inputs(self):
        n = N_LONG
        q, k, v = (torch.randn(B, H, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        i, j = torch.arange(n - 256, n, device=DEV)[:, None], torch.arange(n, device=DEV)[None, :]
        vis = (j <= i) & (((i - j) < WINDOW) | (j < SINK))
        ref32 = F.scaled_dot_product_attention(q[:, :, -256:].float(), k.float(), v.float(), attn_mask=vis)
        ref16 = F.scaled_dot_product_attention(q[:, :, -256:], k, v, attn_mask=vis)  # SDPA's own bf16 result
        return q, k, v, ref32, ref16

    def sink_window(self, inputs, variants: list, deadline: float):
        n, wl, res = N_LONG, "attn_sink_window_32k", self.res
        q, k, v, ref32, ref16 = inputs
        if not any(r["impl"] == "sdpa_masked_slice" for r in res.rows):
            res.add(wl, "sdpa_masked_slice", "rel_err_vs_fp32", rel_err(ref16, ref32), "rel_err")
        layouts = {}
        for var in variants:
            if elapsed() > deadline * BUDGET:
                print(f"-- {wl}: soft deadline, skipping {name(var)} and later", flush=True)
                break
            key = (var[0], var[1])
            if key not in layouts:
                layouts[key] = block_layout(n, n, *key, True, SINK, WINDOW, DEV)

            def call(var=var):
                return attention(q, k, v, causal=True, sink=SINK, window=WINDOW, layout=layouts[(var[0], var[1])],
                                 blocks=blocks(var))
            label = f"fxforge_{name(var)}"
            out, first = run_variant(f"{wl} {label}", call)
            if out is None:
                continue
            rsrc = resources()
            t, _ = run_variant(f"{wl} {label} timing", lambda call=call: ms(call))
            if t is None:
                continue
            o = out[:, :, -256:]
            res.add(wl, label, "latency", t, "ms")
            res.add(wl, label, "rel_err_vs_fp32", rel_err(o, ref32), "rel_err")
            res.add(wl, label, "max_abs_err_vs_sdpa", (o.float() - ref16.float()).abs().max().item(), "abs")
            self.summary.setdefault(name(var), {})[wl] = f"{t:.3f} ms ({rsrc})"
            print(f"== {wl} {name(var):<28} {t:.3f} ms  {rsrc}  (first call {first:.1f}s, t={elapsed():.0f}s)", flush=True)
            self.save()

    def flex(self, inputs):
        wl, res = "attn_sink_window_32k", self.res
        q, k, v, ref32, _ = inputs
        try:
            from torch.nn.attention.flex_attention import (
                create_block_mask,
                flex_attention,
            )

            def sink_window(b, h, qi, ki):
                return (ki <= qi) & (((qi - ki) < WINDOW) | (ki < SINK))
            bm = create_block_mask(sink_window, B=None, H=None, Q_LEN=N_LONG, KV_LEN=N_LONG, device=DEV)
            flex = torch.compile(flex_attention)
            o = flex(q, k, v, block_mask=bm)[:, :, -256:]
            t_flex = ms(lambda: flex(q, k, v, block_mask=bm))
            res.add(wl, "flex", "latency", t_flex, "ms")
            res.add(wl, "flex", "rel_err_vs_fp32", rel_err(o, ref32), "rel_err")
            for nm, row in self.summary.items():
                lat = [r["value"] for r in res.rows if r["workload"] == wl and r["impl"] == f"fxforge_{nm}" and r["metric"] == "latency"]
                if lat:
                    res.add(wl, f"fxforge_{nm}", "speed_vs_flex", t_flex / lat[0], "x")
                    row[wl] += f" ({t_flex / lat[0]:.3f}x flex)"
            print(f"== {wl} flex {t_flex:.3f} ms (t={elapsed():.0f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"!! flex attention: {type(e).__name__}: {str(e)[:400]}", flush=True)
        self.save()


def main() -> None:
    fx_attn.STRICT = True  # a TMA/WS config that fails must fail here, not fall back to pointer loads
    p = Probe()
    # Phase deadlines are fractions of BUDGET after which a phase starts no further variant.
    p.causal(N_SHORT, "attn_causal_8k", VARIANTS, 0.30)
    p.causal(N_LONG, "attn_causal_32k", VARIANTS, 0.50)
    inputs = p.sink_window_inputs()
    p.sink_window(inputs, VARIANTS, 0.62)
    if elapsed() < 0.65 * BUDGET and not SMOKE:  # torch.compile of flex: ~20-40 s (previous kernel 2.546 ms)
        p.flex(inputs)
    else:
        print("-- flex skipped (budget or smoke run); previous run: 2.546 ms", flush=True)
    # Warp specialization last: a compiler crash or hang there loses none of the rows above.
    p.sink_window(inputs, WS_VARIANTS, 0.85)
    del inputs
    if not SMOKE:
        torch.cuda.empty_cache()
    p.causal(N_SHORT, "attn_causal_8k", WS_VARIANTS, 0.90)
    p.causal(N_LONG, "attn_causal_32k", WS_VARIANTS, 0.95)
    p.save()
    print("\nSUMMARY (causal: TFLOP/s (x SDPA); sink+window: kernel ms)")
    for nm, row in p.summary.items():
        print(f"{nm:<30} " + "  ".join(f"{k}: {v}" for k, v in row.items()))
    by_name = {name(v): v for v in VARIANTS + WS_VARIANTS}
    for wl in ("attn_causal_8k", "attn_causal_32k", "attn_sink_window_32k"):
        lat = {r["impl"][len("fxforge_"):]: r["value"] for r in p.res.rows
               if r["workload"] == wl and r["impl"].startswith("fxforge_") and r["metric"] == "latency"}
        if lat:
            w = min(lat, key=lat.get)
            print(f"best for {wl}: {w} {lat[w]:.3f} ms -> LONG_CONFIGS tuple {by_name[w]}")
    print(f"total {elapsed():.0f}s; results in {OUT}/probe_attention.json", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available() and not SMOKE:
        sys.exit("probe_attention.py needs a CUDA GPU")
    main()
