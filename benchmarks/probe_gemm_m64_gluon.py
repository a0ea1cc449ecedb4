"""One-call H100 probe: the Gluon dequant GEMM (codegen/templates/dequant_gemm_gluon.py) at M = 64, 4096^2, against
bf16 cuBLAS and fxforge's default M = 64 path (the Triton SWAP tile) in the same run. Issue 4 asks that no format
be slower than bf16 at M = 64; the Triton SWAP tiling's floor with a free decode was 13.4-13.7 us against bf16's
14.5-14.9 (probe_gemm_m64_floor.md).

Each format: the Gluon kernel's error against a float64 reference of the same quantized weight (and the default
path's), at M = 64 and at M = 37 / N = 4000 / K = 4000 (tails), then its time per config (BLOCK_N, BK, STAGES, warps,
K splits). ``nib``: the kernel with the free 4-bit decode (16 + u, no scales: not any format's math) -- the floor
of this schedule. Timed as bench_quant.py (CUDA graph of 20 launches, weights rotating over > 200 MB of copies).

``PROBE_HOST=1``: the host cost of an eager call of the default dispatch instead (no CUDA graph, 1000 calls).

Usage (repo root): ``python benchmarks/probe_gemm_m64_gluon.py`` -> results/probe_gemm_m64_gluon.*
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, bf16_baseline, graph_time_us, out_dirs, rel_err
from fxforge.passes.quant.formats import dequantize, quantize
from fxforge.runtime import quant_gemm_gluon as qg
from fxforge.runtime import quant_linear as ql

M, N, K = int(os.environ.get("PROBE_M", "64")), 4096, 4096  # PROBE_M: other row counts (e.g. 16, 32)
FORMATS = os.environ.get("PROBE_FORMATS", "nvint4,mxint8,nvfp4,mxfp4,w4a16_g128").split(",")
# (BLOCK_N, BK, STAGES, warps, splits)
CONFIGS = [(64, 128, 4, 4, 4), (64, 128, 4, 4, 2), (64, 256, 3, 4, 4), (128, 128, 4, 8, 4), (64, 64, 6, 4, 4),
           (64, 128, 6, 4, 8)]
if os.environ.get("PROBE_CONFIGS"):
    CONFIGS = [tuple(int(v) for v in c.split(":")) for c in os.environ["PROBE_CONFIGS"].split(",")]


def gluon_apply(x, q, fmt, cfg, kf=None, splits=None, bias=None):
    kf = kf or ql.kernel_format(fmt)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], q.codes.shape[0], device=x.device, dtype=x.dtype)
    bn, bk, st, w, sk = cfg
    pdl = bool(os.environ.get("PROBE_PDL"))  # the reduce with programmatic dependent launch, signalled early
    asked = sk if splits is None else splits
    sk, partials = qg.launch(x2, q.codes, q.scales, q.zeros, q.tensor_scale, bias, out, kf,
                             {"BLOCK_N": bn, "BK": bk, "STAGES": st, "num_warps": w},
                             lambda programs, kb, step, auto: ql._plan_splits(asked, programs, kb, step, out, auto), pdl)
    if sk > 1:
        ql._splitk_reduce(ql.kernels_for("cuda"), partials, bias, out, sk, False, pdl)
    return out


def main() -> None:
    t0 = time.time()
    res = Results("probe_gemm_m64_gluon" + os.environ.get("PROBE_TAG", ""))
    wl = f"gemm_4096x4096_m{M}"
    lines = ["| impl | config | us | x bf16 | err |", "|---|---|---|---|---|"]
    torch.manual_seed(0)
    wb, x, copies, bf = bf16_baseline(N, K, M)
    res.add(wl, "bf16", "time", bf, "us")
    lines.append(f"| bf16 | cuBLAS | {bf:.2f} | 1.00 | |")

    def row(impl, name, us, err=""):
        res.add(wl, f"{impl}[{name}]", "time", us, "us")
        lines.append(f"| {impl} | {name} | {us:.2f} | {bf / us:.3f} | {err} |")
        print(lines[-1], f"[{time.time() - t0:.0f}s]", flush=True)

    if os.environ.get("PROBE_HOST"):  # host cost of an eager call (no CUDA graph): the default dispatch, 1000 calls
        for fmt in FORMATS:
            q = quantize(wb[0], fmt)
            for _ in range(20):
                ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(1000):
                ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K)
            host = (time.perf_counter() - t1) * 1e3
            torch.cuda.synchronize()
            res.add(wl, f"{fmt}[eager call]", "host_time", host, "us")
            lines.append(f"| {fmt} | eager call, host us per call (1000 calls) | {host:.1f} | | |")
            print(lines[-1], flush=True)
        res.write(out_dirs(), notes=["", "## Host cost of an eager call", ""] + lines)
        return
    for fmt in FORMATS:
        kf = ql.kernel_format(fmt)
        qts = [quantize(w, fmt) for w in wb]
        ref = x.double() @ dequantize(qts[0]).double().t()
        q0 = qts[0]
        err_d = rel_err(ql.quant_linear_apply(x, q0.codes, q0.scales, q0.zeros, q0.tensor_scale, None, fmt, K), ref)

        def run_default(i, qts=qts, fmt=fmt):
            q = qts[i % copies]
            ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K, check=False)
        row(fmt, "default", graph_time_us(run_default), f"{err_d:.1e}")
        if os.environ.get("PROBE_TRITON"):  # the best Triton tile (the default before the Gluon GEMM)
            tcfg = next(c for c in ql.gemm_configs(M, N, K, fmt, False) if not c.get("GLUON"))

            def run_triton(i, qts=qts, fmt=fmt, tcfg=tcfg):
                q = qts[i % copies]
                ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K, config=dict(tcfg),
                                      check=False)
            row(fmt, "Triton (first non-Gluon config)", graph_time_us(run_triton))
        # tails: M = 37, N = 4000, K = 4000 (the last K step partial, rows past N), with a bias, one split and 3
        try:
            wt = torch.randn(4000, 4000, device="cuda", dtype=torch.bfloat16) * 0.02
            qt = quantize(wt, fmt)
            xt = torch.randn(37, 4000, device="cuda", dtype=torch.bfloat16)
            bt = torch.randn(4000, device="cuda", dtype=torch.bfloat16)
            reft = xt.double() @ dequantize(qt).double().t() + bt.double()
            cfg0 = CONFIGS[0]
            et = max(rel_err(gluon_apply(xt, qt, fmt, cfg0, splits=s, bias=bt), reft) for s in (1, 3))
        except Exception:  # noqa: BLE001 -- reported, the sweep goes on
            print(f"{fmt} tails: {traceback.format_exc()[-1500:]}", flush=True)
            et = float("nan")
        for cfg in CONFIGS:
            name = "n{} bk{} st{} w{} sk{}".format(*cfg)
            try:
                err = rel_err(gluon_apply(x, q0, fmt, cfg), ref)

                def run(i, qts=qts, fmt=fmt, cfg=cfg, kf=kf):
                    gluon_apply(x, qts[i % copies], fmt, cfg, kf)
                row(f"{fmt} gluon", name, graph_time_us(run), f"{err:.1e} (tails {et:.1e})")
            except Exception:  # noqa: BLE001
                print(f"{fmt} {name}: {traceback.format_exc()[-1500:]}", flush=True)
        if fmt == FORMATS[0]:  # the schedule's floor: the free decode on these codes
            kfree = dict(kf, ELEM=9, HAS_TS=False)
            for cfg in CONFIGS[:3]:
                try:
                    def run(i, qts=qts, fmt=fmt, cfg=cfg, kfree=kfree):
                        gluon_apply(x, qts[i % copies], fmt, cfg, kfree)
                    row("nib gluon (free decode)", "n{} bk{} st{} w{} sk{}".format(*cfg), graph_time_us(run))
                except Exception:  # noqa: BLE001
                    print(f"nib {cfg}: {traceback.format_exc()[-1500:]}", flush=True)
        del qts
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


if __name__ == "__main__":
    main()
