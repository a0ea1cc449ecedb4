"""Probe: does fxforge's Hopper TMA matmul twin (codegen/emit_matmul_tma.py), with its epilogue fused,
beat cuBLAS + the epilogue as its own launch at the ViT-B/16 (batch 64, fp16) and decoder-prefill
(bf16, 2048 tokens) shapes? Decides the TMA config list in runtime/autotune.py (TMA_CONFIGS).

What runs is what the compiler emits: each case is a small module compiled by ``fxforge.compile`` on
CUDA; the probe records the executor's matmul step (pointers, sizes, strides) on the first call and
launches its kernels through the runtime's own launchers (runtime.autotune.tma_launch, and the
executor's cuBLAS variant, which is cuBLAS + the fused-epilogue launch where there is an epilogue).

Per shape and impl: time (us, ``triton.testing.do_bench`` median), TFLOP/s (2·M·N·K / t) and the
ratio to ``cublas_epilogue`` (>1: faster than what fxforge runs without TMA). Impls:
  cublas              torch.mm / torch.addmm alone (no activation / residual): the floor
  torch_eager         the eager chain (e.g. addmm then GELU), as torch would run it
  cublas_epilogue     fxforge's cuBLAS variant: cuBLAS, then the epilogue as one Triton launch
  fxforge_tma_<cfg>   the TMA twin with the epilogue fused; <cfg> = BMxBNxBKxWARPSxSTAGES, then _nf: no loop
                      flattening, _eS: epilogue in S column slices, _cC: C persistent CTAs per SM, _ts: the
                      output stored through a TMA descriptor (shared memory -> async bulk copy)
  fxforge_tma_<cfg>_bare  the TMA twin of the bare matmul (x @ wᵀ, no epilogue; only the configs in BARE)
Every TMA output is checked against an fp32 reference (rel err < 1e-2) before it is timed.

Hard budget (default 115 s wall, PROBE_BUDGET_S): the Triton compiles first run in parallel worker
processes (they only fill Triton's on-disk cache), then this process times everything with a warm
cache; whatever would start past the budget is skipped and says so. One failing config prints its
error and the probe goes on.

Usage (H100): ``OUT=/some/dir python benchmarks/probe_gemm_tma.py`` -> $OUT/probe_gemm_tma.{json,md}
(default benchmarks/results/). ``--only vit|decoder``, ``--workers N`` (0: compile serially).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

T0 = time.time()
BUDGET_S = float(os.environ.get("PROBE_BUDGET_S", "115"))
PRECOMPILE_S = 50  # at most this long for the parallel compile phase

import fxforge  # after T0: import time counts against the budget
from fxforge.runtime import autotune

h, b16 = torch.float16, torch.bfloat16
# Without CUDA (TRITON_INTERPRET=1): a dry run of the same code path at tiny shapes, for CI/CPU checks.
DRY = not torch.cuda.is_available()
DEV = "cpu" if DRY else "cuda"
# name, M, K, N, dtype, epilogue
SHAPES = [
    ("vit_fc1", 12608, 768, 3072, h, "bias_gelu"),
    ("vit_fc2", 12608, 3072, 768, h, "bias_residual"),
    ("vit_qkv", 12608, 768, 2304, h, "bias"),
    ("vit_proj", 12608, 768, 768, h, "bias_residual"),
    ("dec_gate", 2048, 2048, 5632, b16, "silu_mul"),
    ("dec_down", 2048, 5632, 2048, b16, "residual"),
    ("dec_o", 2048, 2048, 2048, b16, "residual"),
    ("dec_qkv", 2048, 2048, 3072, b16, "none"),
]
# The autotune list first, then candidates this probe decides on: (cfg, flatten). Config fields
# (runtime.autotune.tma_fields): BM, BN, BK, warps, stages[, flatten, epilogue slices (_eS), CTAs per SM
# (_cC), TMA store of the output (_ts)]. The extras isolate one change each against the list's heads:
# 2 CTAs/SM vs 1 (same tile, stages, slices), 4 slices vs 2, TMA store vs plain stores, 4 warps.
CONFIGS = [(c, autotune.tma_fields(c)[5]) for c in autotune.TMA_CONFIGS] + [(c, autotune.tma_fields(c)[5]) for c in (
    (128, 128, 64, 8, 3, True, 4, 1, True),   # the first config on one CTA per SM
    (128, 128, 64, 8, 3, True, 2, 2, True),   # ... in 2 slices (122 regs, 112 KB: 2 CTAs/SM for GELU)
    (128, 128, 64, 8, 3, False, 4, 2, True),  # ... loop nest not flattened (half the code: one epilogue copy)
    (128, 128, 64, 8, 4, True, 2, 1, True),   # the H100's best fc1 config (155 us) with the TMA store
    (128, 256, 64, 8, 3, True, 2, 1, True),   # 128x256 TMA store in halves (residual: 240 KB, fails)
    (128, 128, 64, 4, 3, True, 2, 2, True),   # 4 warps, 2 CTAs/SM
    (64, 256, 64, 4, 2, True, 4, 2, True),    # one warpgroup on a 64x256 wgmma tile, 2 CTAs/SM (183 regs, 88 KB)
    (128, 128, 128, 8, 3),                     # the best fused fc2 / dec_o config of the last run
)]
# bare (no epilogue) matmuls: only these configs (the mainloop is the same for the rest)
BARE = {autotune.tma_name(c) for c in ((128, 256, 64, 8, 3), autotune.TMA_CONFIGS[0], autotune.TMA_CONFIGS[1], autotune.TMA_CONFIGS[2])}
if DRY:
    SHAPES = [(n, 70, 48 if k < 3000 else 56, 40, dt, epi) for n, _, k, _, dt, epi in SHAPES]
    CONFIGS = [((32, 32, 16, 4, 1), True), ((16, 32, 32, 4, 1), False), ((32, 64, 16, 4, 1, True, 2, 2, True), True)]
    BARE = None  # all


def bare_ok(cfg, flatten) -> bool:
    return BARE is None or "tma_" + cfg_name(cfg, flatten) in BARE


def cfg_name(cfg, flatten) -> str:
    return autotune.tma_name((*cfg[:5], flatten, *cfg[6:]) if len(cfg) > 5 or not flatten else cfg)[4:]


def left() -> float:
    return BUDGET_S - (time.time() - T0)


def make_case(M, K, N, dtype, epilogue, bare: bool):
    """(fn, inputs): the module's forward and its CUDA inputs."""
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, device=DEV, generator=g) * scale).to(dtype)
    x, w = rnd(M, K), rnd(N, K, scale=K ** -0.5)
    if bare or epilogue == "none":
        return (lambda x, w: x @ w.t()), (x, w)
    bias = rnd(N, scale=0.1)
    fns = {
        "bias": (lambda x, w, b: F.linear(x, w, b), (x, w, bias)),
        "bias_gelu": (lambda x, w, b: F.gelu(F.linear(x, w, b)), (x, w, bias)),
        "bias_residual": (lambda x, w, b, r: F.linear(x, w, b) + r, (x, w, bias, rnd(M, N))),
        "residual": (lambda x, w, r: x @ w.t() + r, (x, w, rnd(M, N))),
        "silu_mul": (lambda x, w, u: F.silu(x @ w.t()) * u, (x, w, rnd(M, N))),
    }
    return fns[epilogue]


class Case:
    """One compiled module and its recorded matmul step."""

    def __init__(self, fn, inputs, first=None):
        class Mod(torch.nn.Module):
            def forward(self, *a):
                return fn(*a)
        self.fn, self.inputs = fn, inputs
        self.compiled = fxforge.compile(Mod(), inputs, config=fxforge.Config(autotune="off", cuda_graphs="off"))
        ex = self.compiled.executor
        box, orig = [], ex._run_matmul

        def spy(i, st, entry, env, ptrs, scalars, strides, device):
            box.append((st, entry, dict(env), list(ptrs), list(scalars), list(strides), device))
            return orig(i, st, entry, env, ptrs, scalars, strides, device)
        ex._run_matmul = spy
        ex.force_tma = first or CONFIGS[0][0]  # the first call runs a config timed anyway (no extra compile)
        try:
            with torch.no_grad():
                self.compiled(*inputs)
        finally:
            ex._run_matmul, ex.force_tma = orig, None
        if len(box) != 1 or self.compiled.report.num_kernels != 1:
            raise RuntimeError(f"expected one matmul kernel, got {self.compiled.report.kernel_kinds()}")
        self.st, self.entry, self.env, self.ptrs, self.scalars, self.strides, self.device = box[0]
        self.a, self.b = self.env[self.st.loads[0].buf], self.env[self.st.loads[1].buf]
        self.out = self.env[self.st.stores[0].buf]
        self.kern_tma = ex._kernel_entry(self.st.kernel, "_tma", DEV)
        self.sms = 3 if DRY else torch.cuda.get_device_properties(0).multi_processor_count
        with torch.no_grad():
            self.ref = fn(*[t.float() for t in inputs])

    def refusal(self):
        return autotune.tma_refusal(self.a, self.b, 1, self.scalars[0])

    def tma(self, cfg, flatten):
        return lambda: autotune.tma_launch(self.kern_tma, self.a, self.b, self.ptrs, self.scalars, self.strides, cfg,
                                           self.sms, interpreted=DRY, flatten=flatten, out=self.out,
                                           tile_loads=self.st.launch.get("tma_tile_loads", ()))

    def cublas_epilogue(self):
        if DRY:  # no cuBLAS: the regular kernel stands in, so the dry run exercises the same bookkeeping
            kern, grid, kw = self.entry[0], self.entry[1], self.entry[2]
            return lambda: kern[grid](*self.ptrs, *self.scalars, *self.strides, self.ptrs[0], 0, 0, 0, **kw)
        ex = self.compiled.executor
        return ex._matmul_variants(self.st, self.entry, self.env, self.ptrs, self.scalars, self.strides, self.device)["cublas"]

    def check(self, launch) -> float:
        self.out.fill_(float("nan"))
        launch()
        if not DRY:
            torch.cuda.synchronize()
        o, r = self.out.float(), self.ref
        return float("inf") if not torch.isfinite(o).all() else ((o - r).norm() / r.norm()).item()


def kernel_jobs(only):
    """(shape index, bare) cases whose kernels are distinct sources: one per epilogue kind and dtype
    (shapes share the compiled kernel where source and specialization agree)."""
    seen, jobs = set(), []
    for i, (_, _, _, _, dt, epi) in enumerate(SHAPES):
        if only and not SHAPES[i][0].startswith(only):
            continue
        for bare in (False, True):
            key = (dt, "none" if bare else epi)
            if key not in seen:
                seen.add(key)
                jobs.append((i, bare))
    return jobs


def compile_worker(shard: int, nshards: int, only) -> None:
    """Fill Triton's cache: launch each (kernel, config) of this shard once; no timing."""
    pairs = [(job, k) for job in kernel_jobs(only) for k in range(len(CONFIGS)) if not job[1] or bare_ok(*CONFIGS[k])]
    lo, hi = shard * len(pairs) // nshards, (shard + 1) * len(pairs) // nshards  # contiguous: few cases per worker
    cases = {}
    for (i, bare), k in pairs[lo:hi]:
        _, M, K, N, dt, epi = SHAPES[i]
        try:
            if (i, bare) not in cases:
                cases[(i, bare)] = Case(*make_case(M, K, N, dt, epi, bare), first=CONFIGS[k][0])
                if k == 0:  # one worker per kernel compiles the cuBLAS variant's epilogue launch
                    cases[(i, bare)].cublas_epilogue()()
            cases[(i, bare)].tma(*CONFIGS[k])()
            if not DRY:
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 — the timing phase reports it
            print(f"[worker {shard}] {SHAPES[i][0]} {cfg_name(*CONFIGS[k])}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def precompile(workers: int, only) -> None:
    if workers <= 0:
        return
    cmd = [sys.executable, __file__, "--compile-worker"]
    procs = [subprocess.Popen(cmd + [str(s), str(workers)] + (["--only", only] if only else [])) for s in range(workers)]
    deadline = time.time() + min(PRECOMPILE_S, max(0.0, left() - 60))
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            print("precompile: a worker ran past its deadline and was stopped", flush=True)
    print(f"precompile: done at {time.time() - T0:.0f} s", flush=True)


def bench_us(fn) -> float:
    if DRY:
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t)
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def probe_shape(res, table, name, M, K, N, dt, epi) -> None:
    wl = f"gemm_{name}_{M}x{N}x{K}"
    flops = 2.0 * M * N * K
    times = {}

    def record(impl, us):
        times[impl] = us
        res.add(wl, impl, "time", us, "us")
        res.add(wl, impl, "throughput", flops / us / 1e6, "TFLOP/s")
    if left() < 15:
        print(f"{wl}: skipped (budget)", flush=True)
        return
    try:
        epi_case = Case(*make_case(M, K, N, dt, epi, bare=False))
        bare_case = Case(*make_case(M, K, N, dt, epi, bare=True)) if epi != "none" else epi_case
    except Exception as e:  # noqa: BLE001
        print(f"{wl}: compile failed: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        return
    if (why := epi_case.refusal()) is not None:
        print(f"{wl}: TMA refused: {why}", flush=True)
    if (why := autotune.tma_store_refusal(epi_case.out, M, N)) is not None:
        print(f"{wl}: TMA store refused (plain stores): {why}", flush=True)
    x, w = epi_case.inputs[0], epi_case.inputs[1]
    bias = epi_case.inputs[2] if epi.startswith("bias") else None
    with torch.no_grad():
        record("cublas" if not DRY else "torch_mm", bench_us(lambda: torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())))
        if epi not in ("none", "bias"):
            record("torch_eager", bench_us(lambda: epi_case.fn(*epi_case.inputs)))
    try:
        ce = epi_case.cublas_epilogue()
        err = epi_case.check(ce)
        if err < 1e-2:
            record("cublas_epilogue", bench_us(ce))
        else:
            print(f"{wl} cublas_epilogue: WRONG rel err {err:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{wl} cublas_epilogue: {type(e).__name__}: {e}", flush=True)
    for case, suffix in ((epi_case, ""), (bare_case, "_bare")) if epi != "none" else ((epi_case, ""),):
        for cfg, flatten in CONFIGS:
            if suffix and not bare_ok(cfg, flatten):
                continue
            impl = f"fxforge_tma_{cfg_name(cfg, flatten)}{suffix}"
            if left() < 8:
                print(f"{wl} {impl}: skipped (budget)", flush=True)
                continue
            try:
                launch = case.tma(cfg, flatten)
                err = case.check(launch)
                if err > 1e-2:
                    print(f"{wl} {impl}: WRONG rel err {err:.2e}", flush=True)
                    continue
                record(impl, bench_us(launch))
            except Exception as e:  # noqa: BLE001 — e.g. out of shared memory: next config
                print(f"{wl} {impl}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
    base = times.get("cublas_epilogue", times.get("cublas"))
    if base:
        for impl, us in times.items():
            res.add(wl, impl, "ratio_vs_cublas_epilogue", base / us, "x")
    fused = {k: v for k, v in times.items() if k.startswith("fxforge_tma") and not k.endswith("_bare")}
    best = min(fused, key=fused.get) if fused else None
    table.append((wl, flops, times, best, base))
    if name == "vit_fc1" and best is not None and left() > 10 and not DRY:
        # CUDA-graph capture of the winning TMA launch (host descriptors passed by value)
        try:
            cfg = next((c, f) for c, f in CONFIGS if f"fxforge_tma_{cfg_name(c, f)}" == best)
            launch = epi_case.tma(*cfg)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                launch()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                launch()
            err = epi_case.check(graph.replay)
            res.add(wl, best, "cuda_graph_rel_err", err, "")
        except Exception as e:  # noqa: BLE001
            print(f"{wl} cuda graph capture: {type(e).__name__}: {e}", flush=True)



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["vit", "dec"], default=None)
    ap.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--compile-worker", nargs=2, type=int, default=None, metavar=("SHARD", "NSHARDS"))
    args = ap.parse_args()
    if args.compile_worker:
        compile_worker(*args.compile_worker, args.only)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import Results

    precompile(0 if DRY else args.workers, args.only)
    res = Results("probe_gemm_tma")
    table = []
    for name, M, K, N, dt, epi in SHAPES:
        if args.only and not name.startswith(args.only):
            continue
        probe_shape(res, table, name, M, K, N, dt, epi)
        if not DRY:
            torch.cuda.empty_cache()
    lines = ["", "| workload | cuBLAS us | cuBLAS+epi us | best TMA fused | us | TFLOP/s | vs cuBLAS+epi | best TMA bare us |",
             "|---|---|---|---|---|---|---|---|"]
    for wl, flops, times, best, base in table:
        bare = {k: v for k, v in times.items() if k.endswith("_bare")}
        bb = min(bare.values()) if bare else float("nan")
        if best:
            lines.append(f"| {wl} | {times.get('cublas', float('nan')):.1f} | {base:.1f} | {best} | {times[best]:.1f} | "
                         f"{flops / times[best] / 1e6:.0f} | {base / times[best]:.2f}x | {bb:.1f} |")
        else:
            lines.append(f"| {wl} | {times.get('cublas', float('nan')):.1f} | {base or float('nan'):.1f} | — | | | | {bb:.1f} |")
    lines.append(f"\nwall: {time.time() - T0:.0f} s (budget {BUDGET_S:.0f} s)")
    print("\n".join(lines), flush=True)
    res.write([os.environ.get("OUT") or Path(__file__).parent / "results"], notes=lines)


if __name__ == "__main__":
    main()
