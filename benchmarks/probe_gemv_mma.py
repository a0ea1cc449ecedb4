"""Probe: the tensor-core w4a16 GEMV (dequant_gemv_mma: Gluon + inline mma.sync, bf16-pair decode) against the
default dispatch (the words GEMV) and bf16 cuBLAS, M = 1, in the bench's setting (20 launches per CUDA graph,
weights rotating over > 200 MB).

First a correctness pass (GPU only: the kernel is inline PTX): every case against quant_linear.reference (fp32
dequant) and against the default dispatch, at EVEN and masked shapes, bf16 / fp16 x, M = 1..4, bias. Then timings:
``time`` (independent launches, PDL overlap between them as in bench_quant) and ``chain`` (x_{i+1} = y_i).

    python benchmarks/probe_gemv_mma.py            # results/probe_gemv_mma.{json,md}
    PROBE_CFGS="4:1:1:1,8:1:2:1" ...               # warps:QW:PREFETCH:WAIT configs to time (default: a sweep)
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Results, chain_time_us, graph_time_us, out_dirs, rel_err
from fxforge.passes.quant.formats import quantize
from fxforge.runtime import quant_gemv_mma as qm
from fxforge.runtime import quant_linear as ql
from fxforge.runtime.quant_linear import kernel_format, quant_linear_apply, reference

FMT = "w4a16_g128"
TRIES = 2  # every time: the smaller of two captured CUDA graphs (common.graph_time_us; from run r10 on)


def run_mma(x, qt, bias, cfg, pdl=True):
    out = torch.empty(x.shape[0], qt.codes.shape[0], dtype=x.dtype, device=x.device)
    why = qm.why_not(kernel_format(FMT), x, qt.codes, qt.scales, qt.zeros)
    if why:
        raise RuntimeError(why)
    return qm.launch(x, qt.codes, qt.scales, qt.zeros, bias, out, cfg, wait=pdl and bool(cfg.get("WAIT")))


def cfg_of(s: str) -> dict:
    """warps:QW:PREFETCH:WAIT[:AUX[:ADJ]] (AUX default 1, ADJ 0). (Run r6 also had a 7th field, STAGES: the code
    words through a cp.async ring, slower everywhere and removed; run r7 an 8th, TILED: the code addresses of a
    [N / 16, NB, 16, 16 words] tiled layout, a timing experiment with wrong results, also removed.)"""
    v = [int(t) for t in s.split(":")] + [1, 0][len(s.split(":")) - 4:]
    return {"MMA": True, "num_warps": v[0], "QW": v[1], "PREFETCH": v[2], "WAIT": bool(v[3]), "AUX": bool(v[4]),
            "ADJ": bool(v[5])}


def name_of(c: dict) -> str:
    return (f"w{c['num_warps']}_q{c['QW']}_p{c['PREFETCH']}{'_wait' if c['WAIT'] else ''}"
            f"{'' if c.get('AUX', True) else '_noaux'}{'_adj' if c.get('ADJ') else ''}")


def correctness(res, lines):
    lines += ["## Correctness (rel err vs fp32 reference of the same quantized weights; vs the default dispatch)", "",
              "| N | K | M | x | bias | config | rel err vs ref | rel err vs default |", "|---|---|---|---|---|---|---|---|"]
    ok = True
    for (N, K, M, dt, has_bias) in [(4096, 4096, 1, torch.bfloat16, False), (14336, 4096, 1, torch.bfloat16, False),
                                    (1000, 3000, 3, torch.bfloat16, True), (4096, 4096, 2, torch.float16, False),
                                    (48, 1024, 1, torch.bfloat16, True), (4104, 1160, 4, torch.float16, True),
                                    (4096, 14336, 1, torch.bfloat16, False)]:
        w = torch.randn(N, K, device="cuda") * 0.02
        qt = quantize(w.to(torch.bfloat16), FMT)
        x = torch.randn(M, K, device="cuda", dtype=dt)
        bias = torch.randn(N, device="cuda", dtype=dt) if has_bias else None
        ref = reference(x, qt.codes, qt.scales, qt.zeros, None, bias, FMT, K).float()
        dflt = quant_linear_apply(x, qt.codes, qt.scales, qt.zeros, None, bias, FMT, K).float()
        for c in (cfg_of("4:1:1:1"), cfg_of("8:2:2:1:1:1"), cfg_of("2:1:1:0:0:0"), cfg_of("4:2:1:1:0:1")):
            try:
                y = run_mma(x, qt, bias, c).float()
                torch.cuda.synchronize()
                e_ref, e_def = rel_err(y, ref), rel_err(y, dflt)
            except Exception as e:  # noqa: BLE001
                print(f"correctness {N}x{K} M={M} {name_of(c)}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                e_ref = e_def = float("inf")
            ok &= e_ref < 2e-2
            res.add(f"check_{N}x{K}_m{M}", name_of(c), "rel_err_vs_ref", e_ref, "rel_err")
            lines.append(f"| {N} | {K} | {M} | {str(dt)[6:]} | {has_bias} | {name_of(c)} | {e_ref:.2e} | {e_def:.2e} |")
            print(lines[-1], flush=True)
    return ok


def timings(res, lines, cfgs, shapes, m=1):
    head = (f"## Timings (M = {m}, us per launch; `time`: 20 independent launches per CUDA graph, `chain`: "
            "x_{i+1} = y_i[:, :K], only where N >= K)")
    lines += ["", head, "", "| workload | impl | config | time | chain | x bf16 (time) |", "|---|---|---|---|---|---|"]
    for n, k in shapes:
        _time_shape(res, lines, cfgs, n, k, m)
        torch.cuda.empty_cache()


def _time_shape(res, lines, cfgs, N, K, M):
    wl = f"gemv_{K}x{N}_m{M}"
    copies = max(2, -(-200_000_000 // (N * K * 2)))
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    chain = N >= K
    nan = float("nan")
    bf = graph_time_us(lambda i: torch.mm(x, ws[i % copies].t(), out=y), tries=TRIES)
    bfc = chain_time_us(lambda xi, i: torch.mm(xi, ws[i % copies].t()), x, K, tries=TRIES)[0] if chain else nan
    res.add(wl, "bf16", "time", bf, "us")
    res.add(wl, "bf16", "time_chain", bfc, "us")
    lines.append(f"| {wl} | bf16 | cuBLAS | {bf:.2f} | {bfc:.2f} | 1.00 |")
    qts = [quantize(w, FMT) for w in ws]
    ws.clear()

    words = next(c for c in ql.gemv_configs(M, N, K, FMT, False) if c.get("WORDS"))
    for name, cfg in (("default", None), ("words", words)):  # the dispatch's default (MMA from 8192 rows), the words GEMV
        def run(xi, i, cfg=cfg):
            q = qts[i % copies]
            return quant_linear_apply(xi, q.codes, q.scales, q.zeros, None, None, FMT, K, check=False,
                                      config=dict(cfg) if cfg else None)
        t = graph_time_us(lambda i, run=run: run(x, i), tries=TRIES)
        tc = chain_time_us(run, x, K, tries=TRIES)[0] if chain else nan
        res.add(wl, "w4a16" if cfg is None else "w4a16_words", "time", t, "us")
        res.add(wl, "w4a16" if cfg is None else "w4a16_words", "time_chain", tc, "us")
        lines.append(f"| {wl} | w4a16 | {name} | {t:.2f} | {tc:.2f} | {bf / t:.2f} |")
        print(lines[-1], flush=True)
    for c in cfgs:
        def mm(xi, i, c=c):
            return run_mma(xi, qts[i % copies], None, c)
        try:
            t = graph_time_us(lambda i, mm=mm: mm(x, i), tries=TRIES)
            tc = chain_time_us(mm, x, K, tries=TRIES)[0] if chain else nan
        except Exception as e:  # noqa: BLE001
            print(f"{wl} {name_of(c)}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        res.add(wl, f"w4a16_mma[{name_of(c)}]", "time", t, "us")
        res.add(wl, f"w4a16_mma[{name_of(c)}]", "time_chain", tc, "us")
        lines.append(f"| {wl} | w4a16 mma | {name_of(c)} | {t:.2f} | {tc:.2f} | {bf / t:.2f} |")
        print(lines[-1], flush=True)


def main():
    t0 = time.time()
    res = Results(os.environ.get("PROBE_NAME", "probe_gemv_mma"))
    lines: list[str] = []
    torch.manual_seed(0)
    ok = correctness(res, lines) if not os.environ.get("PROBE_SKIPCHECK") else True
    print(f"correctness {'ok' if ok else 'FAILED'} [{time.time() - t0:.0f}s]", flush=True)
    if ok or os.environ.get("PROBE_FORCE"):
        spec = os.environ.get("PROBE_CFGS", "4:1:1:1,4:1:2:1,4:2:1:1,8:1:1:1,8:1:2:1,2:1:1:1,2:2:2:1,4:1:1:0")
        shapes = [tuple(int(v) for v in t.split(":")) for t in os.environ.get("PROBE_SHAPES", "4096:4096,14336:4096").split(",")]
        timings(res, lines, [cfg_of(s) for s in spec.split(",")], shapes, int(os.environ.get("PROBE_M", "1")))
    res.write(out_dirs(), notes=[""] + lines)
    print(f"done [{time.time() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
