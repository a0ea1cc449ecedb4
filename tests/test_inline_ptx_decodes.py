"""The inline-PTX code decodes of the Triton templates, checked without a GPU: a small emulator of the PTX
they use (prmt, shl / shr, and, lop3, mov, sub / fma.rn.{bf16x2,f16x2}) runs each generated block on every code
byte and compares with the decode it stands for -- KIVI's bit planes (c - MID per plane, already
GPU-verified bit-identical to the per-code decode, which validates the emulator) and the planes GEMV's
nibble planes (base + c for uint4 / int4, e2m1 bit placement). The GPU tests run the same blocks for real."""
import importlib
import importlib.util
import re
import struct
from pathlib import Path

import numpy as np
import pytest

TEMPLATES = Path(__file__).resolve().parent.parent / "codegen" / "templates"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"tmpl_{name}", TEMPLATES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _f32(bits32: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits32 & 0xFFFFFFFF))[0]


def _half_value(h: int, kind: str) -> float:
    if kind == "bf16":
        return _f32(h << 16)
    return float(np.array([h], dtype=np.uint16).view(np.float16)[0])


def _half_bits(v: float, kind: str) -> int:
    if kind == "bf16":  # round to nearest even from float32 (the values here are exact)
        b = struct.unpack("<I", struct.pack("<f", v))[0]
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return int(np.array([v], dtype=np.float16).view(np.uint16)[0])


def _lop3(a, b, c, lut):
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def _prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, inputs: dict) -> dict:
    """Execute the straight-line PTX block ``asm`` with operand registers ``inputs`` ({"$4": value});
    returns every register written."""
    regs = dict(inputs)

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        d = a[0]
        if op == "prmt.b32":
            regs[d] = _prmt(val(a[1]), val(a[2]), val(a[3]))
        elif op == "shl.b32":
            regs[d] = (val(a[1]) << val(a[2])) & 0xFFFFFFFF
        elif op == "shr.b32":
            regs[d] = val(a[1]) >> val(a[2])
        elif op == "and.b32":
            regs[d] = val(a[1]) & val(a[2])
        elif op == "mov.b32":
            regs[d] = val(a[1])
        elif op == "lop3.b32":
            regs[d] = _lop3(val(a[1]), val(a[2]), val(a[3]), val(a[4]))
        elif (m := re.fullmatch(r"sub\.rn\.(bf16|f16)x2", op)):
            kind = m.group(1)
            x, y = val(a[1]), val(a[2])
            lo = _half_bits(_half_value(x & 0xFFFF, kind) - _half_value(y & 0xFFFF, kind), kind)
            hi = _half_bits(_half_value(x >> 16, kind) - _half_value(y >> 16, kind), kind)
            regs[d] = lo | (hi << 16)
        elif (m := re.fullmatch(r"fma\.rn\.(bf16|f16)x2", op)):  # (exact products and sums here)
            kind = m.group(1)
            x, y, z = val(a[1]), val(a[2]), val(a[3])
            halves = [_half_bits(_half_value((x >> sh) & 0xFFFF, kind) * _half_value((y >> sh) & 0xFFFF, kind)
                                 + _half_value((z >> sh) & 0xFFFF, kind), kind) for sh in (0, 16)]
            regs[d] = halves[0] | (halves[1] << 16)
        else:
            raise AssertionError(f"PTX op {op} not emulated")
    return regs


SM80_OPS = {"prmt.b32", "shl.b32", "shr.b32", "and.b32", "mov.b32", "lop3.b32", "fma.rn.bf16x2", "fma.rn.f16x2",
            "sub.rn.f16x2"}  # (sub.rn.bf16x2 needs sm_90)


def _ops(asm):
    return {line.strip().split(None, 1)[0] for line in asm.splitlines()
            if line.strip() and line.strip() not in "{}" and not line.strip().startswith(".reg")}


def _words():
    """Every byte value, 4 per 32-bit word (byte i of word w is 4w + i)."""
    return [sum(((4 * w + i) & 0xFF) << (8 * i) for i in range(4)) for w in range(64)]


def _halves(regs, names, kind):
    """The 16-bit values of registers ``names`` in element order (low half first), as floats."""
    out = []
    for r in names:
        out += [_half_value(regs[r] & 0xFFFF, kind), _half_value(regs[r] >> 16, kind)]
    return out


@pytest.mark.parametrize("bits,kind,name", [(2, "bf16", "_PLANES_2_BF16"), (4, "bf16", "_PLANES_4_BF16"),
                                            (2, "f16", "_PLANES_2_F16"), (4, "f16", "_PLANES_4_F16")])
def test_kivi_bit_planes(bits, kind, name):
    asm = getattr(importlib.import_module("fxforge.codegen.kivi_packed"), name).value
    assert _ops(asm) <= SM80_OPS  # on by default: must assemble on every GPU with bf16 (sm_80+)
    per, mid = 8 // bits, ((1 << bits) - 1) / 2
    for word in _words():
        regs = run_ptx(asm, {f"${2 * per}": word})
        for i in range(per):  # plane i: registers $2i, $2i+1 hold bytes 0..3 of the word
            got = _halves(regs, [f"${2 * i}", f"${2 * i + 1}"], kind)
            want = [((word >> (8 * j + bits * i)) & ((1 << bits) - 1)) - mid for j in range(4)]
            assert got == want, (bits, kind, hex(word), i)


@pytest.mark.parametrize("kind,xor,name", [("bf16", 0, "_PLANES_BF16_U4"), ("bf16", 8, "_PLANES_BF16_I4"),
                                           ("f16", 0, "_PLANES_F16_U4"), ("f16", 8, "_PLANES_F16_I4")])
def test_gemv_nibble_planes(kind, xor, name):
    asm = getattr(_module("dequant_gemv_planes"), name).value
    assert _ops(asm) <= SM80_OPS
    base = 128 if kind == "bf16" else 1024
    for word in _words():
        regs = run_ptx(asm, {"$4": word})
        lo, hi = _halves(regs, ["$0", "$1"], kind), _halves(regs, ["$2", "$3"], kind)
        bytes_ = [(word >> (8 * j)) & 0xFF for j in range(4)]
        assert lo == [base + ((b & 15) ^ xor) for b in bytes_], (kind, xor, hex(word))
        assert hi == [base + ((b >> 4) ^ xor) for b in bytes_], (kind, xor, hex(word))


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_gemv_e2m1_planes():
    asm = _module("dequant_gemv_planes")._PLANES_BF16_E2M1.value
    assert _ops(asm) <= SM80_OPS
    for word in _words():
        regs = run_ptx(asm, {"$4": word})
        lo, hi = _halves(regs, ["$0", "$1"], "bf16"), _halves(regs, ["$2", "$3"], "bf16")
        for j in range(4):
            b = (word >> (8 * j)) & 0xFF
            for got, nib in ((lo[j], b & 15), (hi[j], b >> 4)):
                want = (-1.0 if nib & 8 else 1.0) * E2M1[nib & 7]
                assert got * 2.0 ** 126 == want, (hex(word), j, nib, got)
