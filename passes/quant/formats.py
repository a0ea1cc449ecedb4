"""Weight quantization formats as data, plus the reference quantize / dequantize (issue 4).

A format is a :class:`QuantFormat` tuple ``(elem, block, scale, symmetric, zero_point, tensor_scale)``.
``quantize(w[N, K], fmt)`` returns a :class:`QuantizedTensor` of plain tensors; ``dequantize`` gives float32.
All arithmetic is float64 here (offline weight quantization); a kernel that dequantizes the same codes in
fp32 differs from ``dequantize`` only by the fp32 rounding of ``code * scale``.

Axis convention
---------------
``w`` is an ``nn.Linear`` weight ``[N, K]`` (N = output features, K = reduction / input features).
Blocks (groups) always run along K inside one row n. ``block=None`` means one block per row (per-output-
channel). K need not be a multiple of the block: the row is zero-padded to ``Kp = padded_k(K)`` (multiple of
the block; for 4-bit per-channel, even) and the original K is kept in ``QuantizedTensor.shape``.
Padding never changes a block's amax / min / max (symmetric ranges contain 0; asymmetric ranges are
widened to contain 0 anyway), so padded codes dequantize to exactly 0.

Stored tensors (``nb = Kp // block`` or 1 for per-channel)
-----------------------------------------------------------
``codes``   8-bit elements: ``int8 [N, Kp]`` (int8, mxint8) or ``uint8 [N, Kp]`` (fp8_e4m3 bit patterns, i.e.
            ``torch.float8_e4m3fn`` viewed as uint8). 4-bit elements: ``uint8 [N, Kp // 2]``, two per byte,
            **low nibble = even k, high nibble = odd k** (``byte = c[2j] | c[2j+1] << 4``). Nibble meaning:
            uint4 = unsigned 0..15; int4 = two's complement (-7..7, 0x8 never produced); fp4_e2m1 = sign bit 3,
            exponent bits 2..1, mantissa bit 0 (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6).
``scales``  ``[N, nb]``: fp32 -> float32; bf16 -> bfloat16; e8m0 -> uint8 biased exponent (value 2^(c-127),
            c = 255 (NaN) never produced); e4m3 -> uint8 bit pattern of float8_e4m3fn (positive, finite).
``zeros``   ``uint8 [N, nb]`` integer zero points (asymmetric formats only), unpacked.
``tensor_scale``  ``float32 [1]`` (NV formats only).

Dequantization, per element (n, k) with block b = k // block:
  symmetric:   ``w = value(code) * scale[n, b] (* tensor_scale)``
  asymmetric:  ``w = (code - zeros[n, b]) * scale[n, b]``          (GPTQ / HQQ integer-zero convention)
where ``value(code)`` is the integer for int8/int4, ``code / 64`` for mxint8 and the float value for fp formats.

Quantization conventions
------------------------
* int8 / int4 symmetric, fp32/bf16 scale: ``s = amax / qmax`` (127 / 7) rounded to the scale dtype (RNE),
  ``q = clamp(round(w / s), -qmax, qmax)`` (symmetric range, no -128 / -8).
* uint4 asymmetric (torchao int4 weight-only / GPTQ): ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``,
  ``s = (hi - lo) / 15`` (RNE to bf16), ``z = clamp(round(-lo / s), 0, 15)``, ``q = clamp(round(w / s) + z, 0, 15)``.
* MX (OCP Microscaling Formats v1.0, block 32, E8M0 scale): ``X = 2^(floor(log2(amax)) - emax_elem)`` with
  emax_elem = 8 (E4M3), 2 (E2M1), 0 (INT8); exponent clamped to [-127, 127]; an all-zero block gets 2^-127.
  Elements ``round(w / X)`` onto the element grid, saturating. MXINT8 elements are 8-bit two's complement with an
  implicit scale 2^-6 (values k/64; the spec's range is k in [-128, 127]). The quantizer clips symmetrically to
  k in [-127, 127] (the INT-vs-FP paper's symmetric clipping: no negative bias, sign-magnitude friendly, and
  fake-quantization stays idempotent: a -128 would raise the next block exponent); ``dequantize`` accepts -128.
  The spec's floor rule lets amax / X reach 2^(emax+1) (8 for E2M1, 512 for E4M3), above the element max, so
  the top of a block can saturate (6, 448); this is the spec's rounding (torchao's FLOOR mode), not a bug
  (a ceil-based exponent, an option in the INT-vs-FP code, avoids it at the cost of resolution).
* NV (NVFP4 / NVINT4, block 16): per-tensor ``ts = amax(|w|) / (448 * elem_max)`` stored fp32 (1.0 if w == 0);
  block scale ``sb = RNE_e4m3(clamp(amax_block / elem_max / ts, 2^-9, 448))``; elements ``w / (sb * ts)``.
  elem_max = 6 (E2M1) or 7 (int4, symmetric [-7, 7]).
* All rounding is round-to-nearest, ties-to-even (``torch.round``); FP element rounding is RNE onto the
  representable grid (subnormals included) and saturates at the largest finite value (448 E4M3, 6 E2M1).

Bytes per weight (see ``metrics.bytes_per_weight``), K = 4096, N large:
  w8a16 1.0005, w4a16_g128 0.5234 (0.5 + 3/128), g64 0.5469, g32 0.5938, mxint8 / mxfp8 1.03125,
  mxfp4 0.53125, nvfp4 / nvint4 0.5625 (+4 bytes per tensor).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["ELEMENTS", "FORMATS", "SCALE_BYTES", "ElemSpec", "QuantFormat", "QuantizedTensor", "dequantize",
           "exp2i", "fake_quantize", "get_format", "pack_nibbles", "quantize", "round_to_float", "unpack_nibbles"]


@dataclass(frozen=True)
class ElemSpec:
    """An element type. ``kind`` int: codes are integers in [qmin, qmax] worth ``code * step``;
    fp: a minifloat with ``exp_bits`` / ``mant_bits`` / ``bias``, no inf, saturating at ``max_value``."""
    name: str
    bits: int
    kind: str
    max_value: float
    qmin: int = 0
    qmax: int = 0
    step: float = 1.0
    mant_bits: int = 0
    bias: int = 0

    @property
    def emax(self) -> int:
        """OCP MX emax_elem: exponent of the largest normal value (E4M3 8, E2M1 2, MXINT8 0)."""
        return math.floor(math.log2(self.max_value))


ELEMENTS: dict[str, ElemSpec] = {
    "int8": ElemSpec("int8", 8, "int", 127.0, -127, 127),
    "int4": ElemSpec("int4", 4, "int", 7.0, -7, 7),
    "uint4": ElemSpec("uint4", 4, "int", 15.0, 0, 15),
    "mxint8": ElemSpec("mxint8", 8, "int", 127 / 64, -127, 127, step=2.0 ** -6),  # decoder accepts -128 too
    "fp8_e4m3": ElemSpec("fp8_e4m3", 8, "fp", 448.0, mant_bits=3, bias=7),
    "fp4_e2m1": ElemSpec("fp4_e2m1", 4, "fp", 6.0, mant_bits=1, bias=1),
}
SCALE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "e8m0": 1, "e4m3": 1}
MXINT8_MAX_EXP = 104  # largest E8M0 exponent quantize gives MXINT8 (see quantize)
E4M3_MAX = 448.0
E4M3_MIN = 2.0 ** -9  # smallest positive (subnormal) E4M3


@dataclass(frozen=True)
class QuantFormat:
    """A weight format. ``block``: elements per scale along K (None = per output channel, whole row).
    ``symmetric``: scale from absmax, no offset. ``zero_point``: asymmetric with integer zero points (uint4).
    ``tensor_scale``: an extra fp32 per-tensor scale (NV double quantization, needs e4m3 block scales)."""
    name: str
    elem: str
    block: int | None
    scale: str
    symmetric: bool = True
    zero_point: bool = False
    tensor_scale: bool = False
    note: str = ""

    def __post_init__(self):
        if self.elem not in ELEMENTS:
            raise ValueError(f"{self.name}: unknown element type {self.elem!r}; known: {sorted(ELEMENTS)}")
        if self.scale not in SCALE_BYTES:
            raise ValueError(f"{self.name}: unknown scale type {self.scale!r}; known: {sorted(SCALE_BYTES)}")
        if self.block is not None and (self.block <= 0 or (self.bits == 4 and self.block % 2)):
            raise ValueError(f"{self.name}: block must be a positive (even, for 4-bit) int or None")
        if self.symmetric == self.zero_point:
            raise ValueError(f"{self.name}: exactly one of symmetric / zero_point must be set")
        if self.zero_point and (self.elem != "uint4" or self.scale not in ("fp32", "bf16")):
            raise ValueError(f"{self.name}: zero points need uint4 elements and an fp32/bf16 scale")
        if self.symmetric and self.elem == "uint4":
            raise ValueError(f"{self.name}: uint4 is only used with zero points")
        if self.tensor_scale and self.scale != "e4m3":
            raise ValueError(f"{self.name}: a per-tensor scale is only used with e4m3 block scales")

    @property
    def spec(self) -> ElemSpec:
        return ELEMENTS[self.elem]

    @property
    def bits(self) -> int:
        return ELEMENTS[self.elem].bits

    def padded_k(self, k: int) -> int:
        if self.block is None:
            return k + (k % 2 if self.bits == 4 else 0)
        return -(-k // self.block) * self.block

    def n_blocks(self, k: int) -> int:
        return 1 if self.block is None else self.padded_k(k) // self.block

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantFormat:
        return cls(**json.loads(text))


def _f(name, elem, block, scale, **kw):
    return name, QuantFormat(name, elem, block, scale, **kw)


FORMATS: dict[str, QuantFormat] = dict([
    _f("w8a16", "int8", None, "bf16", note="int8 per-output-channel symmetric (torchao Int8WeightOnly)"),
    _f("w8a16_fp8", "fp8_e4m3", None, "fp32", note="fp8 e4m3 per-output-channel (torchao Float8WeightOnly)"),
    *[_f(f"w4a16_g{g}", "uint4", g, "bf16", symmetric=False, zero_point=True,
         note=f"uint4 asymmetric, group {g} along K, integer zero points (torchao int4wo / GPTQ)")
      for g in (32, 64, 128)],
    _f("mxint8", "mxint8", 32, "e8m0", note="OCP MX INT8: k/64 elements, E8M0 scale per 32"),
    _f("mxfp8", "fp8_e4m3", 32, "e8m0", note="OCP MXFP8 (E4M3 elements), E8M0 scale per 32"),
    _f("mxfp4", "fp4_e2m1", 32, "e8m0", note="OCP MXFP4 (E2M1 elements), E8M0 scale per 32"),
    _f("nvfp4", "fp4_e2m1", 16, "e4m3", tensor_scale=True, note="NVFP4: E2M1, E4M3 scale per 16, fp32 tensor scale"),
    _f("nvint4", "int4", 16, "e4m3", tensor_scale=True, note="NVINT4: int4 [-7,7], E4M3 scale per 16, fp32 tensor scale"),
])


def get_format(fmt: QuantFormat | str) -> QuantFormat:
    if isinstance(fmt, QuantFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


# ----------------------------------------------------------------------------------------------- rounding
def exp2i(e: torch.Tensor) -> torch.Tensor:
    """Exact float64 2^e for integer tensors e in [-1022, 1023] (built from the exponent bits)."""
    return ((e.long() + 1023) << 52).view(torch.float64)


def round_to_float(x: torch.Tensor, mant_bits: int, min_exp: int, max_value: float) -> torch.Tensor:
    """Round float64 ``x`` to the nearest value of a binary float grid (``mant_bits`` stored mantissa bits,
    normal exponents >= ``min_exp``, subnormals below), ties to even, saturating at +-``max_value``.
    One rounding step (no double rounding through fp32), so the result is exactly representable."""
    x = x.double()
    ax = x.abs()
    _, e = torch.frexp(ax)  # ax = m * 2^e, m in [0.5, 1)
    quantum = exp2i((e - 1).clamp(min=min_exp) - mant_bits)
    q = (torch.round(ax / quantum) * quantum).clamp(max=max_value)
    return torch.where(x < 0, -q, q)


def _round_scale(s: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "fp32":
        return s.to(torch.float32).double()  # float64 -> float32 is a single RNE
    if kind == "bf16":
        return round_to_float(s, 7, -126, 3.3895313892515355e38)
    if kind == "e4m3":
        return round_to_float(s.clamp(E4M3_MIN, E4M3_MAX), 3, -6, E4M3_MAX)
    raise AssertionError(kind)


def _encode_scale(s: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "fp32":
        return s.to(torch.float32)
    if kind == "bf16":
        return s.to(torch.bfloat16)
    if kind == "e4m3":
        return s.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    raise AssertionError(kind)


def _decode_scale(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "e8m0":
        return exp2i(t.long() - 127)
    if kind == "e4m3":
        return t.view(torch.float8_e4m3fn).double()
    return t.double()


_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _quantize_elements(y: torch.Tensor, spec: ElemSpec) -> torch.Tensor:
    """Codes for float64 values ``y`` already divided by their scale: int8 tensor for 8-bit ints, uint8 for
    fp8 bit patterns and for 4-bit nibbles (not yet packed)."""
    if spec.kind == "int":
        q = torch.round(y / spec.step).clamp(spec.qmin, spec.qmax)
        return (q.to(torch.int8) if spec.bits == 8 else (q.to(torch.int16) & 0xF).to(torch.uint8))
    v = round_to_float(y, spec.mant_bits, 1 - spec.bias, spec.max_value)
    v = torch.where(v == 0, torch.zeros_like(v), v)  # canonical +0
    if spec.name == "fp8_e4m3":
        return v.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    mag = torch.bucketize(v.abs(), _E2M1_GRID.to(v.device)).to(torch.uint8)
    return mag | ((v < 0).to(torch.uint8) << 3)


def _element_values(codes: torch.Tensor, spec: ElemSpec) -> torch.Tensor:
    """float64 values of unpacked codes (inverse of ``_quantize_elements``)."""
    if spec.bits == 8:
        if spec.name == "fp8_e4m3":
            return codes.view(torch.float8_e4m3fn).double()
        return codes.double() * spec.step
    c = codes.long()
    if spec.name == "uint4":
        return c.double()
    if spec.name == "int4":
        return (c - ((c & 8) << 1)).double()
    mag = _E2M1_GRID.to(codes.device)[c & 7]
    return torch.where(c & 8 != 0, -mag, mag)


def pack_nibbles(c: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2m] with values < 16 -> uint8 [..., m]; low nibble = even index, high nibble = odd index."""
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------------ tensor class
@dataclass
class QuantizedTensor:
    """A quantized ``[N, K]`` weight: plain tensors (layout in the module docstring) + its format."""
    fmt: QuantFormat
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    @property
    def format_name(self) -> str:
        return self.fmt.name

    @property
    def padded_k(self) -> int:
        return self.fmt.padded_k(self.shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros, self.tensor_scale)
                   if t is not None)

    def to_state_dict(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(tensors, metadata)`` for ``safetensors.torch.save_file(tensors, path, metadata=metadata)``;
        metadata is ``{prefix + "qmeta": json}`` with the format (all fields) and the original shape."""
        tensors = {prefix + "qcodes": self.codes, prefix + "qscales": self.scales}
        if self.zeros is not None:
            tensors[prefix + "qzeros"] = self.zeros
        if self.tensor_scale is not None:
            tensors[prefix + "qtensor_scale"] = self.tensor_scale
        meta = {"version": 1, "shape": list(self.shape), "format": json.loads(self.fmt.to_json())}
        return ({k: v.detach().contiguous() for k, v in tensors.items()},
                {prefix + "qmeta": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                        prefix: str = "") -> QuantizedTensor:
        key = prefix + "qmeta"
        if key not in metadata:
            raise KeyError(f"no quantization metadata {key!r} in the state dict")
        meta = json.loads(metadata[key])
        if meta.get("version") != 1:
            raise ValueError(f"unsupported quantized-tensor version {meta.get('version')!r}")
        qt = cls(fmt=QuantFormat(**meta["format"]), shape=tuple(meta["shape"]), codes=tensors[prefix + "qcodes"],
                 scales=tensors[prefix + "qscales"], zeros=tensors.get(prefix + "qzeros"),
                 tensor_scale=tensors.get(prefix + "qtensor_scale"))
        if qt.zeros is not None and qt.fmt.elem == "uint4" and qt.zeros.numel() and int(qt.zeros.max()) > 15:
            # integer zero points lie in the codes' range; the kernels' decodes assume it (the tensor-core GEMV's
            # bf16 pair -(128 + z) is exact only for z < 128)
            raise ValueError(f"{prefix}qzeros: zero points past the 4-bit code range (max {int(qt.zeros.max())})")
        return qt


# ------------------------------------------------------------------------------------- quantize / dequant
def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"quantize expects a floating-point weight, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty weight")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf")


def quantize(w: torch.Tensor, fmt: QuantFormat | str) -> QuantizedTensor:
    """Quantize a 2-D weight ``[N, K]`` (any float dtype, any device) to ``fmt``; see the module docstring."""
    fmt = get_format(fmt)
    _check_weight(w)
    spec = fmt.spec
    n, k = w.shape
    kp, nb = fmt.padded_k(k), fmt.n_blocks(k)
    x = F.pad(w.detach().double(), (0, kp - k)).view(n, nb, kp // nb)
    zeros = tensor_scale = None
    if fmt.zero_point:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        s = _round_scale((hi - lo) / spec.qmax, fmt.scale)
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s_safe).clamp(0, spec.qmax)
        q = (torch.round(x / s_safe[..., None]) + z[..., None]).clamp(0, spec.qmax).to(torch.uint8)
        codes, scales, zeros = q.view(n, kp), _encode_scale(s, fmt.scale), z.to(torch.uint8)
    else:
        amax = x.abs().amax(-1)
        if fmt.scale == "e8m0":
            _, e = torch.frexp(amax)
            e = torch.where(amax > 0, e - 1 - spec.emax, torch.full_like(e, -127)).clamp(-127, 127)
            if spec.kind == "int" and spec.bits == 8 and bool((e > MXINT8_MAX_EXP).any()):
                # the kernels decode an int8 code c times 2^e as fma(2^23 + c + 128, 2^e, -(2^23 + 128)·2^e)
                # in fp32 (dequant_matmul._decode_tile): exact while the addend (2^23 + 128)·2^e is finite
                raise ValueError(f"quantize({fmt.name}): a 32-element block has |w| >= 2^{MXINT8_MAX_EXP + 1} "
                                 f"(E8M0 exponent above {MXINT8_MAX_EXP}); the MXINT8 kernels cannot decode it exactly")
            s, scales = exp2i(e), (e + 127).to(torch.uint8)
        else:
            ts = 1.0
            if fmt.tensor_scale:
                t = (x.abs().amax() / (E4M3_MAX * spec.max_value)).to(torch.float32)
                t = torch.where(t > 0, t, torch.ones_like(t))
                tensor_scale, ts = t.reshape(1), t.double()
            sb = _round_scale(amax / spec.max_value / ts, fmt.scale)
            s, scales = sb * ts, _encode_scale(sb, fmt.scale)
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = _quantize_elements(x / s_safe[..., None], spec).view(n, kp)
    if fmt.bits == 4:
        codes = pack_nibbles(codes)
    return QuantizedTensor(fmt, (n, k), codes.contiguous(), scales.contiguous(), zeros, tensor_scale)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """float32 ``[N, K]`` weight represented by ``qt`` (exact products in float64, one final fp32 rounding)."""
    fmt, spec = qt.fmt, qt.fmt.spec
    n, k = qt.shape
    kp, nb = fmt.padded_k(k), fmt.n_blocks(k)
    codes = unpack_nibbles(qt.codes) if fmt.bits == 4 else qt.codes
    vals = _element_values(codes, spec).view(n, nb, kp // nb)
    s = _decode_scale(qt.scales, fmt.scale)
    if qt.tensor_scale is not None:
        s = s * qt.tensor_scale.double()
    if qt.zeros is not None:
        vals = vals - qt.zeros.double()[..., None]
    return (vals * s[..., None]).view(n, kp)[:, :k].to(torch.float32)


def fake_quantize(w: torch.Tensor, fmt: QuantFormat | str) -> torch.Tensor:
    """``dequantize(quantize(w, fmt))`` cast back to ``w.dtype``."""
    return dequantize(quantize(w, fmt)).to(w.dtype)
