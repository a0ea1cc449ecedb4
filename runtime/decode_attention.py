"""Split-KV ("flash-decoding") attention for decode steps: a few query tokens against a long
key/value cache. ``decode_attention(...)`` is the direct Python entry point; ``launch(...)`` is the
lower-level call for the executor (kernels, workspace and launch config chosen by the caller).

Semantics are those of ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
enable_gqa=True)`` without causal masking; rows whose keys are all masked give 0, not NaN.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .kernels import (
    cuda_sm_count,
    device_index,
    next_pow2,
    pdl_capable,
    template_kernels,
)

TEMPLATE = Path(__file__).resolve().parent.parent / "codegen" / "templates" / "decode_attention.py"
NAME = "fxf_decode_attention"

MIN_SPLIT_KEYS = 128  # a split reads at least this many keys (H100, S=2048, D=64: 16 splits of 128 keys 7.5 µs, 8 of 256 7.9)
CPU_SMS = 4  # stand-in "SM count" for the interpreter: a few splits, like a tiny GPU
MAX_BLOCK_M = 128  # query rows (head group × tokens) per program; more rows take a third grid axis
COMBINE_BLOCK_S = 128  # splits merged per step of the combine kernel (one step for the usual 64-128 splits)
COMBINE_MIN_BLOCK_D = 32  # fewest channels per combine program (128-byte rows of the fp32 workspace)
# The combine kernel with programmatic dependent launch after the split kernel (results/probe_kivi_combine.md,
# KIVI 32K, H100): 2-bit 34.1 vs 34.1-34.2 us, 4-bit 35.1-35.2 vs 34.3-34.6: no gain, off.
COMBINE_PDL = False
SMEM_BUDGET = 200 * 1024  # bytes of shared memory for the pipelined K/V tiles (H100/H200: 227 KB per block)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(device_type: str, cache_dir: str | None = None):
    """(split kernel, combine kernel) for ``device_type``."""
    from fxforge.config import cache_dir as env_cache_dir

    return template_kernels(str(TEMPLATE), (f"{NAME}_split", f"{NAME}_combine"), device_type,
                            cache_dir or env_cache_dir(), NAME)


def sm_count(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_sm_count(device_index(device))
    return CPU_SMS


def block_m(tq: int, hq: int, hkv: int) -> int:
    """Rows per program: the whole group G = (hq // hkv)·tq rounded up to a power of two (≥ 16 for
    ``tl.dot``), at most MAX_BLOCK_M (larger groups are tiled over a third grid axis)."""
    return min(max(16, next_pow2((hq // hkv) * tq)), MAX_BLOCK_M)


def decode_configs(tq: int, hq: int, hkv: int, d: int, interpreted: bool, elt: int = 2) -> list[dict]:
    """Launch configs to try (the first is the default): BLOCK_M, BLOCK_N, HEAD_DIM and, on CUDA,
    num_warps / num_stages. ``elt``: bytes per element of q/k/v (4 for float32), which bounds the
    q tile and pipelined K/V tiles in shared memory: (num_stages·BLOCK_N·2 + BLOCK_M)·HEAD_DIM·elt
    ≤ SMEM_BUDGET (measured on the H100: q 64×256 + 3 stages of 64×256 K/V in bf16 needs 233472 B)."""
    head = max(16, next_pow2(d))
    bm = block_m(tq, hq, hkv)
    if interpreted:  # tiny blocks: the interpreter's cost is per element, and small tests still see several blocks
        return [{"BLOCK_M": bm, "BLOCK_N": 16, "HEAD_DIM": head}]
    if head >= 256:  # keep the fp32 [BLOCK_M, HEAD_DIM] accumulator within registers
        bm = min(bm, 64)
    cand = ((64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 4), (32, 4, 3))
    out = []
    for bn, w, st in cand:
        while st > 2 and (st * bn * 2 + bm) * head * elt > SMEM_BUDGET:
            st -= 1
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": head, "num_warps": w, "num_stages": st}
        if (st * bn * 2 + bm) * head * elt <= SMEM_BUDGET and cfg not in out:  # (unpipelined configs are not worth trying)
            out.append(cfg)
    return out


def split_plan(s: int, programs: int, block_n: int, device, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, chunk): the keys are cut into ``splits`` contiguous chunks of ``chunk`` keys (a
    multiple of block_n; the last may be shorter). ``programs`` = programs per split (B·Hkv·row tiles).

    Automatic choice (a wave model, fitted on an H100): one split when the programs already cover
    the SMs; else the fewest splits whose grid fills its waves to ≥ 95% (programs·splits /
    (waves·SMs)), each split ≥ MIN_SPLIT_KEYS keys, or where none does, the best filling one. One
    wave of ~128 programs beat two on the H100 (B=1, Hkv=8, S=32K: 16 splits 50.2 µs, 32 splits
    51.4; B=4, S=8K: 4 splits 49.6, 9 splits 57.0; B=16, S=4K: 1 split 89.7, 3 splits 96.9)."""
    if s <= 0:
        return 1, block_n
    nblocks = -(-s // block_n)

    def plan(ns):
        ns = max(1, min(int(ns), nblocks))
        chunk = -(-nblocks // ns) * block_n
        return -(-s // chunk), chunk  # no empty split
    if num_splits is not None:
        return plan(num_splits)
    sms, programs = sm_count(device), max(programs, 1)
    if programs >= sms:
        return plan(1)
    best, best_eff = plan(1), 0.0
    for ns in range(1, min(nblocks, max(1, s // MIN_SPLIT_KEYS)) + 1):
        cand = plan(ns)
        p = programs * cand[0]
        eff = p / (-(-p // sms) * sms)
        if eff > best_eff + 1e-9:
            best, best_eff = cand, eff
        if eff >= 0.95:
            break
    return best


def workspace_numel(b: int, hq: int, tq: int, d: int, splits: int) -> int:
    """fp32 elements of the workspace for ``splits`` > 1: partial outputs [B, Hq, Tq, splits, D]
    then (m, l) pairs [B, Hq, Tq, splits, 2]. Zero for a single split."""
    return 0 if splits <= 1 else b * hq * tq * splits * (d + 2)


def split_workspace(workspace, b: int, hq: int, tq: int, d: int, splits: int, out: torch.Tensor, what: str):
    """(partial outputs, (m, l) pairs) views of ``workspace`` (allocated when None; checked when given) for
    ``splits`` > 1; with one split the kernel writes ``out`` directly and both are ``out``."""
    need = workspace_numel(b, hq, tq, d, splits)
    if not need:
        return out, out
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=out.device)
    elif workspace.dtype != torch.float32 or workspace.numel() < need or not workspace.is_contiguous():
        raise ValueError(f"{what}: workspace must be a contiguous float32 tensor of ≥ {need} elements")
    return workspace[: b * hq * tq * splits * d], workspace[b * hq * tq * splits * d: need]


def _mask_strides(mask: torch.Tensor | None) -> tuple:
    if mask is None:
        return (0, 0, 0, 0)
    shp, st = list(mask.shape), list(mask.stride())
    shp, st = [1] * (4 - len(shp)) + shp, [0] * (4 - len(st)) + st
    return tuple(0 if n == 1 else x for n, x in zip(shp, st))


def check_inputs(q, k, v, mask=None, out=None) -> None:
    """ValueError with a clear message for anything the kernels cannot run."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"decode_attention: {name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"decode_attention: q dtype {q.dtype} not supported (float16, bfloat16, float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention: q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"decode_attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    B, H, _, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"decode_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"decode_attention: batch of q ({B}) and k/v ({k.shape[0]}) differ")
    if k.shape[3] != D:
        raise ValueError(f"decode_attention: head dim of q ({D}) and k/v ({k.shape[3]}) differ")
    if D < 1 or D > 256:
        raise ValueError(f"decode_attention: head dim {D} not supported (1..256)")
    hkv = k.shape[1]
    if hkv < 1 or H % hkv:
        raise ValueError(f"decode_attention: query heads ({H}) must be a multiple of key/value heads ({hkv})")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"decode_attention: mask must be bool or floating point, got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"decode_attention: mask on {mask.device}, q on {q.device}")
        full = (B, H, q.shape[2], k.shape[2])
        shp = tuple(mask.shape)
        if len(shp) > 4 or any(m not in (1, f) for m, f in zip(shp[::-1], full[::-1])):
            raise ValueError(f"decode_attention: mask shape {shp} does not broadcast to [B, Hq, Tq, S] = {list(full)}")
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"decode_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")


def launch(kern1, kern2, q, k, v, mask, out, scale: float, num_splits: int | None = None, blocks: dict | None = None,
           workspace: torch.Tensor | None = None):
    """Run split + combine: q [B,Hq,Tq,D], k/v [B,Hkv,S,D] (any strides), optional mask broadcastable
    to [B,Hq,Tq,S] (bool: keep where True; float: added to the scores), ``out`` [B,Hq,Tq,D] written in
    place and returned. ``num_splits`` None: automatic (see split_plan). ``workspace``: optional flat
    fp32 tensor of at least workspace_numel(...) elements (allocated here when None)."""
    interpreted = q.device.type == "cpu"
    B, H, LQ, D = q.shape
    HKV, LK = k.shape[1], k.shape[2]
    if out.numel() == 0:
        return out
    if LK == 0:  # no keys: every row is fully masked
        return out.zero_()
    cfg = dict(blocks or decode_configs(LQ, H, HKV, D, interpreted, k.element_size())[0])
    if interpreted:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_tiles = -(-((H // HKV) * LQ) // bm)
    splits, chunk = split_plan(LK, B * HKV * row_tiles, bn, q.device, num_splits)
    acc_ws, ml_ws = split_workspace(workspace, B, H, LQ, D, splits, out, "decode_attention")
    out_bf16 = out.dtype == torch.bfloat16
    pdl = COMBINE_PDL and splits > 1 and pdl_capable(q.device)
    if pdl:
        cfg["PDL"] = True
    kern1[(splits, B * HKV, row_tiles)](
        q, k, v, mask if mask is not None else q, out, acc_ws, ml_ws, scale,
        *q.stride(), *k.stride(), *v.stride(), *_mask_strides(mask), *out.stride(),
        H, HKV, LQ, LK, D, chunk, splits,
        HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool, SINGLE=splits == 1,
        OUT_BF16=out_bf16, IEEE=q.dtype == torch.float32, D_CONST=D, INTERPRETED=interpreted, **cfg)
    if splits > 1:
        launch_combine(kern2, acc_ws, ml_ws, out, splits, cfg["HEAD_DIM"], interpreted, pdl)
    return out


def launch_combine(kern2, acc_ws, ml_ws, out, splits: int, head: int, interpreted: bool, pdl: bool) -> None:
    """The combine kernel over ``splits`` partials of out [B, H, LQ, D]: one program per (row, BLOCK_D
    channels), BLOCK_D halved from HEAD_DIM (down to COMBINE_MIN_BLOCK_D) while the programs would not
    fill the SMs twice (B = 1, 32 heads, D = 128: 4 chunks, 128 programs); with ``pdl`` launched with
    programmatic dependent launch after a split kernel that signalled it (PDL=True there)."""
    B, H, LQ, D = out.shape
    rows = B * H * LQ
    block_d = head
    while block_d > COMBINE_MIN_BLOCK_D and rows * (head // block_d) < 2 * sm_count(out.device):
        block_d //= 2
    # at most 16K fp32 of workspace per step (128 registers a thread on 4 warps): D = 256 in 64-split steps
    block_s = min(next_pow2(splits), COMBINE_BLOCK_S, max(16, 16384 // block_d))
    kw = {} if interpreted else {"num_warps": 4 if block_s * block_d >= 4096 else 2}
    if pdl:  # (older launchers do not know the option at all)
        kw.update(launch_pdl=True, PDL=True)
    kern2[(rows, head // block_d)](acc_ws, ml_ws, out, *out.stride(), H, LQ, D, splits, BLOCK_S=block_s, HEAD_DIM=head,
                                   OUT_BF16=out.dtype == torch.bfloat16, INTERPRETED=interpreted, BLOCK_D=block_d, **kw)


def decode_attention(q, k, v, mask=None, *, scale: float | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, blocks: dict | None = None) -> torch.Tensor:
    """SDPA (enable_gqa=True, not causal) for few query tokens against a long KV cache, split over
    the keys (flash-decoding). q [B,Hq,Tq,D]; k, v [B,Hkv,S,D], any strides (e.g. a slice of a static
    cache buffer); mask broadcastable to [B,Hq,Tq,S], bool (keep where True) or float (added);
    scale defaults to 1/sqrt(D); num_splits None chooses automatically. Returns out (q's dtype)."""
    check_inputs(q, k, v, mask, out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be ≥ 1, got {num_splits}")
    k1, k2 = _kernels(q.device.type)
    return launch(k1, k2, q, k, v, mask, out, scale, num_splits, blocks)
