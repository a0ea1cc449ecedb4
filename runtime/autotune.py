"""Matmul autotuning: time candidate Triton configs and cuBLAS (+ a fused-epilogue launch) once per
(kernel, sizes, device), keep the fastest, and remember it on disk so the next compile or process
does not re-tune. The choice is recorded in the compile report ("which won").

Bytes/FLOPs model of a matmul: 2·B·M·N·K FLOPs over (B·M·K + B·K·N + B·M·N)·elt bytes; at the
H100's ~750 TFLOP/s and 3.0 TB/s, shapes with M ≳ 300 (fp16/bf16) are compute-bound.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Hopper-friendly tiles for wgmma, plus skinny ones.
# Kept short on purpose: every config is a Triton compile at first use (cold-compile budget), and
# measured on the H100 cuBLAS won 161 of 162 ViT-B/16 + decoder matmuls against a 10-config list.
TRITON_CONFIGS = [
    (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
    (32, 64, 128, 4, 4), (16, 128, 128, 4, 4),
]
EPILOGUE_CONFIG = (64, 128, 32, 4, 1, False)  # bandwidth-bound epilogue-only launch


# GEMV branch (M <= 4): (BLOCK_N, BLOCK_K, num_warps, num_stages), best first. From the H100 probe
# (benchmarks/results/probe_gemv.md): 4x1024 w4 was within 8% of the best config on every decoder
# and 4096-wide shape at M=1; 4x256 w2 at M=4.
GEMV_CONFIGS_M1 = [(4, 1024, 4, 1), (2, 1024, 4, 1), (4, 512, 2, 1)]
GEMV_CONFIGS = [(4, 256, 2, 1), (2, 256, 2, 1), (2, 512, 4, 1)]


def candidate_configs(M: int, N: int, K: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, gemv) candidates, best single guess first
    (used alone in "fast" mode). GEMV configs for M <= 4; else tensor-core tiles pruned by shape:
    none much taller than M or wider than N."""
    from .kernels import GEMV_MAX_M, next_pow2

    if M <= GEMV_MAX_M:
        return [(next_pow2(M), bn, bk, w, s, True) for bn, bk, w, s in (GEMV_CONFIGS_M1 if M == 1 else GEMV_CONFIGS)]
    out = []
    for bm, bn, bk, w, s in TRITON_CONFIGS:
        if bm > max(16, 2 * M) or bn > max(64, 2 * N) or bk > max(32, K):
            continue
        out.append((bm, bn, bk, w, s, False))
    return out or [(16, 64, 64, 4, 3, False)]


class AutotuneCache:
    """``<cache_dir>/autotune/<device>.json``: key -> {"winner": ..., "ms": {...}}."""

    _lock = threading.Lock()

    def __init__(self, cache_dir: str, device: torch.device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        safe = "".join(c if c.isalnum() else "_" for c in name)
        self.path = Path(cache_dir) / "autotune" / f"{safe}.json"
        try:
            self.table = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self.table = {}

    def get(self, key: str):
        return self.table.get(key)

    def put(self, key: str, entry: dict) -> None:
        with self._lock:
            self.table[key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.table, indent=1, sort_keys=True))
            tmp.replace(self.path)


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


GRAPH_RETIME_MS = 0.1  # below this, candidates are compared by CUDA-graph replay time


def bench_graph_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=10, return_mode="median"))


def tune(cache: AutotuneCache, key: str, candidates: dict) -> tuple[str, dict]:
    """Fastest of ``candidates`` (name -> zero-arg callable), from the cache when known."""
    hit = cache.get(key)
    if hit is not None and hit["winner"] in candidates:
        return hit["winner"], hit
    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = bench_ms(fn)
        except Exception as e:  # noqa: BLE001 — a config that fails to compile (e.g. smem) just loses
            times[name] = float("inf")
            times[name + ":error"] = f"{type(e).__name__}"
    finite = {k: v for k, v in times.items() if isinstance(v, float) and v != float("inf")}
    if finite and min(finite.values()) < GRAPH_RETIME_MS:
        # Small kernels: do_bench's timing includes the host's launch overhead (a Python launcher
        # with a workspace allocation looked 6x slower than it runs). Programs run them inside CUDA
        # graphs, so re-time every candidate inside one, where only GPU time counts.
        try:
            graph_ms = {k: bench_graph_ms(candidates[k]) for k in finite}
            times.update({k + ":graph": v for k, v in graph_ms.items()})
            finite = graph_ms
        except Exception as e:  # noqa: BLE001 — a candidate that cannot be captured: keep do_bench's numbers
            times["graph_retime:error"] = type(e).__name__
    winner = min(finite, key=finite.get)
    entry = {"winner": winner, "ms": {k: v for k, v in times.items() if isinstance(v, float)}}
    cache.put(key, entry)
    return winner, entry
