"""One-call H100 probe: quantized GEMVs in a dependent chain, with the weight prefetched under programmatic dependent
launch (PDL), against bf16 cuBLAS in the same chain.

A decode step is a chain of small kernels, each reading the previous one's output. A weight does not depend on
the previous kernel, so a kernel launched with PDL can fetch its first weight tiles while the kernel before it still
runs, and wait (griddepcontrol.wait) only before it reads x and writes anything. ``PREFETCH`` in the Gluon GEMM
(codegen/templates/dequant_gemm_gluon.py) does that: the codes of its first STAGES - 1 steps go out before the wait.

The chain: y_i = x_i @ W_i^T with x_{i+1} = y_i[:, :K] (so every launch really depends on the one before it),
20 launches in one CUDA graph, the weights rotating over > 200 MB of copies (every launch reads HBM), as
bench_quant.py. Measured per launch: bf16 cuBLAS, fxforge's default M = 1 dispatch (no PDL), the Gluon GEMM at
M = 1 without and with PREFETCH. The chains' last outputs with and without PREFETCH must be bit-identical.

``PROBE_SWEEP=1``: words GEMV configs with WAIT instead; ``PROBE_GEMM_M=16,64``: the M-row GEMM chain (the Gluon
GEMM with and without PREFETCH) instead.

Usage (repo root): ``python benchmarks/probe_pdl_chain.py`` -> results/probe_pdl_chain.*
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
from fxforge.runtime import quant_gemm_gluon as qg
from fxforge.runtime import quant_linear as ql

SHAPES = {"gemv_4096x4096_m1": (4096, 4096), "gemv_4096x14336_m1": (14336, 4096)}
FORMATS = os.environ.get("PROBE_FORMATS", "w8a16,w4a16_g128,nvint4,mxfp4").split(",")
# (BLOCK_N, BK, STAGES, warps, splits)
CONFIGS = [(64, 128, 4, 4, 4)] if os.environ.get("PROBE_GEMM") else []
if os.environ.get("PROBE_CONFIGS"):
    CONFIGS = [tuple(int(v) for v in c.split(":")) for c in os.environ["PROBE_CONFIGS"].split(",")]
def gluon_apply(x, q, kf, cfg, prefetch):
    """The Gluon GEMM at M = 1 (config tuple CONFIGS), with or without PREFETCH, and its split-K reduce."""
    out = torch.empty(x.shape[0], q.codes.shape[0], device=x.device, dtype=x.dtype)
    bn, bk, st, w, sk = cfg
    sk, partials = qg.launch(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, out, kf,
                             {"BLOCK_N": bn, "BK": bk, "STAGES": st, "num_warps": w},
                             lambda programs, kb, step, auto: ql._plan_splits(sk, programs, kb, step, out, auto),
                             pdl=True, prefetch=prefetch)
    if sk > 1:
        ql._splitk_reduce(ql.kernels_for("cuda"), partials, None, out, sk, False, True)
    return out


def gemm_chain(res, lines, t0, M, formats) -> None:
    """``PROBE_GEMM_M``: the M-row chain at 4096^2 (bf16 cuBLAS; fxforge's default M > 4 config, the Gluon GEMM,
    with and without PREFETCH)."""
    N = K = 4096
    wl = f"gemm_4096x4096_m{M}"
    copies = max(2, -(-200_000_000 // (N * K * 2)))
    wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
    x0 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bf, _ = chain_time_us(lambda x, i: torch.mm(x, wb[i % copies].t()), x0, K)
    res.add(wl, "bf16[cuBLAS chain]", "time", bf, "us")
    lines.append(f"| {wl} | bf16 | cuBLAS chain | {bf:.2f} | 1.000 | |")
    wb.clear()
    for fmt in formats:
        q0 = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5, fmt)
        qbytes = sum(t.numel() * t.element_size() for t in (q0.codes, q0.scales, q0.zeros) if t is not None)
        qcopies = max(2, -(-200_000_000 // qbytes))
        qts = [q0] + [quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5, fmt)
                      for _ in range(qcopies - 1)]
        cfg = ql.gemm_configs(M, N, K, fmt, False)[0]
        outs = {}
        for pf in (False, True):
            def run(x, i, pf=pf, qts=qts, nc=qcopies, fmt=fmt, cfg=cfg):
                q = qts[i % nc]
                return ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K,
                                             config=dict(cfg, PREFETCH=pf), check=False)
            us, outs[pf] = chain_time_us(run, x0, K)
            res.add(wl, f"{fmt}[default{' PREFETCH' if pf else ''}]", "time", us, "us")
            lines.append(f"| {wl} | {fmt} | default config{' + PREFETCH' if pf else ', PREFETCH off'} | {us:.2f} | "
                         f"{bf / us:.3f} | |")
            print(lines[-1], f"[{time.time() - t0:.0f}s]", flush=True)
        lines.append(f"| {wl} | {fmt} | | | | chain outputs bit-identical: {torch.equal(outs[False], outs[True])} |")
        qts.clear()
        torch.cuda.empty_cache()


def main() -> None:
    t0 = time.time()
    res = Results("probe_pdl_chain" + os.environ.get("PROBE_TAG", ""))
    lines = ["| workload | impl | config | us per launch | x bf16 | note |", "|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    if os.environ.get("PROBE_GEMM_M"):
        for m in os.environ["PROBE_GEMM_M"].split(","):
            gemm_chain(res, lines, t0, int(m), FORMATS)
        res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)
        return
    for wl, (N, K) in SHAPES.items():
        probe_shape(res, lines, t0, wl, N, K)
        torch.cuda.empty_cache()
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


def probe_shape(res, lines, t0, wl, N, K) -> None:
    copies = max(2, -(-200_000_000 // (N * K * 2)))
    # weights scaled so the chain's activations keep their size (y ~ x in norm)
    wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
    x0 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    bf, _ = chain_time_us(lambda x, i: torch.mm(x, wb[i % copies].t()), x0, K)
    bf_iso = graph_time_us(lambda i: torch.mm(x0, wb[i % copies].t()))
    wb.clear()

    def row(impl, name, us, note=""):
        res.add(wl, f"{impl}[{name}]", "time", us, "us")
        lines.append(f"| {wl} | {impl} | {name} | {us:.2f} | {bf / us:.3f} | {note} |")
        print(lines[-1], f"[{time.time() - t0:.0f}s]", flush=True)
    row("bf16", "cuBLAS chain", bf)
    row("bf16", "cuBLAS independent launches", bf_iso)
    for fmt in FORMATS:
        probe_format(fmt, row, lines, wl, N, K, x0, copies)
        torch.cuda.empty_cache()


def probe_format(fmt, row, lines, wl, N, K, x0, copies) -> None:
    kf = ql.kernel_format(fmt)
    # copies spanning > 200 MB of the quantized weight itself (bench_quant.py rotates as many copies as bf16
    # needs: 6 x 8.9 MB = 53 MB for 4-bit codes at 4096^2, about the 50 MB L2; both are timed below)
    q0 = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5, fmt)
    qbytes = sum(t.numel() * t.element_size() for t in (q0.codes, q0.scales, q0.zeros) if t is not None)
    qcopies = max(2, -(-200_000_000 // qbytes))
    qts = [q0] + [quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5, fmt)
                  for _ in range(qcopies - 1)]
    ref = x0.double() @ dequantize(q0).double().t()

    def run_default(x, i, nc=qcopies):
        q = qts[i % nc]
        return ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K, check=False)
    us, _ = chain_time_us(run_default, x0, K)
    row(fmt, "default dispatch", us, f"err {rel_err(run_default(x0, 0), ref):.1e}; {qcopies} copies")
    us, _ = chain_time_us(lambda x, i: run_default(x, i, nc=copies), x0, K)
    row(fmt, "default dispatch, bench_quant's rotation", us, f"{copies} copies")
    # the default config launched with PDL (WAIT: the words GEMV loads its first codes before the wait, the
    # Triton TMA GEMV waits at its start)
    for j, base in enumerate([c for c in ql.gemv_configs(1, N, K, fmt, False) if not c.get("MMA")][:2]):
        for wait in (False, True):
            wcfg = dict(base, WAIT=wait)

            def run_wait(x, i, wcfg=wcfg):
                q = qts[i % qcopies]
                return ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K,
                                             config=dict(wcfg), check=False)
            kind = "TMA" if base.get("TMA") else "words" if base.get("WORDS") else "tile"
            try:
                err = rel_err(run_wait(x0, 0), ref)
                us, _ = chain_time_us(run_wait, x0, K)
                row(fmt, f"config {j} ({kind})" + (" + WAIT (PDL)" if wait else ""), us, f"err {err:.1e}")
            except Exception:  # noqa: BLE001
                print(f"{fmt} WAIT: {traceback.format_exc()[-1500:]}", flush=True)
    if os.environ.get("PROBE_SWEEP"):  # words configs with WAIT: rows, code bytes per row per step, warps, PREFETCH
        gb = 4 * ql.WORDS_ROW_GW if kf["PER_ROW"] else kf["GB"]
        grid = [(bn, kbytes, w, pf) for bn in (8, 16) for kbytes in (256, 512, 1024) for w in (4, 8) for pf in (1, 2)]
        if os.environ.get("PROBE_SWEEP_CFGS"):  # bn:bytes:warps:prefetch,...
            grid = [tuple(int(v) for v in c.split(":")) for c in os.environ["PROBE_SWEEP_CFGS"].split(",")]
        for bn, kbytes, w, pf in grid:
            wcfg = {"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_G": max(kbytes // gb, 1), "WORDS": True,
                    "POST": True, "PREFETCH": pf, "PREFETCH_X": 1, "XT": 1 if kf["ELEM"] <= 2 else 0,
                    "num_warps": w, "num_stages": 1, "WAIT": True}

            def run_s(x, i, wcfg=wcfg):
                q = qts[i % qcopies]
                return ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K,
                                             config=dict(wcfg), check=False)
            try:
                us, _ = chain_time_us(run_s, x0, K)
                row(fmt, f"words n{bn} {kbytes}B w{w} pf{pf} + WAIT", us)
            except Exception:  # noqa: BLE001
                print(f"{fmt} sweep {wcfg}: {traceback.format_exc()[-600:]}", flush=True)
        return
    for cfg in CONFIGS:
        name = "n{} bk{} st{} w{} sk{}".format(*cfg)
        try:
            outs = {}
            for pf in (False, True):
                def run(x, i, cfg=cfg, pf=pf):
                    return gluon_apply(x, qts[i % qcopies], kf, cfg, pf)
                err = rel_err(run(x0, 0), ref)
                us, outs[pf] = chain_time_us(run, x0, K)
                row(f"{fmt} gluon", name + (" PREFETCH" if pf else ""), us, f"err {err:.1e}")
            same = torch.equal(outs[False], outs[True])
            lines.append(f"| {wl} | {fmt} gluon | {name} | | | chain outputs bit-identical: {same} |")
            print(lines[-1], flush=True)
        except Exception:  # noqa: BLE001 -- reported, the sweep goes on
            print(f"{fmt} {name}: {traceback.format_exc()[-1500:]}", flush=True)


if __name__ == "__main__":
    main()
