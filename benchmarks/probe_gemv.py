"""Probe: which Triton GEMV shape (M = 1..4 rows times a [N, K] bf16 weight) reaches HBM speed on
the H100, against cuBLAS, at the decoder's and issue 4's shapes. Informs the GEMV variant of the
matmul template (codegen/emit_matmul.py) and its autotune candidates.

Bytes model: N·K·2 (weight) + M·K·2 + M·N·2; time at 3.0 TB/s = bytes / 3.0e12. Weights rotate
over enough copies (> 4× the 50 MB L2) that every launch reads HBM, as a decode step does.
Each variant is timed as a CUDA graph of 20 launches (decode runs under CUDA graphs).

Usage: ``python benchmarks/probe_gemv.py`` -> results/probe_gemv.{json,md}
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from common import Results, graph_time_us, out_dirs


@triton.jit
def gemv_3d(X, W, Y, M, N, K, sxm, swn, sym,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    w_ptrs = W + rn[:, None] * swn + rk[None, :]
    x_ptrs = X + rm[:, None] * sxm + rk[None, :]
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=rn[:, None] < N, other=0.0)
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        else:
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & (rk[None, :] < K - k0), other=0.0)
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, 2)
    tl.store(Y + rm[:, None] * sym + rn[None, :], y.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def gemv_splitk(X, W, Y32, M, N, K, sxm, swn, sym, K_PER,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    ks = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = ks * K_PER + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    w_ptrs = W + rn[:, None] * swn + rk[None, :]
    x_ptrs = X + rm[:, None] * sxm + rk[None, :]
    k_end = tl.minimum(K, (ks + 1) * K_PER)
    for k0 in range(ks * K_PER, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptrs, mask=(rn[:, None] < N) & (kk[None, :] < k_end), other=0.0)
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (kk[None, :] < k_end), other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, 2)
    tl.atomic_add(Y32 + rm[:, None] * sym + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N), sem="relaxed")


def main() -> None:
    res = Results("probe_gemv")
    shapes = {"qkv_2048x3072": (3072, 2048), "o_2048x2048": (2048, 2048), "gateup_2048x11264": (11264, 2048),
              "down_5632x2048": (2048, 5632), "lmhead_2048x32000": (32000, 2048),
              "4096x4096": (4096, 4096), "4096x14336": (14336, 4096)}
    for name, (N, K), M in [(n, s, m) for n, s in shapes.items() for m in ((1, 4) if n in ('qkv_2048x3072', '4096x4096') else (1,))]:
        nbytes = N * K * 2
        copies = max(2, -(-200_000_000 // nbytes))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        y32 = torch.zeros(M, N, device="cuda", dtype=torch.float32)
        ref = (x.float() @ ws[0].float().t())
        wl = f"{name}_m{M}"
        best = {}

        def record(impl, us, out):
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if err > 2e-2:
                print(f"{wl} {impl}: WRONG rel err {err:.3e}", flush=True)
                return
            gbps = (nbytes + M * K * 2 + M * N * 2) / (us * 1e-6) / 1e12
            res.add(wl, impl, "time", us, "us")
            res.add(wl, impl, "bandwidth", gbps, "TB/s")
            best[impl] = us

        us = graph_time_us(lambda i: torch.mm(x, ws[i % copies].t(), out=y))
        torch.mm(x, ws[0].t(), out=y)
        record("cublas", us, y)
        for bn, bk, w, st in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4), (1, 3)):
            bm = max(1, triton.next_power_of_2(M))
            if bm * bn * bk > 16384 or bn * bk < 32 * w * 4:
                continue

            def run(i, bn=bn, bk=bk, w=w, st=st):
                gemv_3d[(triton.cdiv(N, bn),)](x, ws[i % copies], y, M, N, K, x.stride(0), K, y.stride(0),
                                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0,
                                              num_warps=w, num_stages=st)
            try:
                us = graph_time_us(run)
                run(0)
                record(f"triton_n{bn}k{bk}w{w}s{st}", us, y)
            except Exception as e:  # noqa: BLE001 — a config that does not compile is skipped
                print(f"{wl} n{bn}k{bk}w{w}s{st}: {type(e).__name__}", flush=True)
        for bn, bk, w, split in itertools.product((8, 16, 32), (256,), (4,), (2, 4, 8)):
            bm = max(1, triton.next_power_of_2(M))
            if bm * bn * bk > 16384:
                continue
            kper = -(-K // split)
            kper = -(-kper // bk) * bk

            def run_sk(i, bn=bn, bk=bk, w=w, split=split, kper=kper):
                y32.zero_()
                gemv_splitk[(triton.cdiv(N, bn), split)](x, ws[i % copies], y32, M, N, K, x.stride(0), K, y32.stride(0), kper,
                                                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
            try:
                us = graph_time_us(run_sk)
                run_sk(0)
                record(f"splitk_n{bn}k{bk}s{split}", us, y32)
            except Exception as e:  # noqa: BLE001
                print(f"{wl} splitk n{bn}k{bk}s{split}: {type(e).__name__}", flush=True)
        top = sorted(best.items(), key=lambda kv: kv[1])[:6]
        print(f"{wl}: cublas {best.get('cublas', 0):.1f} us; best " + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)
        torch.cuda.empty_cache()
    res.write(out_dirs())


if __name__ == "__main__":
    main()
