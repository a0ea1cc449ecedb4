"""A fixed-capacity KIVI-quantized KV cache that decode steps append to on the device
(``passes/quant/kv.py`` defines the quantization and the code layout; this module keeps it incrementally).

Per layer the state is a set of capacity buffers (shapes for batch B, Hkv heads, head dim D,
``per = 8 // bits``, DP = D // per, capacity CAPQ quantized tokens, RING = residual + group):

=============  ===================================  ==================================================
buffer         shape / dtype                         holds
=============  ===================================  ==================================================
k_codes        uint8 [B, Hkv, CAPQ, DP]              channel-planar 2/4-bit codes of quantized tokens
k_scale/k_min  scale dtype [B, Hkv, CAPQ // G, D]    per channel, one per group of G tokens
v_codes        uint8 [B, Hkv, CAPQ, DP]              channel-planar codes
v_scale/v_min  scale dtype [B, Hkv, CAPQ, D // Gv]   per token, one per group of Gv channels
k_ring/v_ring  cache dtype [B, Hkv, RING, D]         full-precision tokens t >= n_quant at slot t % RING
=============  ===================================  ==================================================

A row holding ``n`` tokens has its oldest ``n_quant(n) = G * ((n - R) // G)`` (0 when n <= R) quantized and
tokens ``[n_quant(n), n)`` in the ring (fewer than R + G of them, so they never share a slot). The lengths
are not stored: the caller passes them (device tensors), and nothing here reads them on the host, so a
step can be captured in a CUDA graph.

``append(k_new, v_new, lengths)`` adds ``T`` tokens to every row (row b's first new token is token
``lengths[b]``) in two launches: ``_quantize_groups`` quantizes every group of G tokens that becomes old
enough (one program per (b, h, group); its tokens come from the ring or, for a long prefill, straight
from ``k_new``/``v_new``), then ``_ring_write`` stores the new tokens that stay in full precision. The
quantization is ``kivi_quantize``'s, bit for bit: float64 min/max, scale and min rounded to the scale
dtype (one RNE step, saturating) before the codes are computed, codes rounded half-to-even and clamped,
scale == 0 -> code 0. Appending the tokens of a sequence one by one or all at once gives exactly the
codes, scales and residual tokens ``kivi_quantize`` produces for that sequence (tests/test_kivi_cache.py).

The graph op ``fxforge::kivi_append_attention`` (written by the ``kivi_cache`` pass,
``passes/quant/kv_pass.py``) appends a step's keys/values and attends over the cache: one query token
(decode) through ``kivi_decode_attention(q, cache.view(), lengths=...)``; several (a prefill chunk,
causal) through ``masked_attention`` (dequantize + SDPA with a position mask, in PyTorch).
Bytes per append (decode): the new token (2·D·elt) into the ring and, every G steps, one group read back
from the ring (2·G·D·elt) and written as codes + scales (G·kivi_bytes_per_token) — noise next to the
attention's read of the whole cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..passes.quant.kv import KIVICache, unpack_planar
from .kernels import next_pow2

__all__ = ["KIVIDecodeCache", "kivi_append_attention", "masked_attention", "n_quant"]

# scale dtype -> (kind, stored mantissa bits, min normal exponent, max finite value) of formats.round_to_float
_SCALE_GRIDS = {torch.float16: (0, 10, -14, 65504.0), torch.bfloat16: (0, 7, -126, 3.3895313892515355e38),
                torch.float32: (1, 23, -126, 3.4028234663852886e38)}
_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STATE = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_ring", "v_ring")


def n_quant(n, group: int, residual: int):
    """Quantized tokens of a row holding ``n`` (an int or an integer tensor): G * ((n - R) // G), 0 if n <= R."""
    if isinstance(n, torch.Tensor):
        return torch.where(n > residual, (n - residual).div(group, rounding_mode="floor") * group, 0)
    return (n - residual) // group * group if n > residual else 0


@triton.jit
def _round_to_grid(x, KIND: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, MAX_VAL: tl.constexpr):
    """float64 -> nearest value of the scale dtype's grid (float64), ties to even, saturating: the same single
    rounding step as formats.round_to_float (no double rounding through fp32). KIND 1: float32."""
    if KIND == 1:
        return x.to(tl.float32).to(tl.float64)
    ax = tl.abs(x)
    e = ((ax.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023  # floor(log2 ax); ax = 0 -> -1023
    e = tl.maximum(e, MIN_EXP)
    quantum = ((e - MANT + 1023) << 52).to(tl.float64, bitcast=True)  # 2^(e - MANT): one grid step
    y = ax / quantum  # exact (a power of two)
    r = (y + 6755399441055744.0) - 6755399441055744.0  # round half to even: 1.5 * 2^52 (ulp 1 there)
    q = tl.minimum(r * quantum, MAX_VAL)
    return tl.where(x < 0, -q, q)


@triton.jit
def _codes(x, mn, sc, QMAX: tl.constexpr):
    """clamp(round_half_even((x - min) / scale), 0, QMAX) in float64; 0 where scale == 0."""
    safe = tl.where(sc > 0, sc, 1.0)
    c = (x - mn) / safe
    c = (c + 6755399441055744.0) - 6755399441055744.0
    c = tl.minimum(tl.maximum(c, 0.0), QMAX)
    return tl.where(sc > 0, c, 0.0).to(tl.int32)


@triton.jit
def _load_tokens(ring, new, t, c, ok, n0, s_t, s_d, RING: tl.constexpr, D: tl.constexpr):
    """float64 values of tokens ``t`` at channels ``c`` (broadcast shapes): tokens before ``n0`` from the
    ring (slot t % RING, contiguous [RING, D]), later ones from the new tokens (index t - n0, strided)."""
    old = t < n0
    a = tl.load(ring + (t % RING) * D + c, mask=ok & old, other=0.0)
    b = tl.load(new + (t - n0) * s_t + c * s_d, mask=ok & (t >= n0), other=0.0)
    return tl.where(old, a.to(tl.float64), b.to(tl.float64))


@triton.jit
def _quantize_groups(KN, VN, KR, VR, KC, KS, KM, VC, VS, VM, START, COUNT,
                     kn_sb, kn_sh, kn_st, kn_sd, vn_sb, vn_sh, vn_st, vn_sd, H, CAPQ,
                     D: tl.constexpr, DP: tl.constexpr, PER: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                     GV: tl.constexpr, R: tl.constexpr, RING: tl.constexpr, KIND: tl.constexpr, MANT: tl.constexpr,
                     MIN_EXP: tl.constexpr, MAX_VAL: tl.constexpr, GP: tl.constexpr, DPP: tl.constexpr,
                     NGVP: tl.constexpr, GVP: tl.constexpr):
    """Program (b·H + h, j): the j-th group of G tokens that this append completes in row b (if any)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    NGV: tl.constexpr = D // GV
    bh = tl.program_id(0)
    b = bh // H
    n0 = tl.load(START + b)
    n1 = n0 + tl.load(COUNT + b)
    nq0 = tl.where(n0 > R, (n0 - R) // G * G, 0)
    nq1 = tl.where(n1 > R, (n1 - R) // G * G, 0)
    g = nq0 // G + tl.program_id(1)
    if (g + 1) * G > tl.minimum(nq1, CAPQ):  # no group completes here (most decode steps): nothing to do
        return
    bh64 = bh.to(tl.int64)
    kn = KN + b.to(tl.int64) * kn_sb + (bh % H).to(tl.int64) * kn_sh
    vn = VN + b.to(tl.int64) * vn_sb + (bh % H).to(tl.int64) * vn_sh
    kr, vr = KR + bh64 * RING * D, VR + bh64 * RING * D
    ti = tl.arange(0, GP)
    t = g * G + ti
    # the group is complete in this append and within the capacity (positions past it are not stored);
    # written per element: the interpreter mis-types a scalar bool broadcast into a vector mask
    end = t - ti + G
    tok_ok = (ti < G) & (end <= nq1) & (end <= CAPQ)
    # channel-planar tile [GP, PER, DPP]: element (t, i, j) is channel i·DP + j, stored in byte j at shift i·BITS
    pi = tl.arange(0, PER)[None, :, None]
    pj = tl.arange(0, DPP)[None, None, :]
    c3 = pi * DP + pj
    ok3 = tok_ok[:, None, None] & (pj < DP)
    t3 = t[:, None, None]
    shift = pi * BITS
    # keys: per channel over the group's G tokens
    x = _load_tokens(kr, kn, t3, c3, ok3, n0, kn_st, kn_sd, RING, D)
    mn = tl.min(tl.where(ok3, x, float("inf")), 0)
    mx = tl.max(tl.where(ok3, x, float("-inf")), 0)
    mn_r = _round_to_grid(mn, KIND, MANT, MIN_EXP, MAX_VAL)
    sc = _round_to_grid((mx - mn) / QMAX, KIND, MANT, MIN_EXP, MAX_VAL)
    c2 = tl.reshape(c3, (PER, DPP))
    ok2 = tl.max(ok3.to(tl.int32), 0) > 0  # [PER, DPP]: an active group's channels
    sp = (bh64 * (CAPQ // G) + g) * D + c2
    # float64 -> float32 -> scale dtype: exact (the values are on the scale dtype's grid already), and the
    # interpreter has no direct float64 -> bfloat16 cast
    tl.store(KS + sp, sc.to(tl.float32).to(KS.dtype.element_ty), mask=ok2)
    tl.store(KM + sp, mn_r.to(tl.float32).to(KM.dtype.element_ty), mask=ok2)
    codes = _codes(x, mn_r[None, :, :], sc[None, :, :], QMAX)
    packed = tl.sum(codes << shift, 1)  # bit fields do not overlap: the sum is an OR
    rows = bh64 * CAPQ + t
    cp = rows[:, None] * DP + tl.reshape(pj, (1, DPP))
    cok = tok_ok[:, None] & (tl.reshape(pj, (1, DPP)) < DP)
    tl.store(KC + cp, packed.to(tl.uint8), mask=cok)
    # values: per token over groups of GV channels; scale/min first (natural layout [GP, NGVP, GVP]) ...
    gi = tl.arange(0, NGVP)[None, :, None]
    gj = tl.arange(0, GVP)[None, None, :]
    okv = tok_ok[:, None, None] & (gi < NGV) & (gj < GV)
    xv = _load_tokens(vr, vn, t3, gi * GV + gj, okv, n0, vn_st, vn_sd, RING, D)
    vmn = tl.min(tl.where(okv, xv, float("inf")), 2)
    vmx = tl.max(tl.where(okv, xv, float("-inf")), 2)
    vmn_r = _round_to_grid(vmn, KIND, MANT, MIN_EXP, MAX_VAL)
    vsc = _round_to_grid((vmx - vmn) / QMAX, KIND, MANT, MIN_EXP, MAX_VAL)
    gi2 = tl.reshape(gi, (1, NGVP))
    vp = rows[:, None] * NGV + gi2
    vok = tok_ok[:, None] & (gi2 < NGV)
    tl.store(VS + vp, vsc.to(tl.float32).to(VS.dtype.element_ty), mask=vok)
    tl.store(VM + vp, vmn_r.to(tl.float32).to(VM.dtype.element_ty), mask=vok)
    # ... then the codes in the planar layout, each element reading its group's stored scale/min back
    # (exact: they are already on the scale dtype's grid); the barrier makes this program's stores visible
    tl.debug_barrier()
    xv = _load_tokens(vr, vn, t3, c3, ok3, n0, vn_st, vn_sd, RING, D)
    gp = rows[:, None, None] * NGV + c3 // GV
    vsc3 = tl.load(VS + gp, mask=ok3, other=0.0).to(tl.float64)
    vmn3 = tl.load(VM + gp, mask=ok3, other=0.0).to(tl.float64)
    packed = tl.sum(_codes(xv, vmn3, vsc3, QMAX) << shift, 1)
    tl.store(VC + cp, packed.to(tl.uint8), mask=cok)


@triton.jit
def _ring_write(KN, VN, KR, VR, START, COUNT, kn_sb, kn_sh, kn_st, kn_sd, vn_sb, vn_sh, vn_st, vn_sd, H,
                D: tl.constexpr, G: tl.constexpr, R: tl.constexpr, RING: tl.constexpr, BLOCK_T: tl.constexpr,
                DPAD: tl.constexpr):
    """Program (b·H + h, token block): new tokens that stay in full precision go to ring slot t % RING."""
    bh = tl.program_id(0)
    b = bh // H
    n0 = tl.load(START + b)
    cnt = tl.load(COUNT + b)
    n1 = n0 + cnt
    nq1 = tl.where(n1 > R, (n1 - R) // G * G, 0)
    i = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t = n0 + i
    d = tl.arange(0, DPAD)
    ok = ((i < cnt) & (t >= nq1))[:, None] & (d < D)[None, :]
    kn = KN + b.to(tl.int64) * kn_sb + (bh % H).to(tl.int64) * kn_sh
    vn = VN + b.to(tl.int64) * vn_sb + (bh % H).to(tl.int64) * vn_sh
    dst = bh.to(tl.int64) * RING * D + (t % RING)[:, None] * D + d[None, :]
    k = tl.load(kn + i[:, None] * kn_st + d[None, :] * kn_sd, mask=ok)
    tl.store(KR + dst, k.to(KR.dtype.element_ty), mask=ok)
    v = tl.load(vn + i[:, None] * vn_st + d[None, :] * vn_sd, mask=ok)
    tl.store(VR + dst, v.to(VR.dtype.element_ty), mask=ok)


def _check_params(bits: int, group: int, v_group: int, residual: int, head_dim: int) -> None:
    per = 8 // bits if bits in (2, 4) else 0
    if not per:
        raise ValueError(f"KIVIDecodeCache: bits must be 2 or 4, got {bits!r}")
    if group <= 0 or group % per:
        raise ValueError(f"KIVIDecodeCache: group must be a positive multiple of {per} for {bits}-bit codes, got {group}")
    if v_group <= 0 or v_group % per or head_dim % v_group:
        raise ValueError(f"KIVIDecodeCache: v_group must be a positive multiple of {per} dividing head_dim={head_dim}, "
                         f"got {v_group}")
    if residual < 0 or residual % group:
        raise ValueError(f"KIVIDecodeCache: residual ({residual}) must be a non-negative multiple of group ({group})")


def _expect(name: str, t, shape: tuple, dtypes: tuple, device) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"KIVIDecodeCache: {name} must be {tuple(shape)} of {dtypes}, got {got}")
    if t.device != device or not t.is_contiguous():
        raise ValueError(f"KIVIDecodeCache: {name} must be contiguous on {device}, got {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


class KIVIDecodeCache:
    """The capacity buffers of one layer's KIVI cache (module docstring) and the operations on them.
    ``KIVIDecodeCache.empty(...)`` allocates; the constructor wraps existing buffers (a compiled program's
    state) without copying. ``max_tokens`` = CAPQ + RING - 1 is the longest row it can hold."""

    def __init__(self, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_ring, v_ring, *, bits: int, group: int,
                 v_group: int, residual: int):
        if not isinstance(k_ring, torch.Tensor) or k_ring.dim() != 4:
            raise ValueError(f"KIVIDecodeCache: k_ring must be a 4-D tensor [B, Hkv, RING, D], got "
                             f"{getattr(k_ring, 'shape', type(k_ring).__name__)}")
        B, H, ring, D = k_ring.shape
        _check_params(bits, group, v_group, residual, D)
        if ring != residual + group:
            raise ValueError(f"KIVIDecodeCache: the ring holds residual + group = {residual + group} tokens, got {ring}")
        if not isinstance(k_codes, torch.Tensor) or k_codes.dim() != 4:
            raise ValueError("KIVIDecodeCache: k_codes must be a 4-D tensor [B, Hkv, CAPQ, D // per]")
        capq, per, dev = k_codes.shape[2], 8 // bits, k_ring.device
        if capq % group:
            raise ValueError(f"KIVIDecodeCache: capacity {capq} must be a multiple of group ({group})")
        sdt = (k_scale.dtype,) if isinstance(k_scale, torch.Tensor) and k_scale.dtype in _SCALE_GRIDS else tuple(_SCALE_GRIDS)
        for name, t, shape, dts in (
                ("k_codes", k_codes, (B, H, capq, D // per), (torch.uint8,)),
                ("v_codes", v_codes, (B, H, capq, D // per), (torch.uint8,)),
                ("k_scale", k_scale, (B, H, capq // group, D), sdt), ("k_min", k_min, (B, H, capq // group, D), sdt),
                ("v_scale", v_scale, (B, H, capq, D // v_group), sdt), ("v_min", v_min, (B, H, capq, D // v_group), sdt),
                ("k_ring", k_ring, (B, H, ring, D), _CACHE_DTYPES), ("v_ring", v_ring, (B, H, ring, D), (k_ring.dtype,))):
            _expect(name, t, shape, dts, dev)
        self.k_codes, self.k_scale, self.k_min = k_codes, k_scale, k_min
        self.v_codes, self.v_scale, self.v_min = v_codes, v_scale, v_min
        self.k_ring, self.v_ring = k_ring, v_ring
        self.bits, self.group, self.v_group, self.residual = bits, group, v_group, residual
        self.batch, self.heads, self.head_dim, self.capq, self.ring = B, H, D, capq, ring

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, max_tokens: int, *, bits: int = 2, group: int = 32,
              residual: int = 128, v_group: int | None = None, dtype: torch.dtype = torch.float32,
              scale_dtype: torch.dtype = torch.float16, device=None) -> KIVIDecodeCache:
        """Zeroed buffers for rows of up to ``max_tokens`` tokens (CAPQ = n_quant(max_tokens)); the ring in
        ``dtype`` (the model's), scales and mins in ``scale_dtype``."""
        v_group = group if v_group is None else v_group
        _check_params(bits, group, v_group, residual, head_dim)
        if dtype not in _CACHE_DTYPES or scale_dtype not in _SCALE_GRIDS:
            raise ValueError(f"KIVIDecodeCache: dtype must be one of {_CACHE_DTYPES} and scale_dtype one of "
                             f"{tuple(_SCALE_GRIDS)}, got {dtype} and {scale_dtype}")
        if min(batch, heads, head_dim, max_tokens) < 1:
            raise ValueError(f"KIVIDecodeCache: batch, heads, head_dim and max_tokens must be positive, got "
                             f"{(batch, heads, head_dim, max_tokens)}")
        capq, dp = n_quant(max_tokens, group, residual), head_dim * bits // 8

        def z(*shape, dt):
            return torch.zeros((batch, heads, *shape), dtype=dt, device=device)
        return cls(z(capq, dp, dt=torch.uint8), z(capq // group, head_dim, dt=scale_dtype),
                   z(capq // group, head_dim, dt=scale_dtype), z(capq, dp, dt=torch.uint8),
                   z(capq, head_dim // v_group, dt=scale_dtype), z(capq, head_dim // v_group, dt=scale_dtype),
                   z(residual + group, head_dim, dt=dtype), z(residual + group, head_dim, dt=dtype),
                   bits=bits, group=group, v_group=v_group, residual=residual)

    @property
    def max_tokens(self) -> int:
        return self.capq + self.ring - 1

    def buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STATE}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def _rows(self, name: str, t, b: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,) or t.dtype not in (torch.int32, torch.int64) \
                or t.device != self.k_ring.device:
            raise ValueError(f"KIVIDecodeCache.append: {name} must be an int32/int64 tensor [{b}] on {self.k_ring.device}, "
                             f"got {getattr(t, 'shape', t)!r}")
        return t.to(torch.int32).contiguous()

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, lengths: torch.Tensor,
               counts: torch.Tensor | None = None) -> torch.Tensor:
        """Add ``k_new, v_new [b, Hkv, T, D]`` (b <= batch, any strides) to rows ``[0, b)``: row r already holds
        ``lengths[r]`` tokens and receives ``counts[r]`` (default T) new ones, token ``lengths[r] + i`` being
        ``k_new[r, :, i]``. Returns the new lengths (int32 [b]). Tokens past ``max_tokens`` are not stored."""
        if not (isinstance(k_new, torch.Tensor) and isinstance(v_new, torch.Tensor)) or k_new.dim() != 4 \
                or k_new.shape != v_new.shape:
            raise ValueError(f"KIVIDecodeCache.append: k_new and v_new must be equal-shaped [b, Hkv, T, D] tensors, got "
                             f"{getattr(k_new, 'shape', k_new)!r} and {getattr(v_new, 'shape', v_new)!r}")
        b, h, t, d = k_new.shape
        if b > self.batch or h != self.heads or d != self.head_dim:
            raise ValueError(f"KIVIDecodeCache.append: new tokens {tuple(k_new.shape)} do not fit the cache "
                             f"[{self.batch}, {self.heads}, *, {self.head_dim}]")
        if not (k_new.is_floating_point() and v_new.is_floating_point()) or k_new.device != self.k_ring.device \
                or v_new.device != self.k_ring.device:
            raise ValueError(f"KIVIDecodeCache.append: k_new and v_new must be floating-point on {self.k_ring.device}")
        start = self._rows("lengths", lengths, b)
        count = torch.full((b,), t, dtype=torch.int32, device=start.device) if counts is None \
            else self._rows("counts", counts, b)
        if b == 0 or t == 0:
            return start + count
        kind, mant, min_exp, max_val = _SCALE_GRIDS[self.k_scale.dtype]
        per = 8 // self.bits
        dp, ngv = d // per, d // self.v_group
        ks, vs = k_new.stride(), v_new.stride()
        _quantize_groups[(b * h, triton.cdiv(t, self.group))](
            k_new, v_new, self.k_ring, self.v_ring, self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale,
            self.v_min, start, count, *ks, *vs, h, self.capq, D=d, DP=dp, PER=per, BITS=self.bits, G=self.group,
            GV=self.v_group, R=self.residual, RING=self.ring, KIND=kind, MANT=mant, MIN_EXP=min_exp, MAX_VAL=max_val,
            GP=next_pow2(self.group), DPP=next_pow2(dp), NGVP=next_pow2(ngv), GVP=next_pow2(self.v_group))
        block_t = min(next_pow2(t), 16)
        _ring_write[(b * h, triton.cdiv(t, block_t))](
            k_new, v_new, self.k_ring, self.v_ring, start, count, *ks, *vs, h, D=d, G=self.group, R=self.residual,
            RING=self.ring, BLOCK_T=block_t, DPAD=next_pow2(d))
        return start + count

    def view(self, batch: int | None = None) -> KIVICache:
        """The capacity buffers of rows ``[0, batch)`` as a KIVICache for ``kivi_decode_attention(..., lengths=)``:
        n_quant = CAPQ, seq_len = CAPQ + RING, the ring as the residual (slot t % RING)."""
        b = self.batch if batch is None else batch
        return KIVICache(bits=self.bits, group=self.group, v_group=self.v_group, residual=self.residual,
                         seq_len=self.capq + self.ring, n_quant=self.capq, k_codes=self.k_codes[:b],
                         k_scale=self.k_scale[:b], k_min=self.k_min[:b], v_codes=self.v_codes[:b],
                         v_scale=self.v_scale[:b], v_min=self.v_min[:b], k_residual=self.k_ring[:b],
                         v_residual=self.v_ring[:b])

    def dequantize(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, positions)`` of rows ``[0, len(lengths))`` holding ``lengths`` tokens: k, v float32
        ``[b, Hkv, CAPQ + RING, D]`` (quantized tokens dequantized as kivi_dequantize does, then the ring's
        slots) and the token position of every entry, int64 ``[b, CAPQ + RING]`` (-1: empty; those k, v are 0).
        Device-side only (no host synchronization)."""
        b = lengths.shape[0]
        n = lengths.to(torch.int64)[:, None]
        nq = n_quant(n, self.group, self.residual)
        H, D, G, capq = self.heads, self.head_dim, self.group, self.capq
        kc = unpack_planar(self.k_codes[:b], self.bits).double().view(b, H, capq // G, G, D)
        kq = (kc * self.k_scale[:b, :, :, None].double() + self.k_min[:b, :, :, None].double()).view(b, H, capq, D)
        vc = unpack_planar(self.v_codes[:b], self.bits).double().view(b, H, capq, D // self.v_group, self.v_group)
        vq = (vc * self.v_scale[:b, ..., None].double() + self.v_min[:b, ..., None].double()).view(b, H, capq, D)
        j = torch.arange(capq, device=n.device)[None, :]
        slot = torch.arange(self.ring, device=n.device)[None, :]
        tok = nq + (slot - nq).remainder(self.ring)  # the token of each slot among [nq, nq + RING)
        pos = torch.cat([torch.where(j < nq, j, -1), torch.where(tok < n, tok, -1)], dim=1)
        k = torch.cat([kq.float(), self.k_ring[:b].float()], dim=2)
        v = torch.cat([vq.float(), self.v_ring[:b].float()], dim=2)
        valid = (pos >= 0)[:, None, :, None]
        return torch.where(valid, k, 0.0), torch.where(valid, v, 0.0), pos


def masked_attention(q: torch.Tensor, cache: KIVIDecodeCache, lengths: torch.Tensor, positions: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """SDPA (GQA) of ``q [b, Hq, T, D]`` over the cache's rows ``[0, b)`` holding ``lengths`` tokens, query t seeing
    the cached tokens at positions ``<= positions[t]`` (int [T], the same for every row): a prefill chunk's causal
    attention over the quantized cache, in float32 PyTorch (the decode kernel is not causal)."""
    k, v, pos = cache.dequantize(lengths)
    kp = pos[:, None, None, :]
    mask = (kp >= 0) & (kp <= positions.to(torch.int64)[None, None, :, None])
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype)


def append_attention(cache: KIVIDecodeCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cache_pos: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One step of a static-cache decoder on a KIVI cache: the T tokens at positions ``cache_pos [T]``
    (consecutive; the same for every row: every row already holds ``cache_pos[0]`` tokens) are appended,
    then ``q [b, Hq, T, D]`` attends over the cache, query t up to position ``cache_pos[t]``."""
    b, _, t, _ = q.shape
    if cache_pos.dim() != 1 or cache_pos.shape[0] != t or k.shape[2] != t:
        raise ValueError(f"kivi_append_attention: cache_pos must be [T] with T = {t} query tokens and k/v of "
                         f"T tokens, got {tuple(cache_pos.shape)} and k {tuple(k.shape)}")
    if cache_pos.device.type == "cpu":  # free to check here (no device synchronization)
        p = cache_pos.tolist()
        if p != list(range(p[0], p[0] + t)) or p[0] < 0 or p[-1] >= cache.max_tokens:
            raise ValueError(f"kivi_append_attention: cache_pos must be consecutive positions in [0, "
                             f"{cache.max_tokens}), got {p[:4]}{'...' if t > 4 else ''}")
    start = cache_pos[:1].to(torch.int32).expand(b).contiguous()
    lengths = cache.append(k, v, start)
    if t == 1:
        from .kivi_attention import kivi_decode_attention

        return kivi_decode_attention(q, cache.view(b), scale=scale, lengths=lengths)
    return masked_attention(q, cache, lengths, cache_pos, scale)


@torch.library.custom_op("fxforge::kivi_append_attention", mutates_args=STATE)
def kivi_append_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_pos: torch.Tensor,
                          k_codes: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor, v_codes: torch.Tensor,
                          v_scale: torch.Tensor, v_min: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                          bits: int, group: int, v_group: int, residual: int, scale: float | None = None) -> torch.Tensor:
    """The ``kivi_cache`` pass's op: append ``k, v [b, Hkv, T, D]`` at ``cache_pos`` into the layer's KIVI
    buffers (updated in place) and return the attention of ``q [b, Hq, T, D]`` (see ``append_attention``)."""
    cache = KIVIDecodeCache(k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_ring, v_ring, bits=bits, group=group,
                            v_group=v_group, residual=residual)
    return append_attention(cache, q, k, v, cache_pos, scale)


@kivi_append_attention.register_fake
def _(q, k, v, cache_pos, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_ring, v_ring, bits, group, v_group,
      residual, scale=None):
    return q.new_empty(q.shape)
