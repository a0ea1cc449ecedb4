"""One-call H100 probe: the Gluon 4-bit GEMV (codegen/templates/dequant_gemv_gluon.py), which fetches its whole slice
of the weight into shared memory before griddepcontrol.wait, against fxforge's default M = 1 dispatch (the words GEMV
with WAIT) and bf16 cuBLAS, all in the same run.

Timing as bench_quant.py: 20 launches in one CUDA graph over weights rotating through > 200 MB of copies of the
quantized format itself; ``time`` = independent launches, ``chain`` = dependent ones (x_{i+1} = y_i[:, :K]).
Every config is checked against a float64 reference of the dequantized weight, and against the default dispatch.

Usage (repo root): ``python benchmarks/probe_gemv_gluon.py`` -> results/probe_gemv_gluon.*
(``PROBE_CFGS=bn:bg:stages:warps:splits,...`` replaces the sweep; ``PROBE_TAG`` suffixes the result name)
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, chain_time_us, graph_time_us, out_dirs, rel_err
from fxforge.passes.quant.formats import dequantize, quantize
from fxforge.runtime import quant_gemv_gluon as qgv
from fxforge.runtime import quant_linear as ql

SHAPES = {"gemv_4096x4096_m1": (4096, 4096), "gemv_4096x14336_m1": (14336, 4096)}
FMT = os.environ.get("PROBE_FMT", "w4a16_g128")
# (BLOCK_N, BG, STAGES, warps, splits)
CFGS = [(16, 8, 4, 4, 1), (32, 8, 4, 4, 1), (32, 8, 4, 8, 1), (16, 16, 2, 4, 1), (64, 8, 4, 8, 1), (16, 8, 2, 4, 1),
        (32, 8, 2, 4, 1), (16, 8, 8, 4, 1)]
if os.environ.get("PROBE_CFGS"):
    CFGS = [tuple(int(v) for v in c.split(":")) for c in os.environ["PROBE_CFGS"].split(",")]


def gluon_apply(x, q, kf, cfg, wait):
    bn, bg, st, w, sk = cfg
    out = torch.empty(x.shape[0], q.codes.shape[0], device=x.device, dtype=x.dtype)
    sk, partials = qgv.launch(x, q.codes, q.scales, q.zeros, None, out, kf,
                              {"BLOCK_N": bn, "BG": bg, "STAGES": st, "num_warps": w},
                              lambda programs, kb, step: ql._plan_splits(sk, programs, kb, step, out), pdl=True,
                              wait=wait)
    if sk > 1:
        ql._splitk_reduce(ql.kernels_for("cuda"), partials, None, out, sk, False, True)
    return out


def main() -> None:
    t0 = time.time()
    res = Results("probe_gemv_gluon" + os.environ.get("PROBE_TAG", ""))
    lines = ["| workload | impl | config | time us | chain us | time x bf16 | note |", "|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    kf = ql.kernel_format(FMT)
    for wl, (N, K) in SHAPES.items():
        copies = max(2, -(-200_000_000 // (N * K * 2)))
        wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
        x0 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        bf = graph_time_us(lambda i: torch.mm(x0, wb[i % copies].t()))
        bfc, _ = chain_time_us(lambda x, i: torch.mm(x, wb[i % copies].t()), x0, K)
        wb.clear()

        def row(impl, name, us, usc, note=""):
            res.add(wl, f"{impl}[{name}]", "time", us, "us")
            res.add(wl, f"{impl}[{name}]", "time_chain", usc, "us")
            lines.append(f"| {wl} | {impl} | {name} | {us:.2f} | {usc:.2f} | {bf / us:.3f} | {note} |")
            print(lines[-1], f"[{time.time() - t0:.0f}s]", flush=True)
        row("bf16", "cuBLAS", bf, bfc)
        q0 = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5, FMT)
        qbytes = sum(t.numel() * t.element_size() for t in (q0.codes, q0.scales, q0.zeros) if t is not None)
        qc = max(2, -(-200_000_000 // qbytes))
        qts = [q0] + [quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5, FMT)
                      for _ in range(qc - 1)]
        ref = x0.double() @ dequantize(q0).double().t()

        def run_default(x, i):
            q = qts[i % qc]
            return ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, FMT, K, check=False)
        y_def = run_default(x0, 0)
        row(FMT, "default dispatch", graph_time_us(lambda i: run_default(x0, i)), chain_time_us(run_default, x0, K)[0],
            f"err {rel_err(y_def, ref):.1e}")
        for cfg in CFGS:
            for wait in (True, False):
                name = "n{} bg{} st{} w{} sk{}".format(*cfg) + (" WAIT" if wait else "")
                try:
                    def run(x, i, cfg=cfg, wait=wait):
                        return gluon_apply(x, qts[i % qc], kf, cfg, wait)
                    y = run(x0, 0)
                    torch.cuda.synchronize()
                    note = f"err {rel_err(y, ref):.1e}, vs default {rel_err(y, y_def):.1e}"
                    row(f"{FMT} gluon", name, graph_time_us(lambda i, run=run: run(x0, i)), chain_time_us(run, x0, K)[0],
                        note)
                except Exception:  # noqa: BLE001 -- reported, the sweep goes on
                    print(f"{name}: {traceback.format_exc()[-1500:]}", flush=True)
        qts.clear()
        torch.cuda.empty_cache()
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


if __name__ == "__main__":
    main()
