"""KIVI KV-cache quantization (Liu et al., ICML'24, arXiv 2402.02750), reference implementation.

Keys are quantized **per channel** (groups of ``group`` consecutive tokens share one scale/min per channel:
key outliers are channel-aligned); values **per token** (groups of ``v_group`` consecutive channels of one
token). Both are asymmetric min/max with a float zero point (KIVI convention): ``scale = (max - min) /
(2^bits - 1)``, ``code = clamp(round((x - min) / scale), 0, 2^bits - 1)``, ``x_hat = code * scale + min``
(scale == 0 -> code 0). ``scale`` and ``min`` are rounded to ``scale_dtype`` (default fp16, RNE) *before* the
codes are computed, so the stored values reproduce ``x_hat`` exactly. Rounding is ties-to-even.

Split. Of ``S`` cached tokens the oldest ``n_quant = G * floor((S - R) / G)`` (0 if S <= R) are quantized and
the newest ``S - n_quant`` (R <= that < R + G when S > R) stay in full precision (the input dtype, untouched).
``R = residual`` must be a multiple of ``G = group``. Deviation from KIVI's code: KIVI keeps exactly R recent
*values* in fp16 (a sliding window) but R..R+G-1 recent keys; here keys and values share one boundary so
a decode kernel has two segments, ``[0, n_quant)`` quantized and ``[n_quant, S)`` full precision.

Layout ("channel-planar": ``per = 8 // bits`` codes per byte, ``DP = D // per`` bytes per token; the code of
channel ``d`` sits in byte ``d % DP`` at bit offset ``(d // DP) * bits``, so bit plane ``i`` of a token's bytes is
the contiguous channel range ``[i*DP, (i+1)*DP)``), shapes for k, v ``[B, H, S, D]``:

=============  ===========================================  =====================================
tensor         shape / dtype                                 element (b, h, t, d), t < n_quant
=============  ===========================================  =====================================
k_codes        uint8 [B, H, n_quant, D // per]               byte ``k_codes[b,h,t,d % DP]``,
                                                             shift ``(d // DP) * bits``
k_scale/k_min  scale_dtype [B, H, n_quant // G, D]           ``[b, h, t // G, d]``
v_codes        uint8 [B, H, n_quant, D // per]               byte ``v_codes[b,h,t,d % DP]``,
                                                             shift ``(d // DP) * bits``
v_scale/v_min  scale_dtype [B, H, n_quant, D // Gv]          ``[b, h, t, d // Gv]``
k_residual     input dtype [B, H, S - n_quant, D]            token t >= n_quant at ``t - n_quant``
v_residual     input dtype [B, H, S - n_quant, D]
=============  ===========================================  =====================================

Why planar: a decode kernel loads a ``[tokens, DP]`` byte tile once and takes each bit plane with one shift
and mask; every plane is a contiguous channel range, so it feeds its own ``tl.dot`` (keys: a K-split of
``q . K^T``; values: the output columns of that range) with no interleaving of decoded codes in registers.

A decode step (``codegen/templates/kivi_attention.py``) computes ``q . K^T`` plane by plane on ``[BLOCK_T, DP]``
byte tiles of ``k_codes`` (BLOCK_T = G: one key group, whose per-channel scales fold into q) and ``P @ V``
plane by plane on the same tiles of ``v_codes``, then the residual segment in full precision, merging both
with the online softmax.
Bytes per cached token per head (K and V together): ``2 * D * bits / 8 + D * 2 * sb / G + D / Gv * 2 * sb``
with sb = bytes of scale_dtype (fp16: D=128, bits=2, G=Gv=32 -> 64 + 16 + 16 = 96 B vs 512 B in fp16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import round_to_float

__all__ = ["KIVICache", "kivi_bytes_per_token", "kivi_dequantize", "kivi_quantize", "pack_bits", "pack_planar",
           "unpack_bits", "unpack_planar"]

_FLOAT_GRIDS = {torch.float16: (10, -14, 65504.0), torch.bfloat16: (7, -126, 3.3895313892515355e38)}


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> nearest ``dtype`` value (single RNE step), returned as float64."""
    if dtype == torch.float32:
        return x.to(torch.float32).double()
    if dtype not in _FLOAT_GRIDS:
        raise ValueError(f"scale_dtype must be float16, bfloat16 or float32, got {dtype}")
    return round_to_float(x, *_FLOAT_GRIDS[dtype])


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., m]`` (< 2^bits, m a multiple of 8 // bits) -> ``[..., m * bits // 8]``;
    element i goes to byte i // per at bit offset (i % per) * bits."""
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.uint8)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (i * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.stack([(packed >> (i * bits)) & mask for i in range(per)], dim=-1).flatten(-2)


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., m]`` (< 2^bits, m a multiple of per = 8 // bits) -> ``[..., m // per]``, channel-planar:
    element j goes to byte ``j % (m // per)`` at bit offset ``(j // (m // per)) * bits``."""
    per = 8 // bits
    dp = codes.shape[-1] // per
    c = codes.to(torch.uint8)
    out = torch.zeros((*codes.shape[:-1], dp), dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i * dp:(i + 1) * dp] << (i * bits)
    return out


def unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_planar`."""
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.cat([(packed >> (i * bits)) & mask for i in range(per)], dim=-1)


@dataclass
class KIVICache:
    """A KIVI-quantized KV cache snapshot; tensor layout in the module docstring."""
    bits: int
    group: int
    v_group: int
    residual: int
    seq_len: int
    n_quant: int
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    k_residual: torch.Tensor
    v_residual: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, _, d = self.k_residual.shape
        return (b, h, self.seq_len, d)

    def nbytes(self) -> int:
        ts = (self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min, self.k_residual,
              self.v_residual)
        return sum(t.numel() * t.element_size() for t in ts)


def kivi_bytes_per_token(bits: int, head_dim: int, group: int = 32, v_group: int | None = None,
                         scale_bytes: int = 2) -> float:
    """Bytes per quantized token per head for K and V together (codes + scales + mins), amortized."""
    v_group = group if v_group is None else v_group
    return 2 * head_dim * bits / 8 + head_dim * 2 * scale_bytes / group + head_dim / v_group * 2 * scale_bytes


def _minmax_quant(x: torch.Tensor, bits: int, dtype: torch.dtype):
    """x: float64 [..., g] (groups on the last dim) -> (codes uint8 [..., g], scale [...], min [...]) with
    scale/min already rounded to ``dtype`` (kept in float64)."""
    qmax = (1 << bits) - 1
    mn, mx = x.amin(-1), x.amax(-1)
    mn_r = _round_to(mn, dtype)
    scale = _round_to((mx - mn) / qmax, dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - mn_r[..., None]) / safe[..., None]).clamp(0, qmax)
    codes = torch.where(scale[..., None] > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8), scale, mn_r


def kivi_quantize(k: torch.Tensor, v: torch.Tensor, bits: int = 2, group: int = 32, residual: int = 32,
                  v_group: int | None = None, scale_dtype: torch.dtype = torch.float16) -> KIVICache:
    """Quantize a KV cache ``k, v [B, H, S, D]``. ``bits`` in {2, 4}; ``group`` = G tokens per key group;
    ``v_group`` = channels per value group (default ``group``; must divide D); ``residual`` = R, a multiple of
    G, recent tokens kept exact (see the module docstring for the split and the layout)."""
    if bits not in (2, 4):
        raise ValueError(f"KIVI supports bits in {{2, 4}}, got {bits!r}")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B, H, S, D] with equal shapes, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if not (k.is_floating_point() and v.is_floating_point()):
        raise TypeError("k and v must be floating-point tensors")
    per = 8 // bits
    v_group = group if v_group is None else v_group
    b, h, s, d = k.shape
    if group <= 0 or group % per:
        raise ValueError(f"group must be a positive multiple of {per} for {bits}-bit packing, got {group}")
    if v_group <= 0 or v_group % per or d % v_group:
        raise ValueError(f"v_group must be a positive multiple of {per} dividing head_dim={d}, got {v_group}")
    if residual < 0 or residual % group:
        raise ValueError(f"residual ({residual}) must be a non-negative multiple of group ({group})")
    n_q = (s - residual) // group * group if s > residual else 0
    kq, vq = k[:, :, :n_q].double(), v[:, :, :n_q].double()
    # keys: per channel, groups of G tokens -> [B, H, D, n_q/G, G]
    kc, ks, km = _minmax_quant(kq.transpose(2, 3).reshape(b, h, d, n_q // group, group), bits, scale_dtype)
    # values: per token, groups of Gv channels -> [B, H, n_q, D/Gv, Gv]
    vc, vs, vm = _minmax_quant(vq.reshape(b, h, n_q, d // v_group, v_group), bits, scale_dtype)
    return KIVICache(
        bits=bits, group=group, v_group=v_group, residual=residual, seq_len=s, n_quant=n_q,
        k_codes=pack_planar(kc.reshape(b, h, d, n_q).transpose(2, 3), bits).contiguous(),
        k_scale=ks.to(scale_dtype).transpose(2, 3).contiguous(), k_min=km.to(scale_dtype).transpose(2, 3).contiguous(),
        v_codes=pack_planar(vc.reshape(b, h, n_q, d), bits).contiguous(),
        v_scale=vs.to(scale_dtype).contiguous(), v_min=vm.to(scale_dtype).contiguous(),
        k_residual=k[:, :, n_q:].clone(), v_residual=v[:, :, n_q:].clone())


def kivi_dequantize(c: KIVICache) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` float32 ``[B, H, S, D]`` from a :class:`KIVICache` (residual tokens exact)."""
    b, h, _, d = c.shape
    n_q, g, gv = c.n_quant, c.group, c.v_group
    kc = unpack_planar(c.k_codes, c.bits).double().view(b, h, n_q // g, g, d)
    kq = (kc * c.k_scale.double()[:, :, :, None] + c.k_min.double()[:, :, :, None]).reshape(b, h, n_q, d)
    vc = unpack_planar(c.v_codes, c.bits).double().view(b, h, n_q, d // gv, gv)
    vq = (vc * c.v_scale.double()[..., None] + c.v_min.double()[..., None]).reshape(b, h, n_q, d)
    k = torch.cat([kq.to(torch.float32), c.k_residual.to(torch.float32)], dim=2)
    v = torch.cat([vq.to(torch.float32), c.v_residual.to(torch.float32)], dim=2)
    return k, v
