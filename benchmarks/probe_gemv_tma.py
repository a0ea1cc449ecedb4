"""One-call H100 probe: does feeding the GEMV's weight words through TMA (host tensor descriptors, Triton's
loop pipeliner keeping STAGES boxes in flight per program) beat the register-prefetched words GEMV and the
plain-load read ceiling (probe_gemv_ceiling.md: 8-bit words at 4096^2 read in 7.51 us at best = 2.04x bf16,
against w8a16's 1.85x target)?

Per shape (4096^2 and 14336 x 4096, M = 1), one run, same timing as bench_quant.py (one CUDA graph of 20
launches, weights rotating over > 200 MB of copies so every launch reads HBM):
  bf16                   torch.mm (cuBLAS)
  read8[...] / read4[...] the int32 words read and XOR-folded per row, plain loads (probe_gemv_ceiling's kernel)
  tma_read8[...] / tma_read4[...]  the same through TMA boxes [BLOCK_N, BW] and STAGES buffers
  w8a16[default]         the words GEMV default (what fxforge runs today)
  w8a16_tma[...]         codegen/templates/dequant_gemv_tma.py (n rows, bw words per box, st stages, w warps, xd: x
                         through its own descriptor, sk K splits + the split-K reduce)
  w8a16_tma_persist[...] its persistent twin (p programs per SM, fl: the (tile, K step) loop nest flattened into one
                         pipelined loop); PROBE_PERSIST=1 runs this round (round 2) instead of round 1
  (round 5, PROBE_HOST=1: the host cost of an eager call, words vs TMA -> results/probe_gemv_tma_host.*)
  ... dec2 / dec4        the offset decode (PROBE_DEC=1, round 3): acc += x * (2^15 + u) from one PRMT per element,
                         the (2^15 + 128) * x offset subtracted at the end (dec2) or every step (dec4: measured in
                         round 3, 8.67 us, and since removed from the template; round 3 now runs dec 0 and 2)
Every w8a16 output is checked against a float64 reference (rel err < 1e-2) before it is timed.

Usage (repo root): ``python benchmarks/probe_gemv_tma.py`` -> benchmarks/results/probe_gemv_tma.{json,md} (and $OUT).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Results,
    gemv_probe_start,
    graph_time_us,
    out_dirs,
    rel_err,
    sweep_shapes,
)
from fxforge.codegen.templates.dequant_gemv_tma import _tma8_step, dequant_gemv_tma8
from fxforge.passes.quant.formats import dequantize, quantize
from fxforge.runtime import quant_linear as ql
from probe_gemv_ceiling import read_time

SHAPES = {"gemv_4096x4096_m1": (4096, 4096), "gemv_4096x14336_m1": (14336, 4096)}
# (BLOCK_N, BW words, STAGES, warps, K splits)
READ_TMA = [(16, 256, 4, 4, 1), (16, 256, 3, 4, 1), (32, 128, 4, 4, 1), (16, 128, 6, 4, 1), (8, 256, 4, 4, 1),
            (32, 256, 3, 4, 1), (64, 64, 4, 4, 1), (16, 256, 2, 4, 1), (32, 256, 4, 8, 1), (16, 256, 4, 4, 2)]
# plain-load read configs of probe_gemv_ceiling (n, bw, warps, splits, unroll, stages, persist): its best two
READ_PLAIN = [(16, 128, 4, 1, 2, 1, 0), (16, 64, 4, 1, 1, 1, 0)]
# (BLOCK_N, BW, STAGES, warps, X_DESC, K splits)
GEMV_TMA = [(16, 256, 4, 4, 0, 1), (16, 256, 3, 4, 0, 1), (16, 256, 4, 4, 1, 1), (32, 128, 4, 4, 0, 1),
            (32, 128, 6, 4, 0, 1), (16, 128, 6, 4, 0, 1), (8, 256, 4, 4, 0, 1), (32, 256, 3, 8, 0, 1),
            (64, 64, 4, 4, 0, 1), (16, 256, 4, 8, 0, 1), (16, 256, 4, 4, 0, 2), (8, 256, 6, 4, 1, 1)]
# round 2 (PROBE_PERSIST=1): round 1's two best, then (BLOCK_N, BW, STAGES, warps, X_DESC, programs per SM, FLATTEN)
if os.environ.get("PROBE_PERSIST"):
    READ_TMA = [(16, 256, 3, 4, 1), (8, 256, 4, 4, 1)]
    READ_PLAIN = READ_PLAIN[1:]
    GEMV_TMA = [(16, 256, 3, 4, 0, 1), (32, 128, 4, 4, 0, 1)]
if os.environ.get("PROBE_DEC"):  # round 3: the offset decode (DEC 2: PRMT planes)
    READ_TMA, READ_PLAIN = [(16, 256, 3, 4, 1)], READ_PLAIN[1:]
    GEMV_TMA = [(bn, bw, st, 4, 0, 1, dec) for bn, bw, st in [(16, 256, 3), (32, 128, 4), (16, 128, 4), (8, 256, 4)]
                for dec in (0, 2)]
if os.environ.get("PROBE_CONFIRM"):  # round 4: round 3's winners and neighbours, each measured REPS times interleaved
    READ_TMA, READ_PLAIN = [], []
    GEMV_TMA = [(16, 128, st, 4, 0, 1, dec) for st, dec in [(4, 0), (4, 2), (3, 0), (5, 0), (6, 0)]] + \
        [(16, 64, st, 4, 0, 1, 0) for st in (6, 8)] + [(16, 128, 4, 8, 0, 1, 0)]
REPS = 3 if os.environ.get("PROBE_CONFIRM") else 1
PERSIST = [(bn, bw, st, 4, 0, p, fl) for bn, bw, st in [(16, 256, 3), (16, 128, 4), (32, 128, 4), (8, 256, 4)]
           for p in (1, 2, 3) for fl in (1, 0)] + [(16, 256, 3, 4, 1, 2, 1), (16, 256, 4, 4, 0, 4, 1)]
if os.environ.get("PROBE_DEC"):
    PERSIST = [(16, 128, 4, 4, 0, p, 1, dec) for p in (2, 3) for dec in (0, 2)]
if os.environ.get("PROBE_CONFIRM"):
    PERSIST = [(16, 128, 4, 4, 0, 2, 1, 0)]


@triton.jit
def read_tma(w_desc, out, N, per_split, BLOCK_N: tl.constexpr, BW: tl.constexpr, STAGES: tl.constexpr):
    """XOR of every int32 word of BLOCK_N rows over this program's K range, one TMA box per step."""
    n0 = tl.program_id(0) * BLOCK_N
    pid_k = tl.program_id(1)
    acc = tl.zeros([BLOCK_N, BW], tl.int32)
    k0 = pid_k * per_split
    for k in tl.range(k0, k0 + per_split, BW, num_stages=STAGES):
        acc ^= w_desc.load([n0, k])
    tl.store(out + pid_k * N + n0 + tl.arange(0, BLOCK_N), tl.xor_sum(acc, 1))


@triton.jit
def dequant_gemv_tma8_persistent(x, w_desc, scales, bias, out, M, N, K, s_xm, s_om, mask0, BLOCK_N: tl.constexpr,
                                 BW: tl.constexpr, STAGES: tl.constexpr, X_DESC: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, FLATTEN: tl.constexpr, DEC: tl.constexpr = 0):
    """The probe's persistent twin of dequant_gemv_tma8 (round 2: not faster, so not in the template)."""
    # Persistent grid (programs = SM slots, row tiles strided over them): with FLATTEN the (tile, K step) loop
    # nest is one pipelined loop, so the TMA boxes of a program's next tile are in flight while it finishes
    # this one (no pipeline drain and refill per tile, no tail wave).
    m = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    KW = K // 4
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=FLATTEN):
        n0 = tile * BLOCK_N
        acc = tl.zeros([BLOCK_N, BW], tl.float32)
        xs = tl.zeros([BW], tl.float32)
        for k in tl.range(0, KW, BW, num_stages=STAGES):
            acc, xs = _tma8_step(acc, xs, x, w_desc, n0, k, m, K, s_xm, mask0, BW, X_DESC, DEC)
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if DEC:
            acc -= 32896.0 * xs[None, :]  # (2^15 + 128) * x: the offset of every plane float
        y = tl.sum(acc, 1) * tl.load(scales + rn, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out + m * s_om + rn, y.to(out.dtype.element_ty), mask=n_ok)


def tma_read_time(ws, N, KW, bn, bw, st, warps, splits) -> float:
    out = torch.empty(splits * N, dtype=torch.int32, device="cuda")
    descs = [TensorDescriptor.from_tensor(w, [bn, bw]) for w in ws]
    per = KW // splits
    return graph_time_us(lambda i: read_tma[(N // bn, splits)](descs[i % len(descs)], out, N, per, BLOCK_N=bn, BW=bw,
                                                              STAGES=st, num_warps=warps, num_stages=1))


def gemv_tma8(x, desc, scales, out, partials, N, K, bn, bw, st, warps, xd, splits, dec=0):
    """One w8a16 GEMV (M = 1) through dequant_gemv_tma8; with K splits the fxforge split-K reduce sums them."""
    KW = K // 4
    per = -(-KW // splits // bw) * bw  # whole boxes per split (a box never crosses into the next split)
    dequant_gemv_tma8[(triton.cdiv(N, bn), splits, 1)](x, desc, scales, out, out, partials, 1, N, K, per, K, N, 255,
                                                       BLOCK_N=bn, BW=bw, STAGES=st, SPLIT=splits > 1, X_DESC=xd,
                                                       HAS_BIAS=False, OUT_BF16=True, INTERPRETED=False, DEC=dec,
                                                       num_warps=warps, num_stages=1)
    if splits > 1:
        ql._splitk_reduce(ql.kernels_for("cuda"), partials, None, out, splits, False, False)


def probe_shape(res, lines, t0, wl, N, K) -> None:
    wb, x, copies, _, row = gemv_probe_start(res, lines, t0, wl, N, K)

    for bits in (8, 4) if READ_TMA or READ_PLAIN else ():
        KW = K * bits // 32
        nbytes = N * KW * 4
        wc = max(2, -(-200_000_000 // nbytes))
        ws = [torch.randint(-2**31, 2**31 - 1, (N, KW), device="cuda", dtype=torch.int32) for _ in range(wc)]
        for bn, bw, w, s, u, st, p in READ_PLAIN:
            name = f"n{bn} bw{bw} w{w} sk{s} u{u} st{st}"
            row(f"read{bits}", name, read_time(ws, N, KW, bn, bw, w, s, u, st, p), nbytes)
        for bn, bw, st, w, s in READ_TMA:
            if bw > KW // s:
                continue
            name = f"n{bn} bw{bw} st{st} w{w} sk{s}"
            try:
                row(f"tma_read{bits}", name, tma_read_time(ws, N, KW, bn, bw, st, w, s), nbytes)
            except Exception as e:  # noqa: BLE001 — a failing config is reported, the sweep goes on
                print(f"{wl} tma_read{bits} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        del ws
        torch.cuda.empty_cache()

    fmt = "w8a16"
    qts = [quantize(w, fmt) for w in wb]
    ref = x.double() @ dequantize(qts[0]).double().t()
    qbytes = ql.bytes_model(fmt, N, K, 1)["expected_us"] * 3.0e12 / 1e6

    def words_run(i):
        q = qts[i % copies]
        ql.quant_linear_apply(x, q.codes, q.scales, None, None, None, fmt, K, check=False)
    err = rel_err(ql.quant_linear_apply(x, qts[0].codes, qts[0].scales, None, None, None, fmt, K), ref)
    for rep in range(REPS):
        gemv_round(res, lines, row, wl, N, K, x, wb, qts, ref, qbytes, copies, words_run, err, rep)


def gemv_round(res, lines, row, wl, N, K, x, wb, qts, ref, qbytes, copies, words_run, err, rep) -> None:
    """One pass over the w8a16 variants (bf16 cuBLAS re-measured first when REPS > 1: interleaved repeats)."""
    if REPS > 1:
        y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
        bf = graph_time_us(lambda i: torch.mm(x, wb[i % copies].t(), out=y))
        res.add(wl, f"bf16[rep{rep}]", "time", bf, "us")
        lines.append(f"| {wl} | bf16 | cuBLAS rep{rep} | {bf:.2f} | {N * K * 2 / bf / 1e6:.2f} | 1.00 |")
        print(lines[-1], flush=True)
    row("w8a16", f"default err {err:.1e}" + (f" rep{rep}" if REPS > 1 else ""), graph_time_us(words_run), qbytes)

    words = [q.codes.view(torch.int32) for q in qts]
    scales = [q.scales.reshape(-1) for q in qts]
    out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    partials = torch.empty(4 * N, device="cuda", dtype=torch.float32)
    for bn, bw, st, w, xd, s, *dec in GEMV_TMA:
        dec = dec[0] if dec else 0
        name = f"n{bn} bw{bw} st{st} w{w} xd{xd} sk{s}" + (f" dec{dec}" if dec else "")
        try:
            descs = [TensorDescriptor.from_tensor(c, [bn, bw]) for c in words]
            xa = TensorDescriptor.from_tensor(x, [1, 4 * bw]) if xd else x

            def run(i, bn=bn, bw=bw, st=st, w=w, xd=xd, s=s, descs=descs, xa=xa, dec=dec):
                gemv_tma8(xa, descs[i % copies], scales[i % copies], out, partials, N, K, bn, bw, st, w, xd, s, dec)
            run(0)
            err = rel_err(out, ref)
            if err > 1e-2:
                print(f"{wl} w8a16_tma {name}: rel err {err:.2e}", flush=True)
                continue
            row("w8a16_tma", f"{name} err {err:.1e}" + (f" rep{rep}" if REPS > 1 else ""), graph_time_us(run), qbytes)
        except Exception as e:  # noqa: BLE001 — a failing config is reported, the sweep goes on
            print(f"{wl} w8a16_tma {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if os.environ.get("PROBE_PERSIST") or os.environ.get("PROBE_DEC") or os.environ.get("PROBE_CONFIRM"):
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for bn, bw, st, w, xd, p, fl, *dec in PERSIST:
            dec = dec[0] if dec else 0
            name = f"n{bn} bw{bw} st{st} w{w} xd{xd} p{p} fl{fl}" + (f" dec{dec}" if dec else "")
            try:
                descs = [TensorDescriptor.from_tensor(c, [bn, bw]) for c in words]
                xa = TensorDescriptor.from_tensor(x, [1, 4 * bw]) if xd else x
                grid = (min(sms * p, triton.cdiv(N, bn)), 1)

                def run(i, bn=bn, bw=bw, st=st, w=w, xd=xd, fl=fl, descs=descs, xa=xa, grid=grid, dec=dec):
                    dequant_gemv_tma8_persistent[grid](xa, descs[i % copies], scales[i % copies], out, out, 1, N, K, K,
                                                       N, 255, BLOCK_N=bn, BW=bw, STAGES=st, X_DESC=xd, HAS_BIAS=False,
                                                       FLATTEN=fl, DEC=dec, num_warps=w, num_stages=1)
                run(0)
                err = rel_err(out, ref)
                if err > 1e-2:
                    print(f"{wl} w8a16_tma_persist {name}: rel err {err:.2e}", flush=True)
                    continue
                row("w8a16_tma_persist", f"{name} err {err:.1e}" + (f" rep{rep}" if REPS > 1 else ""), graph_time_us(run),
                    qbytes)
            except Exception as e:  # noqa: BLE001 — a failing config is reported, the sweep goes on
                print(f"{wl} w8a16_tma_persist {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    torch.cuda.empty_cache()


def host_round() -> None:
    """Round 5 (PROBE_HOST=1): host cost of one eager quant_linear call (no CUDA graph), words kernel vs TMA
    GEMV (a host tensor descriptor built and encoded per launch): microseconds per call to enqueue 2000 calls,
    and per call with a synchronize after each (launch latency included), w8a16 4096^2, M = 1."""
    res = Results("probe_gemv_tma_host")
    lines = ["| config | enqueue us/call | synchronous us/call |", "|---|---|---|"]
    N = K = 4096
    q = quantize(torch.randn(N, K, device="cuda") * 0.02, "w8a16")
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    words = next(c for c in ql.gemv_configs(1, N, K, "w8a16", False) if c.get("WORDS"))
    for name, cfg in [("words", words), ("tma", ql.gemv_configs(1, N, K, "w8a16", False)[0]), ("default", None)]:
        def call(cfg=cfg):
            ql.quant_linear_apply(x, q.codes, q.scales, None, None, None, "w8a16", K,
                                  config=dict(cfg) if cfg else None, check=False)
        for _ in range(50):
            call()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            call()
        enq = (time.perf_counter() - t) / 2000 * 1e6
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(500):
            call()
            torch.cuda.synchronize()
        sync = (time.perf_counter() - t) / 500 * 1e6
        res.add("gemv_4096x4096_m1", f"w8a16[{name}]", "host_enqueue", enq, "us")
        res.add("gemv_4096x4096_m1", f"w8a16[{name}]", "host_sync_call", sync, "us")
        lines.append(f"| {name} | {enq:.1f} | {sync:.1f} |")
        print(lines[-1], flush=True)
    res.write(out_dirs(), notes=["", "## Host cost", ""] + lines)


def main() -> None:
    if os.environ.get("PROBE_HOST"):
        host_round()
        return
    name = "probe_gemv_tma_r4" if os.environ.get("PROBE_CONFIRM") else "probe_gemv_tma_r3" if os.environ.get("PROBE_DEC") else "probe_gemv_tma_r2" if os.environ.get("PROBE_PERSIST") \
        else "probe_gemv_tma"
    sweep_shapes(name, ["| workload | what | config | us | TB/s of its bytes | x bf16 |",
                                    "|---|---|---|---|---|---|"], SHAPES, probe_shape)


if __name__ == "__main__":
    main()
