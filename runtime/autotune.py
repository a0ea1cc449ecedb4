"""Matmul autotuning: time candidate Triton configs and cuBLAS (+ a fused-epilogue launch) once per
(kernel, sizes, device), keep the fastest, and remember it on disk so the next compile or process
does not re-tune. The choice is recorded in the compile report ("which won"; ``note`` says why the
TMA variant was not offered where it was not). On sm_90+ the candidates include the TMA twin
(``tma_<BMxBNxBKxWxS>``, codegen/emit_matmul_tma.py) with its epilogue fused, which is what
must beat "cuBLAS + epilogue launch" for an epilogue to pay for staying in the matmul group.

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


# ---- Hopper TMA variant (codegen/emit_matmul_tma.py) -------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, flatten, epilogue slices, CTAs per SM, TMA store])
# (see tma_fields), best first. Every config is a compile at first use: keep the list short.
# Why these (H100 probe, benchmarks/results/probe_gemm_tma.md, and sm_90 compiles with triton 3.9's
# ptxas): the bare mainloop matches cuBLAS (fc1 96 us), but a fused erf-GELU epilogue is ~36 SASS
# instructions per element (libdevice erff alone ~25), i.e. ~45 us of issue per SM at fc1's 38.7M
# outputs, and with one persistent CTA per SM nothing overlaps it (fc1: 155 us at best).
# - "_ts": the first output goes registers -> shared memory -> TMA store: no per-element 64-bit
#   address/mask math, async (drains during the next tile), and fewer registers (fc1 128x128 w8:
#   181 -> 121).
# - "_c2": two persistent CTAs per SM, so one CTA's epilogue runs while the other's wgmmas keep the
#   tensor cores busy. Needs <= 128 registers per thread at 8 warps and <= ~113 KB of shared memory:
#   128x128x64 w8 s3 with 4 epilogue slices (GELU 107 regs / 104 KB, SiLU*up 122 / 112 KB, residual
#   113 / 112 KB, bias 98 / 104 KB: full-tile operands are TMA-loaded with the TMA store; with plain
#   loads a residual took 120 KB, too much for two) and s2 (every epilogue fits twice, <= 80 KB).
# - 128x256 w8 with 4 slices + TMA store: no spills (GELU 179 regs, residual 188, SiLU*up 210); in
#   halves a residual epilogue with plain loads took 240 KB of shared memory (over 227 KB).
# The plain-store 128x256 / 128x128 configs stay as fallbacks (measured: fc1 169 / 155 us, dec down
# 68.9 us < cuBLAS + epilogue 71.6). 64x128 w4 is for short matmuls (M <= 64 keeps only 64-row tiles).
# Order from the second H100 probe (benchmarks/results/probe_gemm_tma.md): on ViT fc1 + GELU the two
# 2-CTA/SM TMA-store configs (2 or 4 epilogue slices) ran 142-145 us against cuBLAS + epilogue 164 us;
# 128x256 (1 CTA/SM) 168-171 us. "fast" autotune tries the first two for a fused epilogue.
TMA_CONFIGS = [(128, 128, 64, 8, 3, True, 4, 2, True), (128, 128, 64, 8, 3, True, 2, 2, True),
               (128, 256, 64, 8, 3, True, 4, 1, True), (128, 128, 64, 8, 2, True, 4, 2, True), (128, 256, 64, 8, 3),
               (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)]
TMA_DTYPES = (torch.float16, torch.bfloat16)  # fp32 (IEEE, no TF32) stays with cuBLAS / the regular kernel
TMA_MIN_CC = 9  # TMA and wgmma: sm_90+


def tma_configs(M: int, N: int, K: int, fast: bool, epilogue: bool) -> list[tuple]:
    """TMA candidates for an M x N x K matmul, best guess first. "fast" autotune keeps one where an
    epilogue is fused (the case this variant exists for: it must beat cuBLAS + an epilogue launch;
    the runner-up was within 1% on ViT fc1 and 30% slower on the decoder's SiLU·up, and each config
    is a Triton compile in the cold-compile budget) and none for a bare matmul: cuBLAS writes it
    directly and won 5 of the 6 bare shapes of the second H100 probe (the 6th by 1.5%)."""
    wide = [c for c in TMA_CONFIGS if c[0] <= max(64, M) and c[1] <= max(128, N)]
    if N < 2048:  # few column tiles: the narrower tile first (more tiles per wave)
        wide.sort(key=lambda c: c[1] != 128)
    if not wide:
        return []
    return (wide[:1] if epilogue else []) if fast else wide


def tma_fields(cfg) -> tuple:
    """(bm, bn, bk, warps, stages, flatten, split, ctas_per_sm, tma_store) of a TMA config tuple
    ``(BM, BN, BK, W, S[, flatten=True[, split=None[, ctas_per_sm=1[, tma_store=False]]]])``;
    split None: chosen by tma_launch from the accumulator's registers per thread."""
    bm, bn, bk, w, s = cfg[:5]
    rest = tuple(cfg[5:]) + (True, None, 1, False)[len(cfg) - 5:]
    return bm, bn, bk, w, s, bool(rest[0]), rest[1], int(rest[2]), bool(rest[3])


def tma_name(cfg) -> str:
    """Variant name of a TMA config, e.g. ``tma_128x256x64x8x3`` (``_nf``: loop nest not flattened,
    ``_e2``: epilogue in 2 column slices, ``_c2``: 2 programs per SM, ``_ts``: TMA store of the output)."""
    _, _, _, _, _, flatten, split, ctas, store = tma_fields(cfg)
    return ("tma_" + "x".join(map(str, cfg[:5])) + ("" if flatten else "_nf") + ("" if split is None else f"_e{split}")
            + ("" if ctas == 1 else f"_c{ctas}") + ("_ts" if store else ""))


def _tma_view(t: torch.Tensor):
    """(2-D view whose last stride is 1, transposed?) or a reason string: TMA needs a unit inner
    stride, 16-byte aligned outer strides and a 16-byte aligned base."""
    if t.dim() != 2:
        return f"{t.dim()}-D operand"
    if t.data_ptr() % 16:
        return "base pointer not 16-byte aligned"
    if t.stride(1) == 1:
        view, transposed = t, False
    elif t.stride(0) == 1:
        view, transposed = t.t(), True
    else:
        return f"no unit stride (strides {tuple(t.stride())})"
    if (view.stride(0) * t.element_size()) % 16:
        return f"outer stride {view.stride(0)} x {t.element_size()} B is not a multiple of 16 bytes"
    return view, transposed


def tma_refusal(a: torch.Tensor, b: torch.Tensor, batch: int, M: int, dtypes=TMA_DTYPES) -> str | None:
    """Why the TMA variant cannot (or should not) run A @ B; None when it can."""
    from .kernels import GEMV_MAX_M

    if batch != 1 or a.dim() != 2 or b.dim() != 2:
        return "bmm (batched): no TMA variant"
    if M <= GEMV_MAX_M:
        return f"M={M} <= {GEMV_MAX_M}: the GEMV branch"
    if a.dtype not in dtypes or b.dtype not in dtypes:
        return f"dtype {a.dtype}/{b.dtype}: TMA variant offered for {', '.join(str(d) for d in dtypes)}"
    for name, t in (("A", a), ("B", b)):
        v = _tma_view(t)
        if isinstance(v, str):
            return f"{name}: {v}"
    return None


TMA_STORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tma_store_refusal(out: torch.Tensor | None, M: int, N: int) -> str | None:
    """Why the first output cannot be stored through a TMA descriptor (the kernel then keeps plain
    masked stores); None when it can: a row-major M x N matrix (any leading shape flattening to M rows,
    unit column stride), 16-byte aligned base and row stride, a TMA-storable dtype."""
    if out is None:
        return "no output tensor"
    if out.dtype not in TMA_STORE_DTYPES:
        return f"output dtype {out.dtype}"
    if out.dim() < 1 or out.shape[-1] != N or out.numel() != M * N:
        return f"output shape {tuple(out.shape)} is not {M} rows of {N}"
    if not out.is_contiguous():
        return f"output not contiguous (strides {tuple(out.stride())})"
    if out.data_ptr() % 16:
        return "output base pointer not 16-byte aligned"
    if (N * out.element_size()) % 16:
        return f"output row {N} x {out.element_size()} B is not a multiple of 16 bytes"
    return None


def tma_launch(kern, a, b, ptrs, scalars, strides, cfg, num_sms: int, interpreted: bool = False, flatten: bool = True,
               out: torch.Tensor | None = None, tile_loads=()):
    """Launch ``<kernel>_tma`` (the TMA twin of a matmul step) for config ``cfg`` (see tma_fields): host-side
    tensor descriptors over A and B (and, for a ``tma_store`` config whose output ``out`` passes
    tma_store_refusal, over the output; else plain stores), a CPU-only encoding the launcher passes by
    value, so capture-safe in a CUDA graph; min(#SM x ctas_per_sm, #tiles) persistent programs. With the
    TMA store, the full-tile epilogue operands (``tile_loads``: their indices in ``ptrs``, the matmul
    step's ``launch["tma_tile_loads"]``) that pass the same checks are loaded through descriptors too.
    Call ``tma_refusal`` first."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, w, s, flat, split, ctas, store = tma_fields(cfg)
    flatten = flat if len(cfg) > 5 else flatten  # a 6th entry: flatten the persistent loop nest?
    # Epilogue in two column halves when the fp32 accumulator takes >= 128 registers per thread
    # (128x256 with 8 warps, 128x128 with 4): measured by compiling for sm_90, whole-tile epilogues
    # there hit 255 registers and spill (GELU: 232 B, residual add: 600 B of stack per thread).
    if split is None:
        split = 2 if bm * bn // (32 * w) >= 128 and not interpreted else 1
    (av, a_t), (bv, b_t) = _tma_view(a), _tma_view(b)
    a_desc = TensorDescriptor(av, list(av.shape), list(av.stride()), [bk, bm] if a_t else [bm, bk])
    b_desc = TensorDescriptor(bv, list(bv.shape), list(bv.stride()), [bn, bk] if b_t else [bk, bn])
    M, N = scalars[0], scalars[1]
    c_desc, t_descs, in_tma = None, [], 0
    if store and tma_store_refusal(out, M, N) is None:
        c_desc = TensorDescriptor(out.view(M, N), [M, N], [N, 1], [bm, bn // split])
    for j, idx in enumerate(tile_loads):
        t = ptrs[idx]
        ok = store and tma_store_refusal(t, M, N) is None
        t_descs.append(TensorDescriptor(t.view(M, N), [M, N], [N, 1], [bm, bn // split]) if ok else None)
        in_tma |= int(ok) << j
    tiles = -(-M // bm) * -(-N // bn)
    progs = num_sms * ctas  # a constexpr: the same for every shape, the grid is at most #tiles
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "NUM_SMS": progs, "A_T": a_t, "B_T": b_t,
          "FLATTEN": flatten, "EPI_SPLIT": split, "EPI_N": bn // split, "OUT_TMA": c_desc is not None, "IN_TMA": in_tma,
          "INTERPRETED": interpreted}
    if not interpreted:
        kw.update(num_warps=w, num_stages=s)
    kern[(max(1, min(progs, tiles)),)](a_desc, b_desc, c_desc, *t_descs, *ptrs, *scalars, *strides, **kw)


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
