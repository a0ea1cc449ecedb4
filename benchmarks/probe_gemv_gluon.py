"""One-call H100 probe: the Gluon 4-bit GEMV (codegen/templates/dequant_gemv_gluon.py), which fetches its whole slice
of the weight into shared memory before griddepcontrol.wait, against fxforge's default M = 1 dispatch (the words GEMV
with WAIT) and bf16 cuBLAS, all in the same run.

Timing as bench_quant.py: 20 launches in one CUDA graph over weights rotating through > 200 MB of copies of the
quantized format itself; ``time`` = independent launches, ``chain`` = dependent ones (x_{i+1} = y_i[:, :K]).
Every config is checked against a float64 reference of the dequantized weight, and against the default dispatch.

Usage (repo root): ``python benchmarks/probe_gemv_gluon.py`` -> results/probe_gemv_gluon.*
(``PROBE_CFGS=bn:bg:stages:warps:splits:carveout,...`` replaces the sweep; ``PROBE_TAG`` suffixes the result name)
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
# (BLOCK_N, BG, STAGES, warps, splits, shared-memory carveout percent or -1: the driver's choice)
CFGS = [(16, 8, 4, 4, 1, -1), (16, 8, 4, 4, 1, 100), (16, 8, 2, 4, 1, -1), (16, 8, 2, 4, 1, 100), (32, 8, 4, 4, 1, 100),
        (16, 16, 2, 4, 1, 100), (32, 8, 2, 4, 1, 100), (16, 16, 4, 4, 1, 100)]
if os.environ.get("PROBE_CFGS"):
    CFGS = [tuple(int(v) for v in c.split(":")) for c in os.environ["PROBE_CFGS"].split(",")]


# PROBE_MODES=1: the template patched (its source, loaded as another kernel) to find where the time goes:
# "no decode" (the words XOR-ed instead of decoded), "no load" (no TMA, no barrier wait: garbage codes),
# "floor" (neither: the wait, x, the epilogue)
MODES = {"no decode": [("part = x0 * _plane(wd, mask0, 0x4B000000, zf0)", "part = x0 * (wd ^ wh).to(gl.float32, bitcast=True)"),
                       *[(f"part += x{j} * _plane(w{h}, mask0 << {sh}, 0x4{e}000000, zf{z})", "")
                         for j, h, sh, e, z in ((1, "d", 4, 9, 1), (2, "d", 8, 7, 2), (3, "d", 12, 5, 3),
                                                (4, "d", 16, 3, 4), (5, "h", 8, 7, 2), (6, "h", 12, 5, 3),
                                                (7, "h", 16, 3, 4))]],
         "no load": [("ok = st < nsteps", "ok = st < 0"), ("ok = nxt < nsteps", "ok = nxt < 0"),
                     ("mbarrier.wait(bar.index(s), (i // STAGES) & 1)", "")]}
MODES["floor"] = MODES["no decode"] + MODES["no load"]
# the codes fetched after the wait instead of before it (what the prefetch buys)
MODES["late"] = [("    for st in gl.static_range(STAGES):  # the codes of the first",
                  "    if WAIT:\n        _grid_wait()\n        _launch_dependents()\n"
                  "    for st in gl.static_range(STAGES):  # the codes of the first"),
                 ("    if WAIT:\n        _grid_wait()  # x may still be being written by the kernel before this one\n"
                  "        _launch_dependents()\n", "")]
MODES["no decode, late"] = MODES["no decode"] + MODES["late"]
# constant scales / zero points (their loads, one step ahead from HBM, out of the floor)
NO_SCALES = [(f"{v} = _group_step({t}, rows, n_ok, {g}, NB, s_{t[0]}n, SL, BG)", f"{v} = gl.full([BN, BG], {c}, gl.{d}, SL)")
             for v, t, c, d in (("sn", "scales", 1.0, "bfloat16"), ("zn", "zeros", 8, "uint8")) for g in ("gs0", "g1")]
MODES["floor, no scales"] = MODES["floor"] + NO_SCALES
MODES["no scales"] = NO_SCALES


# PROBE_MODES=1 also patches fxforge's default M = 1 kernel, the words GEMV (dequant_gemv_words.py), the same way
_WORDS_LOAD = (r"tl\.load\(c_rows \+ (\w+)\[:, None, :\], mask=n_ok3 & \(\w+ < w_end\)\[:, None, :\], other=0\)",
               r"(rn[None, :, None] + \1[:, None, :])")
_WORDS_DECODE = [("part = _plane_fma(part, wd, x0, mask0, 0x4B000000, zf0)",
                  "part = part + x0[:, None, :] * (wd ^ wh).to(tl.float32, bitcast=True)")]
_WORDS_DECODE_REST = r"\n\s*part = _plane_fma\(part, w[dh], x[1-7],[^\n]*"  # (removed)


def words_mode_kernel(mode):
    import re

    from fxforge.config import cache_dir
    from fxforge.runtime.kernels import load_kernel
    src = ql.WORDS_TEMPLATE.read_text()
    if mode in ("no load", "floor"):
        src, n = re.subn(_WORDS_LOAD[0], _WORDS_LOAD[1], src)
        assert n == 5, n
    if mode in ("no decode", "floor"):
        for a, b in _WORDS_DECODE:
            assert a in src, a
            src = src.replace(a, b)
        src, n = re.subn(_WORDS_DECODE_REST, "", src)
        assert n == 10, n  # (7 of the 4-bit branch, 3 of the 8-bit one)
    return load_kernel("dequant_gemv_words", src, "cuda", cache_dir())


def mode_kernel(mode):
    from fxforge.config import cache_dir
    from fxforge.runtime.kernels import load_kernel
    src = qgv.GEMV_GLUON_TEMPLATE.read_text()
    for a, b in MODES[mode]:
        assert a in src, a
        src = src.replace(a, b)
    return load_kernel("dequant_gemv_gluon", src, "cuda", cache_dir())


def gluon_apply(x, q, kf, cfg, wait, mode=None):
    bn, bg, st, w, sk, carve = cfg
    out = torch.empty(x.shape[0], q.codes.shape[0], device=x.device, dtype=x.dtype)
    if mode is not None:
        real = qgv.kernels_for
        qgv.kernels_for = lambda dt: {"dequant_gemv_gluon": mode_kernel(mode)}
        try:
            return gluon_apply(x, q, kf, cfg, wait)
        finally:
            qgv.kernels_for = real
    sk, partials = qgv.launch(x, q.codes, q.scales, q.zeros, None, out, kf,
                              {"BLOCK_N": bn, "BG": bg, "STAGES": st, "num_warps": w, "CARVEOUT": None if carve < 0 else carve},
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
                name = "n{} bg{} st{} w{} sk{} carve{}".format(*cfg) + (" WAIT" if wait else "")
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
        for mode in ("no decode", "no load", "floor") if os.environ.get("PROBE_MODES") else ():
            real = ql.kernels_for
            kern = words_mode_kernel(mode)
            ql.kernels_for = lambda dt, real=real, kern=kern: {**real(dt), "dequant_gemv_words": kern}
            try:
                run_default(x0, 0)
                row(FMT, f"default dispatch (words GEMV), {mode}", graph_time_us(lambda i: run_default(x0, i)),
                    chain_time_us(run_default, x0, K)[0])
            except Exception:  # noqa: BLE001
                print(f"words {mode}: {traceback.format_exc()[-1500:]}", flush=True)
            finally:
                ql.kernels_for = real
        for cfg in CFGS[:1] if os.environ.get("PROBE_MODES") else []:
            for mode in MODES:
                name = "n{} bg{} st{} w{} sk{} carve{}".format(*cfg) + f" WAIT, {mode}"
                try:
                    def run(x, i, cfg=cfg, mode=mode):
                        return gluon_apply(x, qts[i % qc], kf, cfg, True, mode)
                    run(x0, 0)
                    row(f"{FMT} gluon", name, graph_time_us(lambda i, run=run: run(x0, i)), chain_time_us(run, x0, K)[0])
                except Exception:  # noqa: BLE001
                    print(f"{name}: {traceback.format_exc()[-1500:]}", flush=True)
        qts.clear()
        torch.cuda.empty_cache()
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


if __name__ == "__main__":
    main()
