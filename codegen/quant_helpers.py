"""@triton.jit helpers of the weight-only dequant templates (codegen/templates/dequant_matmul.py and
dequant_gemv_words.py): exact bit-trick decoding of codes and scales, and the shared epilogue. The templates
import them by module path (as triton_helpers), so both templates share one definition.

Decoding uses integer bit operations only: int -> float conversions are 1/8 of the FP32 rate on the H100,
so a code c becomes a float as the bits of 2^23 + c minus 2^23 (one OR + one FADD)."""
import triton
import triton.language as tl
from fxforge.codegen.triton_helpers import round_bf16 as _round_bf16

try:  # griddepcontrol wrappers: triton >= 3.4
    from triton.language.extra.cuda import (
        gdc_launch_dependents as _gdc_launch_dependents,
    )
    from triton.language.extra.cuda import gdc_wait as _gdc_wait

    HAS_GDC = True
except ImportError:  # older triton: programmatic dependent launch stays off (runtime/quant_linear.py)
    HAS_GDC = False

    @triton.jit
    def _gdc_launch_dependents():
        pass

    @triton.jit
    def _gdc_wait():
        pass


@triton.jit
def u2f(i):
    # int32 i in [0, 2^23) -> float32 exactly without an I2F conversion (1/8-rate on the H100): the bits
    # 0x4B000000 | i are the float 2^23 + i; subtracting 2^23 leaves i. Full-rate OR + FADD.
    return (i | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def e4m3_value(b):
    # b: int32 bits of a finite float8_e4m3fn (sign bit 7, exponent bits 6..3 with bias 7, mantissa 2..0).
    # Exponent and mantissa moved to fp32 bits 23-26 and 20-22, the sign to bit 31: the float is
    # 2^(e - 127)·(1 + m/8) (e > 0) or the subnormal m·2^-129 (e = 0), and one multiply by 2^120 gives
    # 2^(e - 7)·(1 + m/8) / m·2^-9 exactly (mul.f32 keeps subnormals) -- no selects (was ~10 ops).
    bits = ((b & 127) << 20) | ((b & 128) << 24)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120


@triton.jit
def scale_value(s, SCALE: tl.constexpr):
    # SCALE 0: bf16 / fp32 value; 1: E8M0 biased exponent; 2: E4M3 bits (positive).
    if SCALE == 1:  # 2^(c - 127) as the fp32 bits c << 23; c = 0: 2^-127, the subnormal 0x00400000 (one max)
        v = tl.maximum(s.to(tl.int32) << 23, 0x00400000).to(tl.float32, bitcast=True)
    elif SCALE == 2:
        v = e4m3_value(s.to(tl.int32))
    else:
        v = s.to(tl.float32)
    return v


@triton.jit
def nibble_value(c, ELEM: tl.constexpr):
    # c: int32 in 0..15, decoded with integer bit operations only (no I2F). ELEM 1: uint4 (zero point
    # subtracted by the caller); 2: int4 two's complement (c ^ 8 is the offset-binary code, minus 8);
    # 3: e2m1 (magnitudes 0 .5 1 1.5 2 3 4 6): exponent e and mantissa m placed at fp32 bits 23-24 and 22,
    # sign bit 3 at bit 31, make the float 2^(e - 127)·(1 + m/2) (e > 0) or the subnormal m·2^-127 (e = 0),
    # so one multiply by 2^126 gives every value exactly (PTX mul.f32 keeps subnormals: no .ftz). Four
    # integer ops and an FMUL; the select-based form it replaces took ~11 (sm_90 SASS, SWAP GEMM loop).
    if ELEM == 1:
        v = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    elif ELEM == 2:
        v = ((c ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    else:
        bits = ((c << 22) & 0x01C00000) | ((c << 28) & -2147483648)
        v = bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126
    return v


@triton.jit
def e2m1_at(w, P: tl.constexpr):
    # The e2m1 code whose bit 0 sits at bit P of the int32 w (other bits ignored), decoded as nibble_value
    # ELEM 3 does but straight from w: exponent / mantissa bits P+1..P+2 / P to fp32 bits 23-24 / 22 and
    # bit P+3 to bit 31 take one shift and one mask each, without first extracting the nibble.
    if P <= 22:
        lo = (w << (22 - P)) & 0x01C00000
    else:
        lo = (w >> (P - 22)) & 0x01C00000
    bits = lo | ((w << (28 - P)) & -2147483648)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126


@triton.jit
def word_code_at(wd, SHIFT: tl.constexpr, BITS: tl.constexpr, ELEM: tl.constexpr, off):
    # The code at bit SHIFT of every int32 word wd (the words GEMVs' shift decode): e2m1 / e4m3 decoded,
    # integer codes as 2^23 + c minus 2^23 + off (off: the code's offset / zero point, a float or tensor)
    if BITS == 4:
        if ELEM == 3:
            v = e2m1_at(wd, SHIFT)
        else:
            v = (((wd >> SHIFT) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - (off + 8388608.0)
    else:
        if ELEM == 4:
            v = e4m3_value((wd >> SHIFT) & 255)
        else:
            v = (((wd >> SHIFT) & 255) | 0x4B000000).to(tl.float32, bitcast=True) - (off + 8388608.0)
    return v


@triton.jit
def plane_code(src, mask, EXP: tl.constexpr, c0):
    # The words GEMVs' mask decode: the integer code under mask (plane J: mask = (2^BITS - 1) << BITS·J)
    # OR-ed with EXP, the exponent field of 2^(23 - BITS·J), is the float 2^(23 - BITS·J) + c (one LOP3, no
    # shift, exact); minus c0 = that power of two plus the code's offset it is c - offset exactly. mask is a
    # runtime value so that ptxas keeps the masks in registers (as immediates it re-materialized one MOV
    # per use).
    return ((src & mask) | EXP).to(tl.float32, bitcast=True) - c0


@triton.jit
def epilogue_scale(acc, scales, tensor_scale, rn, N, s_sn, SCALE: tl.constexpr, PER_ROW: tl.constexpr,
                   HAS_TS: tl.constexpr, STEP: tl.constexpr):
    # Factors constant along K, applied once to the fp32 accumulator [BLOCK_M, BLOCK_N].
    if PER_ROW:
        s = scale_value(tl.load(scales + rn * s_sn, mask=rn < N, other=0), SCALE)
        acc = acc * s[None, :]
    if HAS_TS:
        acc = acc * tl.load(tensor_scale)
    if STEP != 1.0:
        acc = acc * STEP
    return acc


@triton.jit
def store_out(out, bias, acc, rm, rn, M, N, s_om, s_on, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
              INTERPRETED: tl.constexpr):
    # acc [BLOCK_M, BLOCK_N] (+ bias) cast to out's dtype; the interpreter rounds to bf16 as the GPU does.
    if HAS_BIAS:
        acc = acc + tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if INTERPRETED and OUT_BF16:
        acc = _round_bf16(acc)
    tl.store(out + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def pdl_launch_dependents(ENABLED: tl.constexpr):
    # Programmatic dependent launch (sm_90+; ENABLED is a kernel's PDL / WAIT constexpr, False in the
    # interpreter, on older GPUs and triton < 3.4, where griddepcontrol is missing): the kernel after this one, if
    # launched with launch_pdl (the split-K reduce; a GEMV with WAIT, which first loads its leading code words), may
    # be scheduled as soon as every program of this one has passed here; it blocks in pdl_wait until this grid has
    # finished and its writes are visible. A kernel that itself waits signals only after its wait, so a chain of
    # PDL kernels never piles up resident.
    if ENABLED:
        _gdc_launch_dependents()


@triton.jit
def pdl_wait(ENABLED: tl.constexpr):
    # the dependent side of pdl_launch_dependents: wait for the previous grid's completion and memory
    if ENABLED:
        _gdc_wait()


@triton.jit
def asm_byte_planes(b8, ASM: tl.constexpr, BF16: tl.constexpr):
    # Two 16-bit planes of a uint8 code tile from the inline PTX block ASM (the templates' packed decodes):
    # pack=4 hands it 4 code bytes in one register ($4) and takes each plane's 4 values as two 16-bit pairs
    # ($0 $1, $2 $3), bf16 (BF16) or fp16. Not for the interpreter (no inline PTX there).
    if BF16:
        out = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b8], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                        pack=4)
    else:
        out = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b8], dtype=(tl.float16, tl.float16), is_pure=True,
                                        pack=4)
    return out
