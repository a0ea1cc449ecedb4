"""H100 probe: does occupancy limit the KIVI decode-attention kernel? ncu (session 10) showed the 2-bit
default (2 warps, 3 stages, 64 splits, 168 registers) at 1.9 active warps per scheduler and 45% issue
utilization, and the 4-bit default (1 warp, 255 registers, 128 splits) the same. This sweep trades
stages, splits and a register cap (``maxnreg``: 128 registers let 8 two-warp programs share an SM)
against each other at issue 4's kv_decode_32k shape (B = 1, 32 / 8 heads, D = 128, 32K tokens, bf16,
bf16 scales), timed exactly as bench_kv_decode.py (CUDA graph, launches rotating over 3 caches so every
call reads HBM), with bf16 SDPA in the same run.

Usage (repo root): ``python benchmarks/probe_kivi_occupancy.py`` -> results/probe_kivi_occupancy.*"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, graph_time_us, out_dirs, rel_err
from fxforge.passes.quant.kv import kivi_dequantize, kivi_quantize
from fxforge.runtime.kivi_attention import kivi_configs, kivi_decode_attention

SCALES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[__import__("os").environ.get("PROBE_SCALES", "bf16")]
# (warps, stages, splits, maxnreg or 0). PROBE_SCALES=fp32: 4-byte scales, which Triton's pipeliner can
# move with cp.async (2-byte bf16 scale loads stay synchronous LDG.U16 in the loop: 64 per step per thread)
GRID = {2: [(2, 3, 64, 0), (2, 2, 64, 0), (2, 2, 128, 0), (2, 2, 128, 128), (2, 2, 256, 128), (1, 2, 128, 0),
            (1, 2, 256, 0), (2, 3, 128, 0)],
        4: [(1, 2, 128, 0), (1, 2, 256, 0), (2, 2, 128, 168), (2, 2, 128, 0), (4, 2, 64, 0), (4, 2, 128, 0),
            (2, 2, 64, 0)]}

# PROBE_PACKED=1 (session 14): PACKED, the bit planes decoded in packed 16-bit pairs by one inline-PTX block
# per 4 code bytes (offline sm_90 loops, triton 3.6: 2-bit 2 warps 1040 -> 906 instructions per 32-token
# tile, 4-bit 1 warp 1606 -> 1255), against the same config without it, each twice (A B A B), plus a few
# occupancy points with it. (warps, stages, splits, maxnreg or 0, PACKED)
PACKED = __import__("os").environ.get("PROBE_PACKED") == "1"
PACKED_GRID = {2: [(2, 2, 128, 128, False), (2, 2, 128, 128, True), (2, 2, 128, 128, False), (2, 2, 128, 128, True),
                   (2, 3, 64, 0, True), (2, 2, 256, 128, True), (1, 2, 128, 0, True), (2, 2, 128, 0, True),
                   (4, 2, 64, 0, True)],
               4: [(1, 2, 128, 0, False), (1, 2, 128, 0, True), (1, 2, 128, 0, False), (1, 2, 128, 0, True),
                   (1, 2, 256, 0, True), (2, 2, 128, 168, True), (2, 2, 128, 0, True), (2, 2, 64, 0, True)]}

# PROBE_COMBINE=1 (session 14): the split combine kernel (decode_attention's, shared) -- old: one program per
# row (B·H·LQ = 32), 32 splits per step, no PDL; chunks: BLOCK_D channels per program (4 x 32 -> 128
# programs); s128: all 128 splits in one step; pdl: launched with programmatic dependent launch. Each
# variant twice, the KIVI defaults (PACKED), 2- and 4-bit. (name, COMBINE_BLOCK_S, COMBINE_MIN_BLOCK_D, PDL)
COMBINE = __import__("os").environ.get("PROBE_COMBINE") == "1"
COMBINE_GRID = [("old", 32, 1024, False), ("chunks", 32, 32, False), ("chunks s128", 128, 32, False),
                ("chunks s128 pdl", 128, 32, True)] * 2
if __import__("os").environ.get("PROBE_COMBINE16") == "1":  # session 15: 16 channels per program (256 programs)
    COMBINE_GRID = [("chunks s128", 128, 32, False), ("chunks16 s128", 128, 16, False)] * 2


def combine_sweep(res, lines, q, kv, sdpa) -> None:
    """PROBE_COMBINE: the KIVI defaults with each combine variant (module constants patched per run)."""
    import fxforge.runtime.decode_attention as da
    import fxforge.runtime.kivi_attention as ka
    saved = (da.COMBINE_BLOCK_S, da.COMBINE_MIN_BLOCK_D, ka.pdl_capable)
    for bits in (2, 4):
        caches = [kivi_quantize(a, b, bits=bits, group=32, residual=32, scale_dtype=SCALES) for a, b in kv]
        kd, vd = kivi_dequantize(caches[0])
        ref = F.scaled_dot_product_attention(q.double(), kd.double(), vd.double(), enable_gqa=True)
        for name, bs, bd, pdl in COMBINE_GRID:
            da.COMBINE_BLOCK_S, da.COMBINE_MIN_BLOCK_D = bs, bd
            ka.pdl_capable = saved[2] if pdl else (lambda device: False)
            try:
                err = rel_err(kivi_decode_attention(q, caches[0]), ref)
                us = graph_time_us(lambda i, caches=caches: kivi_decode_attention(q, caches[i % 3]))
            finally:
                da.COMBINE_BLOCK_S, da.COMBINE_MIN_BLOCK_D, ka.pdl_capable = saved
            impl = f"kivi{bits}[combine {name}]"
            res.add("kv_decode_32k", impl, "time", us, "us")
            res.add("kv_decode_32k", impl, "speedup_vs_sdpa", sdpa / us, "x")
            res.add("kv_decode_32k", impl, "rel_err_vs_fp64_same_cache", err, "rel_err")
            lines.append(f"| {impl} | default | | | | {us:.2f} | {sdpa / us:.2f} | {err:.1e} |")
            print(lines[-1], flush=True)

# PROBE_VSWORD=1 (session 14, built without a GPU): VS_WORD, a token's 4 value scales / mins read as one int64
# each (offline sm_90 loop, 2-bit default: 906 -> 785 instructions per 32-token tile, the 64 LDG.U16 gone),
# against the PACKED default, each twice. (warps, stages, splits, maxnreg or 0, PACKED, VS_WORD)
VSWORD = __import__("os").environ.get("PROBE_VSWORD") == "1"
VSWORD_GRID = {2: [(2, 2, 128, 128, True, False), (2, 2, 128, 128, True, True)] * 2 + [(2, 2, 128, 0, True, True),
                                                                                     (1, 2, 128, 0, True, True)],
               4: [(1, 2, 128, 0, True, False), (1, 2, 128, 0, True, True)] * 2 + [(2, 2, 128, 0, True, True)]}
# PROBE_W1=1 (session 15): one warp per program for 2-bit without the 128-register cap. The session-14 1-warp
# point (67.7 us) kept the default's maxnreg 128 and spilled; offline sm_90 (triton 3.6), loop instructions per
# 32-token tile: 2 warps capped 2 x 794 = 1588 (q reloaded from shared memory every tile), 1 warp uncapped
# 1232 (255 registers, 8 programs per SM), capped at 192: 1270 (10 per SM). maxnreg -1: no cap.
W1 = __import__("os").environ.get("PROBE_W1") == "1"
W1_COMBINE16 = __import__("os").environ.get("PROBE_COMBINE16") == "1"
W1_GRID = {2: [(2, 2, 128, 0, True, True), (1, 2, 128, -1, True, True), (1, 3, 128, -1, True, True),
               (1, 2, 128, 192, True, True), (1, 2, 160, 192, True, True), (1, 2, 128, 168, True, True),
               (1, 2, 192, 168, True, True), (1, 2, 96, -1, True, True), (2, 2, 128, -1, True, True),
               (2, 2, 128, 0, True, True), (1, 2, 128, -1, True, True)],
           4: [(1, 2, 128, 0, True, True), (1, 3, 128, 0, True, True), (1, 2, 128, 192, True, True),
               (1, 2, 160, 192, True, True), (1, 2, 128, 0, True, True)]}

# PROBE_KSWORD=1 (session 15): KS_WORD, a plane's key scales / mins read as int32 channel pairs. ncu of the
# one-warp 2-bit point above: long-scoreboard stalls 4.1 per issued instruction (0.7 for the defaults), from
# 8 plain 2-byte key-scale loads a tile (cp.async needs 4 bytes a thread). Offline sm_90: one warp 1232 ->
# 1212 loop instructions, no plain loads left, 230 registers; 2 warps 794 -> 835; 4-bit 1355 -> 1321.
# (warps, stages, splits, maxnreg (0: the default's, -1: none), PACKED, VS_WORD, KS_WORD)
KSWORD = __import__("os").environ.get("PROBE_KSWORD") == "1"
KSWORD_GRID = {2: [(2, 2, 128, 0, True, True, False), (1, 2, 128, -1, True, True, True), (2, 2, 128, 0, True, True, True),
                   (1, 3, 128, -1, True, True, True), (1, 2, 96, -1, True, True, True), (1, 2, 64, -1, True, True, True),
                   (2, 2, 128, 0, True, True, False), (1, 2, 128, -1, True, True, True)],
               4: [(1, 2, 128, 0, True, True, False), (1, 2, 128, 0, True, True, True)] * 2}

# PROBE_VPAIRS=1 (session 15, built after the device budget ran out): V_PAIRS, the value dequant fma as explicit
# fma.rn.bf16x2 on token pairs (_fma_token_pairs) instead of the plain expression, which LLVM vectorizes over
# channel pairs and re-pairs with PRMTs. Offline sm_90: 2-bit default (one warp) 1212 -> 1176 loop
# instructions per tile (PRMT 184 -> 133), 4-bit 1321 -> 1278. A B A B against the defaults.
# (warps, stages, splits, maxnreg, PACKED, VS_WORD, KS_WORD, V_PAIRS)
VPAIRS = __import__("os").environ.get("PROBE_VPAIRS") == "1"
VPAIRS_GRID = {2: [(1, 2, 128, -1, True, True, True, False), (1, 2, 128, -1, True, True, True, True)] * 2,
               4: [(1, 2, 128, 0, True, True, True, False), (1, 2, 128, 0, True, True, True, True)] * 2}


# Every grid starts from kivi_configs' default of the day (maxnreg 0 = keep its cap, if any). Since session
# 15 that is, for 2-bit D = 128, one warp without a cap and with VS_WORD / KS_WORD on: re-running an older
# round measures its points on top of that, not what its result file (taken then) describes.


# (enabled, result name, grids by bits) per round, newest first; the first enabled one runs (COMBINE: its own sweep,
# no grid); none: the occupancy grid
ROUNDS = [(VPAIRS, "probe_kivi_vpairs", VPAIRS_GRID), (KSWORD, "probe_kivi_ksword", KSWORD_GRID),
          (W1, "probe_kivi_w1", W1_GRID), (COMBINE and W1_COMBINE16, "probe_kivi_combine16", {}),
          (VSWORD, "probe_kivi_vsword", VSWORD_GRID), (COMBINE, "probe_kivi_combine", {}),
          (PACKED, "probe_kivi_packed", PACKED_GRID),
          (True, "probe_kivi_occupancy" + ("" if SCALES == torch.bfloat16 else "_" + str(SCALES).split(".")[-1]), GRID)]


def main() -> None:
    _, name, grids = next(r for r in ROUNDS if r[0])
    res = Results(name)
    lines = ["| impl | warps | stages | splits | maxnreg | us | x SDPA | rel err vs fp64 |", "|---|---|---|---|---|---|---|---|"]
    B, HQ, HKV, S, D = 1, 32, 8, 32768, 128
    torch.manual_seed(0)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    kv = [(torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16),
           torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    sdpa = graph_time_us(lambda i: F.scaled_dot_product_attention(q, *kv[i % 3], enable_gqa=True))
    res.add("kv_decode_32k", "sdpa", "time", sdpa, "us")
    lines.append(f"| sdpa | | | | | {sdpa:.2f} | 1.00 | |")
    if COMBINE:
        combine_sweep(res, lines, q, kv, sdpa)
    for bits, grid in ({} if COMBINE else grids).items():
        caches = [kivi_quantize(a, b, bits=bits, group=32, residual=32, scale_dtype=SCALES) for a, b in kv]
        kd, vd = kivi_dequantize(caches[0])
        ref = F.scaled_dot_product_attention(q.double(), kd.double(), vd.double(), enable_gqa=True)
        base = kivi_configs(1, HQ, HKV, D, 32, False, bits=bits, v_group=32)[0]
        plain = None  # PACKED: the output of the first unpacked config, which packed ones must equal bit for bit
        for w, st, splits, mr, *pk in grid:
            cfg = dict(base, num_warps=w, num_stages=st)
            if mr > 0:
                cfg["maxnreg"] = mr
            elif mr < 0:
                cfg.pop("maxnreg", None)
            if pk:
                cfg["PACKED"] = pk[0]
            if len(pk) > 1:
                cfg["VS_WORD"] = pk[1]
            if len(pk) > 2:
                cfg["KS_WORD"] = pk[2]
            if len(pk) > 3:
                cfg["V_PAIRS"] = pk[3]
            name = (f"kivi{bits}{'' if SCALES == torch.bfloat16 else '_' + str(SCALES).split('.')[-1]}[w{w} s{st} sp{splits}"
                    + (f" r{mr}" if mr > 0 else " nocap" if mr < 0 else "") + (" packed" if pk and pk[0] else "")
                    + (" vsword" if len(pk) > 1 and pk[1] else "") + (" ksword" if len(pk) > 2 and pk[2] else "")
                    + (" vpairs" if len(pk) > 3 and pk[3] else "") + "]")
            try:
                o = kivi_decode_attention(q, caches[0], blocks=dict(cfg), num_splits=splits)
                err = rel_err(o, ref)
                if KSWORD or VPAIRS:  # every config against the first (the default): the same bits
                    if plain is None:
                        plain = (splits, o.clone())
                    elif plain[0] == splits:  # (other splits: other partial sums)
                        diff = (o.float() - plain[1].float()).abs().max().item()
                        res.add("kv_decode_32k", name, "max_abs_diff_vs_reference", diff, "abs")
                        print(name, "max |diff| vs the default", diff, flush=True)
                elif pk and (not pk[0] or VSWORD and not pk[1]) and plain is None:
                    plain = (splits, o.clone())
                elif pk and (pk[0] if not VSWORD else pk[1]) and plain is not None and plain[0] == splits:
                    diff = (o.float() - plain[1].float()).abs().max().item()
                    res.add("kv_decode_32k", name, "max_abs_diff_vs_reference" if VSWORD else "max_abs_diff_vs_unpacked", diff, "abs")
                    print(name, "max |diff| vs the reference config", diff, flush=True)
                us = graph_time_us(lambda i, cfg=cfg, splits=splits, caches=caches: kivi_decode_attention(
                    q, caches[i % 3], blocks=dict(cfg), num_splits=splits))
            except Exception as e:  # noqa: BLE001 — a config that fails is reported, the sweep goes on
                print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            res.add("kv_decode_32k", name, "time", us, "us")
            res.add("kv_decode_32k", name, "speedup_vs_sdpa", sdpa / us, "x")
            res.add("kv_decode_32k", name, "rel_err_vs_fp64_same_cache", err, "rel_err")
            lines.append(f"| kivi{bits} | {w} | {st} | {splits} | {mr or ''} | {us:.2f} | {sdpa / us:.2f} | {err:.1e} |")
            print(lines[-1], flush=True)
    res.write(out_dirs(), notes=["", "## Sweep", ""] + lines)


if __name__ == "__main__":
    main()
