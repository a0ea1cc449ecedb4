"""``index_put_`` (accumulate=False) as one Triton kernel: the state update of a static KV cache,
``cache[rows, :, pos] = new``.

ATen's CUDA ``index_put_`` runs a generic 64-bit index kernel that took 3.5 µs per call for a
512-element decode update on the H100 (benchmarks/results/profile_decode.md), 32 calls per step
of the 853M decoder. This kernel maps each element of the (broadcast) value tensor to its
destination offset directly. Bytes: values read once + the same bytes written; latency-bound at
decode sizes (~1.5 µs, like any small fxforge kernel).

Semantics are torch's advanced indexing for ``dst[indices] = values``: index tensors (int64/int32)
broadcast to a common shape I; if the indexed dims are adjacent, I replaces them in place, else it
goes first, followed by the remaining dims. Negative indices wrap. Unsupported cases (bool masks,
accumulate=True, more than 3 index tensors or rank > 4, duplicate indices) run ATen's op. Indices
out of range are not written (eager CUDA would abort the process with a device assert).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_RANK = 4
MAX_INDEXED = 3


@triton.jit
def _index_put_kernel(dst, vals, i0, i1, i2, numel,
                      n0, n1, n2, n3,          # result shape (rank padded to 4 in front)
                      v0, v1, v2, v3,          # value strides over the result dims
                      d0, d1, d2, d3,          # destination strides of the sliced (not indexed) result dims
                      a0, a1, a2, a3, sa, la,  # index tensor 0: strides over result dims, dst stride, dst size
                      b0, b1, b2, b3, sb, lb,
                      c0, c1, c2, c3, sc, lc,
                      NUM_IDX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r3 = offs % n3
    r2 = (offs // n3) % n2
    r1 = (offs // (n3 * n2)) % n1
    r0 = offs // (n3 * n2 * n1)
    val = tl.load(vals + r0 * v0 + r1 * v1 + r2 * v2 + r3 * v3, mask=mask)
    off = (r0 * d0 + r1 * d1 + r2 * d2 + r3 * d3).to(tl.int64)
    ok = mask
    if NUM_IDX >= 1:
        ia = tl.load(i0 + r0 * a0 + r1 * a1 + r2 * a2 + r3 * a3, mask=mask, other=0).to(tl.int64)
        ia = tl.where(ia < 0, ia + la, ia)
        ok = ok & (ia >= 0) & (ia < la)
        off += ia * sa
    if NUM_IDX >= 2:
        ib = tl.load(i1 + r0 * b0 + r1 * b1 + r2 * b2 + r3 * b3, mask=mask, other=0).to(tl.int64)
        ib = tl.where(ib < 0, ib + lb, ib)
        ok = ok & (ib >= 0) & (ib < lb)
        off += ib * sb
    if NUM_IDX >= 3:
        ic = tl.load(i2 + r0 * c0 + r1 * c1 + r2 * c2 + r3 * c3, mask=mask, other=0).to(tl.int64)
        ic = tl.where(ic < 0, ic + lc, ic)
        ok = ok & (ic >= 0) & (ic < lc)
        off += ic * sc
    tl.store(dst + off, val.to(dst.dtype.element_ty), mask=ok)


def plan(dst: torch.Tensor, indices, values: torch.Tensor):
    """(result shape, per-result-dim roles) or None when the kernel does not cover the case.
    A role is ("I", j) for the j-th broadcast index dim or ("S", d) for destination dim d."""
    indices = list(indices) + [None] * (dst.dim() - len(indices))
    idx = [(d, t) for d, t in enumerate(indices) if t is not None]
    if not idx or len(idx) > MAX_INDEXED or dst.dim() > MAX_RANK or len(indices) != dst.dim():
        return None
    if any(t.dtype not in (torch.int64, torch.int32) or t.device != dst.device for _, t in idx):
        return None
    try:
        ishape = torch.broadcast_shapes(*[t.shape for _, t in idx])
    except RuntimeError:
        return None
    dims = [d for d, _ in idx]
    slices = [d for d in range(dst.dim()) if d not in dims]
    i_roles = [("I", j) for j in range(len(ishape))]
    if dims == list(range(dims[0], dims[-1] + 1)):
        roles = [("S", d) for d in slices if d < dims[0]] + i_roles + [("S", d) for d in slices if d > dims[-1]]
    else:
        roles = i_roles + [("S", d) for d in slices]
    shape = [ishape[r[1]] if r[0] == "I" else dst.shape[r[1]] for r in roles]
    if len(shape) > MAX_RANK:
        return None
    try:
        torch.broadcast_shapes(values.shape, tuple(shape))
    except RuntimeError:
        return None
    return shape, roles, idx, ishape


def index_put_(dst: torch.Tensor, indices, values: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``dst.index_put_(indices, values)`` with one Triton launch where covered, else ATen's."""
    p = None if accumulate or dst.device.type not in ("cuda", "cpu") else plan(dst, indices, values)
    if p is None or values.dtype != dst.dtype or dst.numel() >= 2**31:
        return torch.ops.aten.index_put_.default(dst, indices, values, accumulate)
    shape, roles, idx, ishape = p
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0:
        return dst
    pad = MAX_RANK - len(shape)
    vals = values.expand(shape)
    vstr = [0] * pad + [0 if s == 1 else st for s, st in zip(shape, vals.stride())]
    dstr = [0] * pad + [dst.stride(r[1]) if r[0] == "S" else 0 for r in roles]
    n = [1] * pad + list(shape)
    args = []
    ptrs = []
    for d, t in idx:
        te = t.expand(ishape)
        per_i = [0 if ishape[j] == 1 else te.stride(j) for j in range(len(ishape))]
        strides = [0] * pad + [per_i[r[1]] if r[0] == "I" else 0 for r in roles]
        ptrs.append(te)
        args += strides + [dst.stride(d), dst.shape[d]]
    while len(ptrs) < MAX_INDEXED:
        ptrs.append(ptrs[0])
        args += [0] * 6
    block = 128 if dst.device.type == "cuda" else 32
    _index_put_kernel[(triton.cdiv(numel, block),)](dst, vals, *ptrs, numel, *n, *vstr, *dstr, *args,
                                                    NUM_IDX=len(idx), BLOCK=block)
    return dst
