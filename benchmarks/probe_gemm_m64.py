"""H100 probe: more K splits for the M = 64 dequant GEMM (issue 4's gemm_4096x4096_m64 row). ncu (session
10, benchmarks/profile_gemm_m64.py) showed the defaults at 0.48 waves: 128-192 programs of 4-8 warps on
132 SMs, 1.5 active warps per scheduler, 25-35% issue utilization. This sweep raises SPLIT_K (4, 6, 8)
for the SWAP (64 / 128-wide weight tiles) and the plain (32 / 64-wide) configs of every weight-only
format, next to bf16 cuBLAS in the same run, timed as bench_quant.py (CUDA graph of 20 launches, weights
rotating over > 200 MB of copies; the split-K reduce kernel included).

Usage (repo root): ``python benchmarks/probe_gemm_m64.py`` -> results/probe_gemm_m64.*"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, bf16_baseline, graph_time_us, out_dirs, rel_err
from fxforge.passes.quant.formats import dequantize, quantize
from fxforge.runtime import quant_linear as ql

FORMATS = ["w4a16_g128", "w8a16", "mxint8", "nvint4", "nvfp4", "mxfp4"]
FINE = __import__("os").environ.get("PROBE_FINE") == "1"  # round 2: around the SWAP 64-wide 4-split winner
MX8 = __import__("os").environ.get("PROBE_MX8") == "1"  # round 4: MXINT8 after the one-FFMA decode
FINE_BLOCK = __import__("os").environ.get("PROBE_FINE_BLOCK") == "1"  # round 5: round 2's grid, block formats
PDL = __import__("os").environ.get("PROBE_PDL") == "1"  # round 6: the reduce with programmatic dependent launch
KB = __import__("os").environ.get("PROBE_KB") == "1"  # round 7: code bytes per step after the pair decodes
N128 = __import__("os").environ.get("PROBE_N128") == "1"  # round 8: SWAP on two warpgroups (128-row tiles)
PLANES = __import__("os").environ.get("PROBE_PLANES") == "1"  # round 9: the nibble-planes kernel at M = 64


def fine_variants(fmt: str, M: int, N: int, K: int) -> list[tuple[str, dict]]:
    """Round 2 (w4a16 / w8a16; with PROBE_FINE_BLOCK=1 the block formats, session 11): K splits around the
    default, stages 2-4, code bytes per step x1 / x2."""
    base = ql.triton_gemm_configs(M, N, K, fmt, False)[0]
    out = [("default", base)]
    d = base.get("SPLIT_K") or 4
    for sk in ((d // 2, d, d + d // 2) if FINE_BLOCK else (3, 4, 5)):
        for st in (2, 3, 4):
            for kbm in (1, 2):
                cfg = dict(base, SPLIT_K=sk, num_stages=st, BLOCK_KB=base["BLOCK_KB"] * kbm)
                if cfg != base:
                    kind = "swap" if cfg.get("SWAP") else "plain"
                    out.append((f"{kind} n{cfg['BLOCK_N']} w{cfg['num_warps']} sk{sk} s{st} kb{cfg['BLOCK_KB']}", cfg))
    return out


def mx8_variants(fmt: str, M: int, N: int, K: int) -> list[tuple[str, dict]]:
    """Round 4 (session 11, PROBE_MX8=1): MXINT8 after the one-FFMA decode (int8 times E8M0 scale), plain
    64-wide tiles over warps / code bytes per step / K splits, and the SWAP tile. (Round 3, the fused
    split-K reduce, is in git history with its kernel: results/probe_gemm_m64_fused.md.)"""
    cfgs = ql.gemm_configs(M, N, K, fmt, False)
    base = cfgs[0]
    out = [("default", base)]
    for w, kb, sk, st in [(4, 128, 4, 3), (8, 256, 4, 3), (4, 256, 4, 3), (8, 128, 2, 3), (4, 128, 2, 3),
                          (8, 128, 8, 3), (4, 128, 8, 3), (4, 128, 4, 4), (8, 128, 4, 4), (4, 64, 4, 4)]:
        out.append((f"plain n64 w{w} kb{kb} sk{sk} s{st}", dict(base, num_warps=w, BLOCK_KB=kb, SPLIT_K=sk,
                                                              num_stages=st)))
    out.append(("plain n128 w8 kb128 sk4", dict(base, BLOCK_N=128, SPLIT_K=4)))
    out.append(("swap n64 w4 kb128 sk4", dict(base, SWAP=True, num_warps=4, SPLIT_K=4)))
    return out


def pdl_variants(fmt: str, M: int, N: int, K: int) -> list[tuple[str, dict]]:
    """Round 6 (session 11, PROBE_PDL=1): the split-K reduce launched with programmatic dependent launch
    (the GEMM lets it be scheduled at once, it waits for the GEMM's grid) or plainly, default configs; each
    measured twice, interleaved."""
    base = ql.triton_gemm_configs(M, N, K, fmt, False)[0]
    return [("default, PDL", dict(base, PDL=True)), ("default, no PDL", dict(base, PDL=False)),
            ("default, PDL (again)", dict(base, PDL=True)), ("default, no PDL (again)", dict(base, PDL=False))]


def kb_variants(fmt: str, M: int, N: int, K: int) -> list[tuple[str, dict]]:
    """Round 7 (session 11, PROBE_KB=1): after the one-multiply nibble-pair decodes the decode is cheaper
    per element, so larger code steps (fewer fixed per-step instructions) may pay: BLOCK_KB x K splits."""
    base = ql.triton_gemm_configs(M, N, K, fmt, False)[0]
    out = [("default", base)]
    kbs = (64, 128, 256) if ql.kernel_format(fmt)["EPB"] == 1 else (32, 64, 128)
    for kb in kbs:
        for sk in (4, 8):
            cfg = dict(base, BLOCK_KB=kb, SPLIT_K=sk)
            if cfg != base:
                out.append((f"kb{kb} sk{sk}", cfg))
    return out


def n128_variants(fmt: str, M: int, N: int, K: int) -> list[tuple[str, dict]]:
    """Round 8 (session 12, PROBE_N128=1; built without a GPU, from offline sm_90 SASS of triton 3.6's
    ptxas): every 4-warp SWAP tile of the per-element-scaled formats issues its wgmmas one at a time
    (WARPGROUP.DEPBAR 0 after each: ptxas reuses one A-register quad; the fastest formats, w8a16 / w4a16,
    do not), the 8-warp 128-row tiles do not. DECODE_AHEAD (the next step's tile decoded in this step)
    makes Triton stage the decoded 4-bit tile in shared memory: no serialization, loops 20% shorter
    (nvint4 481 -> 380 instructions, nvfp4 270 -> 216, mxfp4 450 -> 355). MXINT8 also in SWAP with its
    scales a step ahead (new)."""
    base = ql.triton_gemm_configs(M, N, K, fmt, False)[0]
    swap = dict(base, SWAP=True, PREFETCH=False)
    kb = swap["BLOCK_KB"]
    four_bit = ql.kernel_format(fmt)["EPB"] == 2
    out = [("default", base)]
    for sk in (2, 4, 8):
        for st in (3, 4):
            out.append((f"swap n128 w8 sk{sk} s{st} kb{kb}", dict(swap, BLOCK_N=128, num_warps=8, SPLIT_K=sk,
                                                               num_stages=st)))
    if four_bit:
        for sk in (4, 8):
            for st in (3, 4):
                out.append((f"ahead n64 w4 sk{sk} s{st} kb{kb}", dict(swap, BLOCK_N=64, num_warps=4, SPLIT_K=sk,
                                                                   num_stages=st, DECODE_AHEAD=True)))
        for sk in (2, 4):
            out.append((f"ahead n128 w8 sk{sk} s3 kb{kb}", dict(swap, BLOCK_N=128, num_warps=8, SPLIT_K=sk,
                                                             num_stages=3, DECODE_AHEAD=True)))
    else:
        for st in (3, 4):
            out.append((f"swap n64 w4 sk4 s{st} kb{kb}", dict(swap, BLOCK_N=64, num_warps=4, SPLIT_K=4,
                                                           num_stages=st)))
    return out


def planes_variants(fmt: str, M: int, N: int, K: int) -> list[tuple[str, dict]]:
    """Round 9 (session 14, PROBE_PLANES=1; built without a GPU): dequant_gemv_planes (nibble planes decoded
    by inline PTX, 64-row x tiles as the dot's N) for w4a16 g128, nvint4, mxfp4, nvfp4 against the default.
    (BLOCK_N, warps, stages, SPLIT_K)"""
    out = [("default", ql.triton_gemm_configs(M, N, K, fmt, False)[0])]
    for bn, w, st, sk in [(64, 4, 3, 4), (64, 4, 4, 4), (128, 8, 3, 4), (128, 4, 3, 4), (64, 4, 3, 2), (64, 4, 3, 8),
                          (128, 8, 3, 2)]:
        out.append((f"planes n{bn} w{w} s{st} sk{sk}", {"PLANES": True, "BLOCK_N": bn, "BLOCK_M": 64, "num_warps": w,
                                                         "num_stages": st, "SPLIT_K": sk}))
    return out


def variants(fmt: str, M: int, N: int, K: int) -> list[tuple[str, dict]]:
    if PLANES:
        return planes_variants(fmt, M, N, K)
    if N128:
        return n128_variants(fmt, M, N, K)
    if KB:
        return kb_variants(fmt, M, N, K)
    if PDL:
        return pdl_variants(fmt, M, N, K)
    if MX8:
        return mx8_variants(fmt, M, N, K)
    if FINE or FINE_BLOCK:
        return fine_variants(fmt, M, N, K)
    cfgs = ql.gemm_configs(M, N, K, fmt, False)
    out = [("default", cfgs[0])]
    swap = next((c for c in cfgs if c.get("SWAP") and c["BLOCK_N"] == 64), None)
    plain = next((c for c in cfgs if not c.get("SWAP")), None)
    for sk in (4, 6, 8):
        if swap is not None:
            out.append((f"swap n64 w4 sk{sk}", dict(swap, SPLIT_K=sk)))
            out.append((f"swap n64 w4 s4 sk{sk}", dict(swap, SPLIT_K=sk, num_stages=4)))
        if plain is not None:
            out.append((f"plain n{plain['BLOCK_N']} w{plain['num_warps']} sk{sk}", dict(plain, SPLIT_K=sk)))
            if plain["BLOCK_N"] != 32:
                out.append((f"plain n32 w4 sk{sk}", dict(plain, SPLIT_K=sk, BLOCK_N=32, num_warps=4)))
    return out


def main() -> None:
    name = ("probe_gemm_m64_planes" if PLANES else "probe_gemm_m64_n128" if N128 else "probe_gemm_m64_kb" if KB else "probe_gemm_m64_pdl" if PDL else "probe_gemm_m64_mx8" if MX8 else "probe_gemm_m64_fine_block"
            if FINE_BLOCK else "probe_gemm_m64_fine" if FINE else "probe_gemm_m64")
    res = Results(name)
    lines = ["| format | config | us | x bf16 | rel err vs quant ref |", "|---|---|---|---|---|"]
    M, N, K = 64, 4096, 4096
    torch.manual_seed(0)
    ws, x, copies, bf = bf16_baseline(N, K, M)
    res.add("gemm_4096x4096_m64", "bf16", "time", bf, "us")
    lines.append(f"| bf16 | cuBLAS | {bf:.2f} | 1.00 | |")
    for fmt in (["w4a16_g128", "nvint4", "mxfp4", "nvfp4"] if PLANES else FORMATS[:2] if FINE else FORMATS[2:] if FINE_BLOCK or KB or N128 else ["mxint8"] if MX8 else FORMATS):
        qts = [quantize(w, fmt) for w in ws]
        args = [(q.codes, q.scales, q.zeros, q.tensor_scale) for q in qts]
        ref = x.double() @ dequantize(qts[0]).double().t()
        impl = fmt.split("_")[0]
        for name, cfg in variants(fmt, M, N, K):
            try:
                err = rel_err(ql.quant_linear_apply(x, *args[0], None, fmt, K, config=dict(cfg)), ref)
                us = graph_time_us(lambda i, cfg=cfg, args=args, fmt=fmt: ql.quant_linear_apply(
                    x, *args[i % copies], None, fmt, K, config=dict(cfg), check=False))
            except Exception as e:  # noqa: BLE001 — a failing config is reported, the sweep goes on
                print(f"{fmt} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                traceback.print_exc(limit=1)
                continue
            res.add("gemm_4096x4096_m64", f"{impl}[{name}]", "time", us, "us")
            res.add("gemm_4096x4096_m64", f"{impl}[{name}]", "speedup_vs_bf16", bf / us, "x")
            res.add("gemm_4096x4096_m64", f"{impl}[{name}]", "rel_err_vs_quant_ref", err, "rel_err")
            lines.append(f"| {impl} | {name} | {us:.2f} | {bf / us:.2f} | {err:.1e} |")
            print(lines[-1], flush=True)
        del qts, args
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


if __name__ == "__main__":
    main()
