"""One-call H100 probe: where does the M = 64 dequant GEMM's time go -- the decode, or the SWAP tiling itself
(x^T re-read from L2 by every weight tile, occupancy, the split-K reduce)? Issue 4 asks that no format be
slower than bf16 at M = 64; the weight-only formats sit at 0.96-1.07x (quant_gpu.md).

A stripped SWAP GEMM (acc^T [BLOCK_N, 64] += W [BLOCK_N, BK] @ x^T, K split SPLIT ways, fp32 partials summed by
fxforge's split-K reduce, which every op time below includes) with the weight read as:
  bf16      bf16 weights (no decode; 32 MB)
  int8cvt   int8 codes converted to bf16 (one convert per element; 16 MB)
  nib       4-bit codes, both nibbles of a byte masked / shifted and converted (8 MB; not any format's math,
            the cheapest decode of 4-bit codes Triton emits)
and x either streamed like the real kernel (x^T [64, BK] per step from L2) or ``xl1``: always the first BK
columns of x (L1-resident: the same tile every step), which removes the x traffic (32 MB of L2 reads per
GEMM for 64-row weight tiles) -- a floor, not a GEMM. Next to bf16 cuBLAS and fxforge's defaults of
nvint4 / mxint8 / nvfp4 / w4a16 in the same run, timed as bench_quant.py (CUDA graph of 20 launches,
weights rotating over > 200 MB of copies).

Round 2 (``PROBE_TMA=1`` -> results/probe_gemm_m64_floor_tma.*): nib_tma / int8_tma, the same weights through TMA
boxes pipelined over STAGES buffers (the TMA GEMV's lever: dequant_gemv_tma.py), x streamed or (``xd``) through
its own descriptor. Round 3 (``PROBE_SMALL=1`` -> results/probe_gemm_m64_floor_small.*): 16 / 32-row weight tiles
(Triton's mma.sync path) with 1-4 warps and 1-4 K splits: more, shorter programs. Round 4 (``PROBE_MX8=1`` ->
_mx8.*): mx8_tma, MXINT8's math (int8 codes through TMA times 2^(e - 127) per 32 codes, one bf16 multiply per
element; scales 2^-17..2^-3, no subnormal edge) -- is a TMA-fed MXINT8 SWAP worth building? Round 5
(``PROBE_MHALF=1`` -> _mhalf.*): the 64 x rows split over 2 or 4 programs (wgmma N = 32 / 16; each program
decodes the same weight tile): more, shorter dependency chains per SM for the same partials.

Usage (repo root): ``python benchmarks/probe_gemm_m64_floor.py`` -> results/probe_gemm_m64_floor.*
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, bf16_baseline, graph_time_us, out_dirs, rel_err
from fxforge.passes.quant.formats import dequantize, quantize
from fxforge.runtime import quant_linear as ql

M, N, K = 64, 4096, 4096
# (mode, BLOCK_N, BK elements, warps, stages, splits, xl1); PROBE_TMA=1: round 2, the weights (and x) through TMA
MODES = ("bf16", "int8cvt", "nib", "nib_tma", "int8_tma", "mx8_tma")
CONFIGS = [(mode, bn, bk, w, st, sk, xl1) for mode in ("bf16", "int8cvt", "nib")
           for bn, bk, w, st, sk in [(64, 128, 4, 3, 4), (64, 128, 4, 4, 4), (128, 128, 4, 3, 4), (128, 128, 8, 3, 4),
                                     (64, 256, 4, 3, 4), (64, 128, 4, 3, 8), (128, 128, 8, 3, 2)]
           for xl1 in (0, 1)]
if __import__("os").environ.get("PROBE_TMA"):
    CONFIGS = [("nib", 64, 128, 4, 3, 4, 0)] + [
        (mode, bn, bk, w, st, sk, xd) for mode in ("nib_tma", "int8_tma")
        for bn, bk, w, st, sk in [(64, 128, 4, 3, 4), (64, 128, 4, 4, 4), (64, 128, 4, 6, 4), (64, 128, 4, 4, 2),
                                  (64, 256, 4, 3, 4), (128, 128, 4, 4, 4), (128, 128, 8, 4, 4), (64, 128, 4, 4, 8)]
        for xd in (0, 1)]
if __import__("os").environ.get("PROBE_MX8"):  # round 4: MXINT8's math on TMA-fed codes (mx8_tma)
    CONFIGS = [("int8_tma", 64, 128, 4, 4, 4, 1)] + [
        ("mx8_tma", bn, bk, w, st, sk, xd) for bn, bk, w, st, sk in [(64, 128, 4, 3, 4), (64, 128, 4, 4, 4),
                                                                     (64, 256, 4, 3, 4), (128, 128, 4, 4, 4),
                                                                     (128, 128, 8, 4, 4), (64, 128, 8, 4, 4)]
        for xd in (0, 1)]
if __import__("os").environ.get("PROBE_MHALF"):  # round 5: x rows split over 2-4 programs (more, shorter chains)
    CONFIGS = [("nib", 64, 128, 4, 3, 4, 0), ("bf16", 64, 128, 4, 3, 4, 0, 32)] + [  # (bf16: the error check)
        (mode, 64, 128, 4, st, sk, 0, bm) for mode in ("nib", "int8cvt") for bm in (32, 16)
        for st, sk in [(3, 4), (3, 2), (4, 2), (3, 1)]]
if __import__("os").environ.get("PROBE_SMALL"):  # round 3: weight tiles of 16 / 32 rows (mma.sync, not wgmma)
    CONFIGS = [("nib", 64, 128, 4, 3, 4, 0)] + [
        (mode, bn, bk, w, st, sk, 0) for mode in ("nib", "int8cvt")
        for bn, bk, w, st, sk in [(32, 128, 2, 3, 2), (32, 128, 2, 3, 4), (32, 128, 4, 3, 4), (32, 256, 4, 3, 2),
                                  (16, 128, 1, 3, 2), (16, 128, 2, 3, 2), (16, 256, 2, 3, 1), (16, 128, 2, 3, 4),
                                  (32, 128, 4, 4, 2)]]


@triton.jit
def swap_floor(x, w, partials, N, K, per_split, MODE: tl.constexpr, XL1: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_M: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, XD: tl.constexpr = False,
               e8m0=None):
    # MODE 3 / 4: the nib / int8cvt weights through a TMA descriptor ``w`` (box [BLOCK_N, BK / 2] / [BLOCK_N, BK]);
    # XD: x through a descriptor (box [BLOCK_M, BK])
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M < 64: x rows split over grid axis 2)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k0 = pid_k * per_split
    for k in tl.range(k0, k0 + per_split, BK, num_stages=STAGES):
        if MODE == 3:
            b = w.load([pid_n * BLOCK_N, k // 2])
            wt = tl.reshape(tl.join((b & 15).to(tl.bfloat16), (b >> 4).to(tl.bfloat16)), (BLOCK_N, BK))
        elif MODE == 4:
            wt = w.load([pid_n * BLOCK_N, k]).to(tl.bfloat16)
        elif MODE == 5:  # MXINT8's math: int8 codes (TMA) times 2^(e - 127) per 32 codes, in bf16 (exact)
            e = tl.load(e8m0 + rn[:, None] * (K // 32) + (k // 32 + tl.arange(0, BK // 32))[None, :])
            s2 = (e.to(tl.int16) << 7).to(tl.bfloat16, bitcast=True)
            c = tl.reshape(w.load([pid_n * BLOCK_N, k]).to(tl.bfloat16), (BLOCK_N, BK // 32, 32))
            wt = tl.reshape(c * s2[:, :, None], (BLOCK_N, BK))
        elif MODE == 0:
            wt = tl.load(w + rn[:, None] * K + (k + tl.arange(0, BK))[None, :])
        elif MODE == 1:
            wt = tl.load(w + rn[:, None] * K + (k + tl.arange(0, BK))[None, :]).to(tl.bfloat16)
        else:
            b = tl.load(w + rn[:, None] * (K // 2) + (k // 2 + tl.arange(0, BK // 2))[None, :])
            lo = (b & 15).to(tl.bfloat16)
            hi = (b >> 4).to(tl.bfloat16)
            wt = tl.reshape(tl.join(lo, hi), (BLOCK_N, BK))
        if XD:
            xv = x.load([0, k])
        else:
            kx = tl.arange(0, BK) if XL1 else k + tl.arange(0, BK)
            xv = tl.load(x + rm[:, None] * K + kx[None, :])
        acc = tl.dot(wt, tl.trans(xv), acc)
    tl.store(partials + pid_k * tl.num_programs(2) * BLOCK_M * N + rm[None, :] * N + rn[:, None], acc)


def main() -> None:
    t0 = time.time()
    env = __import__("os").environ
    res = Results("probe_gemm_m64_floor" + ("_tma" if env.get("PROBE_TMA") else "_small" if env.get("PROBE_SMALL")
                                            else "_mx8" if env.get("PROBE_MX8") else "_mhalf" if env.get("PROBE_MHALF")
                                            else ""))
    lines = ["| impl | config | us | x bf16 |", "|---|---|---|---|"]
    torch.manual_seed(0)
    wb, x, copies, bf = bf16_baseline(N, K, M)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    res.add("gemm_4096x4096_m64", "bf16", "time", bf, "us")
    lines.append(f"| bf16 | cuBLAS | {bf:.2f} | 1.00 |")

    def row(impl, name, us):
        res.add("gemm_4096x4096_m64", f"{impl}[{name}]", "time", us, "us")
        lines.append(f"| {impl} | {name} | {us:.2f} | {bf / us:.3f} |")
        print(lines[-1], f"[{time.time() - t0:.0f}s]", flush=True)

    for fmt in ("nvint4", "mxint8", "nvfp4", "w4a16_g128"):
        qts = [quantize(w, fmt) for w in wb]
        err = rel_err(ql.quant_linear_apply(x, qts[0].codes, qts[0].scales, qts[0].zeros, qts[0].tensor_scale, None,
                                            fmt, K), x.double() @ dequantize(qts[0]).double().t())

        def run(i, qts=qts, fmt=fmt):
            q = qts[i % copies]
            ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K, check=False)
        row(fmt, f"default err {err:.1e}", graph_time_us(run))
        del qts
    weights = {"bf16": wb, "int8cvt": [(w * 4000).clamp(-127, 127).to(torch.int8) for w in wb],
               "nib": [torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8) for _ in wb]}
    weights["nib_tma"], weights["int8_tma"], weights["mx8_tma"] = weights["nib"], weights["int8cvt"], weights["int8cvt"]
    e8m0 = [torch.randint(110, 125, (N, K // 32), device="cuda", dtype=torch.uint8) for _ in wb]
    partials = torch.empty(8 * M * N, device="cuda", dtype=torch.float32)
    from triton.tools.tensor_descriptor import TensorDescriptor
    for mode, bn, bk, w, st, sk, xl1, *bm in CONFIGS:
        bm = bm[0] if bm else M
        tma = mode.endswith("_tma")
        name = f"n{bn} bk{bk} w{w} st{st} sk{sk}" + ((" xd" if xl1 else "") if tma else (" xl1" if xl1 else "")) + \
            (f" m{bm}" if bm < M else "")
        ws = weights[mode]
        if tma:  # a descriptor per weight copy; xl1 means x through a descriptor here
            ws = [TensorDescriptor.from_tensor(c, [bn, bk // 2 if mode == "nib_tma" else bk]) for c in ws]
        es = e8m0 if mode == "mx8_tma" else [None] * copies
        xa = TensorDescriptor.from_tensor(x, [bm, bk]) if tma and xl1 else x
        per = K // sk

        def run(i, ws=ws, mode=mode, bn=bn, bk=bk, w=w, st=st, sk=sk, xl1=xl1, per=per, tma=tma, xa=xa, es=es, bm=bm):
            swap_floor[(N // bn, sk, M // bm)](xa, ws[i % copies], partials, N, K, per, MODE=MODES.index(mode),
                                      XL1=xl1 and not tma, BLOCK_N=bn, BLOCK_M=bm, BK=bk, STAGES=st,
                                      XD=bool(xl1 and tma), e8m0=es[i % copies], num_warps=w, num_stages=1)
            ql._splitk_reduce(ql.kernels_for("cuda"), partials.view(-1)[: sk * M * N].view(sk, M, N), None, y, sk,
                              False, False)
        try:
            run(0)
            if mode == "bf16" and not xl1:
                err = rel_err(y, x.double() @ wb[0].double().t())
                assert err < 1e-2, err
            row(mode, name, graph_time_us(run))
        except Exception:  # noqa: BLE001 — a failing config is reported, the sweep goes on
            print(f"{mode} {name}: {traceback.format_exc(limit=1)[-300:]}", flush=True)
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


if __name__ == "__main__":
    main()
