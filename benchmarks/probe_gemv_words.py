"""One-call H100 probe of the words GEMV (codegen/templates/dequant_gemv_words.py) after the mask decode
and register prefetch (session 10): M = 1, 4096 x 4096 and 14336 x 4096 ("4096x14336"), the integer
formats that take the mask decode (w8a16, w4a16 g128, nvint4, mxint8) and the fp4 ones (shift decode,
prefetch only), over a grid of (BLOCK_N, code bytes per row per step, warps, PREFETCH depth, maxnreg); bf16 cuBLAS in the
same run as the baseline. Timing exactly as bench_quant.py: one CUDA graph of 20 launches, weights
rotating over > 200 MB of copies so every launch reads HBM. Every row carries its error against the
float64 reference of the same quantized math (the kernel's own correctness is tested on the CPU).

Usage (repo root): ``python benchmarks/probe_gemv_words.py`` -> $OUT and benchmarks/results/probe_gemv_words.*
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bf16_baseline, graph_time_us, rel_err, sweep_shapes
from fxforge.passes.quant.formats import dequantize, quantize
from fxforge.runtime import quant_linear as ql

SHAPES = {"gemv_4096x4096_m1": (4096, 4096), "gemv_4096x14336_m1": (14336, 4096)}
FORMATS = [f for f in ["w8a16", "w4a16_g128", "w4a16_g64", "nvint4", "mxint8", "mxfp4", "nvfp4"]
           if f in os.environ.get("PROBE_FORMATS", "w4a16_g128,w4a16_g64,nvint4,mxfp4,nvfp4" if os.environ.get("PROBE_PLANES") == "1"
                                  else "w8a16,w4a16_g128,nvint4,mxint8,mxfp4,nvfp4").split(",")]
# (BLOCK_N, code bytes per row per step, warps, PREFETCH depth, PREFETCH_X, XT). Round 8
# (session 11; r5 found PREFETCH_X worth 5-15%, r6 the defaults, r7 nothing more in tiles / warps): XT, x
# loaded as [word, group, element] (lanes in the words' order: 126 -> 96 registers, 343 -> 326 instructions
# per w4a16 step on triton 3.6): the [group, row, word] tile layout (several rows per thread share one conversion of x), the per-plane
# exponent decode (x unscaled) and PREFETCH_X (x and the group scales / zero points of the next step loaded
# with its words). The loop-pipeline knob LOOP_STAGES those rounds also swept (slower everywhere) is gone from
# the kernel. Rounds 1-4: git history, results/probe_gemv_words*.
GRID4 = [(16, 512, 4, 1, 1, 0), (16, 512, 4, 1, 1, 1), (16, 256, 4, 1, 1, 0), (16, 256, 4, 1, 1, 1),
         (8, 512, 4, 1, 1, 1), (16, 256, 2, 1, 1, 1), (32, 256, 8, 1, 1, 1), (16, 1024, 8, 1, 1, 1)]
GRID8 = [(16, 1024, 8, 1, 1, 0), (16, 1024, 8, 1, 1, 1), (16, 256, 4, 1, 1, 0), (16, 256, 4, 1, 1, 1),
         (8, 512, 4, 1, 1, 1), (16, 512, 4, 1, 1, 1), (8, 256, 2, 1, 1, 1), (32, 256, 8, 1, 1, 1)]
SHORT = {"nvint4", "mxint8", "mxfp4", "nvfp4"}  # first 8 grid points only
# Round 9 (session 12, PROBE_KSPAN=1; built without a GPU): dequant_gemv_kspan (lanes and warps over K, rows in
# registers, x loaded in the codes' layout: no shared-memory conversion; offline sm_90 SASS w4a16 4.9
# instructions per element vs 5.5) next to the words default. (BLOCK_N, Q runs, WPT words per run, warps,
# PREFETCH); WPT is capped at the words per scale group.
KSPAN = os.environ.get("PROBE_KSPAN") == "1"
# Round 10 (session 14, PROBE_REGS=1): occupancy and waves. At 14336 rows the 16-row default is 896 programs;
# triton 3.6 gives w4a16 127 registers (4 programs per SM: 1.70 waves), nvint4 / mxfp4 / nvfp4 93-95 (5: 1.36
# waves), w8a16 / mxint8 58-64 (8: one wave). A register cap (maxnreg) buys programs per SM (80: 6, 64: 8) at
# the price of spills (w4a16 16 rows: 40 B at 80, 104 B at 64; 8 rows: none down to 64).
REGS = os.environ.get("PROBE_REGS") == "1"
REGS_GRID = [(16, None), (16, 96), (16, 80), (16, 72), (16, 64), (8, None), (8, 80), (8, 64)]
# Round 11 (session 14, PROBE_PLANES=1; built without a GPU): dequant_gemv_planes, the w4a16 family on the
# tensor cores (codegen/templates/dequant_gemv_planes.py: nibble planes decoded by inline PTX, ~1 instruction
# per code; offline sm_90 loops 2.7-3.9 instructions per element vs the words GEMV's 5.4) next to the words
# default. (BLOCK_N, warps, stages, SPLIT_K or None: auto)
PLANES = os.environ.get("PROBE_PLANES") == "1"
PLANES_GRID = [(32, 1, 3, None), (32, 1, 2, None), (64, 1, 3, None), (64, 2, 3, None), (32, 2, 3, None),
               (16, 1, 3, None), (64, 4, 3, None), (128, 4, 3, None), (32, 1, 3, 2), (32, 1, 3, 4), (64, 2, 3, 2)]
KSPAN_GRID = [(8, 128, 4, 4, 1), (8, 128, 4, 4, 0), (16, 128, 2, 4, 1), (8, 128, 2, 4, 1), (8, 256, 2, 8, 1),
              (16, 64, 2, 2, 1), (4, 128, 4, 4, 1), (8, 64, 4, 2, 1)]


def time_config(x, args, fmt, K, cfg, copies) -> float:
    """Per-launch us of one config, weights rotating over ``copies``."""
    def run(i):
        c, s, z, t = args[i % copies]
        ql.quant_linear_apply(x, c, s, z, t, None, fmt, K, config=dict(cfg), check=False)
    return graph_time_us(run)


def probe_shape(res, lines, t0, wl, N, K) -> None:
    ws, x, copies, bf = bf16_baseline(N, K)
    res.add(wl, "bf16", "time", bf, "us")
    lines.append(f"| {wl} | bf16 | cuBLAS | {bf:.2f} | 1.00 | {ql.bytes_model('bf16', N, K, 1)['expected_us'] / bf:.3f} | |")
    for fmt in FORMATS:
        qts = [quantize(w, fmt) for w in ws]
        args = [(q.codes, q.scales, q.zeros, q.tensor_scale) for q in qts]
        ref = x.double() @ dequantize(qts[0]).double().t()
        kf = ql.kernel_format(fmt)
        gb = 4 * ql.WORDS_ROW_GW if kf["PER_ROW"] else kf["GB"]
        grid = GRID4 if kf["EPB"] == 2 else GRID8
        if fmt in SHORT:
            grid = grid[:8]
        impl = fmt.split("_")[0]
        cands = []
        for bn, kbytes, w, pf, pfx, xt in grid:
            cfg = {"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_G": max(kbytes // gb, 1), "WORDS": True, "POST": True,
                   "PREFETCH": pf, "PREFETCH_X": pfx, "XT": xt, "num_warps": w, "num_stages": 1}
            cands.append((f"n{bn} kb{kbytes} w{w} pf{pf}{'x' if pfx else ''}{' xt' if xt else ''}", cfg))
        if KSPAN:
            gw = 4 if kf["PER_ROW"] else kf["GB"] // 4
            cands = [("words default", next(c for c in ql.gemv_configs(1, N, K, fmt, False) if c.get("WORDS")))]
            for bn, q, wpt, w, pf in KSPAN_GRID:
                wpt = min(wpt, gw)
                cands.append((f"kspan n{bn} q{q} wpt{wpt} w{w} pf{pf}",
                              {"BLOCK_M": 1, "BLOCK_N": bn, "Q": q, "WPT": wpt, "WORDS": True, "KSPAN": True,
                               "PREFETCH": pf, "num_warps": w, "num_stages": 1}))
        if PLANES:
            cands = [("words default", next(c for c in ql.gemv_configs(1, N, K, fmt, False) if c.get("WORDS")))]
            for bn, w, st, sk in PLANES_GRID:
                cfg = {"PLANES": True, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                if sk:
                    cfg["SPLIT_K"] = sk
                cands.append((f"planes n{bn} w{w} s{st}" + (f" sk{sk}" if sk else ""), cfg))
            if ql.kernel_format(fmt)["SCALE"] != 0:  # block formats: bytes per step (default 64)
                for sb in (32, 128):
                    cands.append((f"planes n32 w1 s3 step{sb}", {"PLANES": True, "BLOCK_N": 32, "num_warps": 1,
                                                                 "num_stages": 3, "STEP_B": sb}))
        if REGS:
            base = next(c for c in ql.gemv_configs(1, N, K, fmt, False) if c.get("WORDS"))
            cands = [(f"default n{bn}" + (f" r{regs}" if regs else ""),
                      dict(base, BLOCK_N=bn, **({"maxnreg": regs} if regs else {}))) for bn, regs in REGS_GRID]
        for name, cfg in cands:
            try:
                err = rel_err(ql.quant_linear_apply(x, *args[0], None, fmt, K, config=dict(cfg)), ref)
                us = time_config(x, args, fmt, K, cfg, copies)
            except Exception as e:  # noqa: BLE001 — a failing config is reported, the sweep goes on
                print(f"{wl} {fmt} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                traceback.print_exc(limit=2)
                continue
            frac = ql.bytes_model(fmt, N, K, 1)["expected_us"] / us
            res.add(wl, f"{impl}[{name}]", "time", us, "us")
            res.add(wl, f"{impl}[{name}]", "speedup_vs_bf16", bf / us, "x")
            res.add(wl, f"{impl}[{name}]", "fraction_of_hbm", frac, "ratio")
            res.add(wl, f"{impl}[{name}]", "rel_err_vs_quant_ref", err, "rel_err")
            lines.append(f"| {wl} | {impl} | {name} | {us:.2f} | {bf / us:.2f} | {frac:.3f} | {err:.2e} |")
            print(lines[-1], f"[{time.time() - t0:.0f}s]", flush=True)


def main() -> None:
    sweep_shapes("probe_gemv_kspan" if KSPAN else "probe_gemv_regs" if REGS else "probe_gemv_planes" if PLANES
                 else "probe_gemv_words", ["| workload | impl | config | us | x bf16 | frac HBM | rel err vs quant ref |", "|---|---|---|---|---|---|---|"],
                 SHAPES, probe_shape)


if __name__ == "__main__":
    main()
