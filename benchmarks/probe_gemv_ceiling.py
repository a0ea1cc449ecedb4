"""One-call H100 probe: how fast can a Triton kernel *read* a 4-bit / 8-bit GEMV's weight bytes, and does the
words GEMV lose to the read ceiling through its grid (waves, K splits) or through its loop?

Three parts, one run, same timing as bench_quant.py (one CUDA graph of 20 launches, weights rotating over
> 200 MB of copies so every launch reads HBM):

1. ``read_words``: the weight's int32 words [N, KW] read in [BLOCK_N, BW] tiles and XOR-folded per row (no
   decode, no x) -- the bytes model's floor for this tile structure. Swept over tile shape, warps, K
   splits, loop-pipeline stages (``tl.range(num_stages=...)``) and UNROLL (independent tiles loaded before
   any is folded: bytes in flight per thread). Also a persistent grid (one program per SM slot, rows
   strided) so no tail wave exists.
2. The words GEMV defaults (w4a16 g128, w8a16) with K splits forced to 1 / 2 / 4 and with 8-row tiles.
3. bf16 cuBLAS (torch.mm) of the same shape.

Usage (repo root): ``python benchmarks/probe_gemv_ceiling.py`` -> $OUT and benchmarks/results/probe_gemv_ceiling.*
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gemv_probe_start, graph_time_us, rel_err, sweep_shapes
from fxforge.passes.quant.formats import dequantize, quantize
from fxforge.runtime import quant_linear as ql

SHAPES = {"gemv_4096x4096_m1": (4096, 4096), "gemv_4096x14336_m1": (14336, 4096)}
HBM = 3.0e12  # bytes/s, the bytes model's bandwidth (NOTES.md: measured copy ceiling)


@triton.jit
def read_words(w_ptr, out_ptr, N, KW, stride, per_split, BLOCK_N: tl.constexpr, BW: tl.constexpr,
               UNROLL: tl.constexpr, STAGES: tl.constexpr, PERSIST: tl.constexpr):
    """XOR of every int32 word of BLOCK_N rows over this program's K range (shapes divide: no masks)."""
    pid_k = tl.program_id(1)
    cols = tl.arange(0, BW)
    n_tiles = N // BLOCK_N
    first = tl.program_id(0)
    step = tl.num_programs(0) if PERSIST else n_tiles
    for t in range(first, n_tiles, step):
        rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
        base = w_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :]
        acc = tl.zeros([BLOCK_N, BW], tl.int32)
        k0 = pid_k * per_split
        for k in tl.range(k0, k0 + per_split, BW * UNROLL, num_stages=STAGES):
            for u in tl.static_range(UNROLL):
                acc ^= tl.load(base + k + u * BW)
        tl.store(out_ptr + pid_k * N + rows, tl.xor_sum(acc, 1))


def read_time(ws, N, KW, bn, bw, warps, splits, unroll, stages, persist) -> float:
    out = torch.empty(splits * N, dtype=torch.int32, device="cuda")
    per = KW // splits
    if persist:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        grid0 = min(N // bn, sms * persist)
    else:
        grid0 = N // bn
    copies = len(ws)
    return graph_time_us(lambda i: read_words[(grid0, splits)](ws[i % copies], out, N, KW, KW, per, BLOCK_N=bn, BW=bw,
                                                             UNROLL=unroll, STAGES=stages, PERSIST=bool(persist),
                                                             num_warps=warps, num_stages=1))


def probe_shape(res, lines, t0, wl, N, K) -> None:
    """bf16 cuBLAS, the read sweep and the words GEMV variants of one shape."""
    wb, x, copies, _, row = gemv_probe_start(res, lines, t0, wl, N, K)

    for bits in (4, 8):
        KW = K * bits // 32
        nbytes = N * KW * 4
        wc = max(2, -(-200_000_000 // nbytes))
        ws = [torch.randint(-2**31, 2**31 - 1, (N, KW), device="cuda", dtype=torch.int32) for _ in range(wc)]
        sweep = [(bn, bw, w, 1, u, st, 0) for bn, bw, w in [(16, 128, 4), (8, 128, 4), (16, 64, 4), (32, 64, 4),
                                                             (16, 256, 8), (8, 256, 4), (4, 512, 4)]
                 for u, st in [(1, 1), (2, 1), (1, 3)]]
        sweep += [(16, 128, 4, s, 1, 1, 0) for s in (2, 4)] + [(16, 128, 4, 1, u, 1, p) for u in (1, 2) for p in (4, 8)]
        for bn, bw, w, s, u, st, p in sweep:
            if KW % (s * bw * u) or N % bn:
                continue
            name = f"n{bn} bw{bw} w{w} sk{s} u{u} st{st}" + (f" persist{p}" if p else "")
            try:
                row(f"read{bits}", name, read_time(ws, N, KW, bn, bw, w, s, u, st, p), nbytes)
            except Exception as e:  # noqa: BLE001 — a failing config is reported, the sweep goes on
                print(f"{wl} read{bits} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        fmt = "w4a16_g128" if bits == 4 else "w8a16"
        qts = [quantize(w, fmt) for w in wb]
        args = [(q.codes, q.scales, q.zeros, q.tensor_scale) for q in qts]
        ref = x.double() @ dequantize(qts[0]).double().t()
        qbytes = ql.bytes_model(fmt, N, K, 1)["expected_us"] * HBM / 1e6
        base = next(c for c in ql.gemv_configs(1, N, K, fmt, False) if c.get("WORDS"))
        for name, cfg, sk in [("default", base, None), ("default sk1", base, 1), ("default sk2", base, 2),
                              ("default sk4", base, 4), ("n8", dict(base, BLOCK_N=8), None),
                              ("n8 sk2", dict(base, BLOCK_N=8), 2)]:
            def run(i, cfg=cfg, sk=sk, args=args, fmt=fmt):
                c, s_, z, t = args[i % copies]
                ql.quant_linear_apply(x, c, s_, z, t, None, fmt, K, config=dict(cfg), split_k=sk, check=False)
            err = rel_err(ql.quant_linear_apply(x, *args[0], None, fmt, K, config=dict(cfg), split_k=sk), ref)
            if err > 1e-2:
                print(f"{wl} {fmt} {name}: rel err {err:.2e}", flush=True)
                continue
            row(fmt.split("_")[0], name, graph_time_us(run), qbytes)
        torch.cuda.empty_cache()


def main() -> None:
    sweep_shapes("probe_gemv_ceiling", ["| workload | what | config | us | TB/s of its bytes | x bf16 |", "|---|---|---|---|---|---|"],
                 SHAPES, probe_shape)


if __name__ == "__main__":
    main()
