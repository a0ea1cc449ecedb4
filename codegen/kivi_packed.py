"""KIVI's packed decodes and word reads for codegen/templates/kivi_attention.py (the split-kernel template
imports them): inline-PTX bit-plane decode of 4 code bytes into c - MID in 16-bit pairs (PACKED), the value
fma on token pairs (V_PAIRS), and the 16-bit fields of int64 / int32 scale words (VS_WORD, KS_WORD). Why
each exists and what it measured: the template's header."""
import triton
import triton.language as tl
from fxforge.codegen.quant_helpers import asm_byte_planes as _asm_byte_planes


def _planes_asm(bits: int, base: int, base_mid: int, half: str) -> str:
    """PTX for PACKED (see planes_packed): 4 code bytes (one 32-bit register, Triton's pack=4 of uint8)
    -> every bit plane's 4 codes as c - MID in 2 registers of 16-bit pairs. PRMT spreads bytes 0, 1 (2, 3)
    into the two 16-bit halves once for all planes; per plane and pair one shift, one LOP3 ((v & mask) |
    base: the 16-bit float base + c, base's ulp being 1/2) and one packed v·1 - (base + MID) (exact). An fma,
    not sub.bf16x2, which needs sm_90: fma.rn.bf16x2 runs from sm_80 (the same HFMA2 on the H100)."""
    per = 8 // bits
    mask = ((1 << bits) - 1) << 1
    one = 0x3F80 if half == "bf16" else 0x3C00
    lines = ["{", ".reg .b32 t0, t1, k, u, v<2>;", f"prmt.b32 t0, ${2 * per}, 0, 0x4140;",
             f"prmt.b32 t1, ${2 * per}, 0, 0x4342;", f"mov.b32 k, {(base_mid | 0x8000) * 0x10001:#010x};",
             f"mov.b32 u, {one * 0x10001:#010x};"]
    for i in range(per):
        for j in range(2):
            shift = "shl.b32 v{j}, t{j}, 1;" if i == 0 else f"shr.b32 v{{j}}, t{{j}}, {i * bits - 1};"
            lines += [shift.format(j=j), f"lop3.b32 v{j}, v{j}, {mask * 0x10001:#010x}, {base * 0x10001:#010x}, 0xea;",
                      f"fma.rn.{half}x2 ${2 * i + j}, v{j}, u, k;"]
    return "\n".join(lines + ["}"])


# c - MID per bit plane, 16-bit float bases with ulp 1/2: bf16 64 (0x4280), fp16 512 (0x6000); base + MID
# (negated in the fma by its sign bit)
_PLANES_2_BF16 = tl.constexpr(_planes_asm(2, 0x4280, 0x4283, "bf16"))  # 65.5
_PLANES_4_BF16 = tl.constexpr(_planes_asm(4, 0x4280, 0x428F, "bf16"))  # 71.5
_PLANES_2_F16 = tl.constexpr(_planes_asm(2, 0x6000, 0x6003, "f16"))  # 513.5
_PLANES_4_F16 = tl.constexpr(_planes_asm(4, 0x6000, 0x600F, "f16"))  # 519.5


@triton.jit
def planes_packed(b8, BITS: tl.constexpr, DOT: tl.constexpr):
    """PACKED (GPU, bf16 / fp16 dots): every bit plane of the uint8 code tile b8 as c - MID exactly in the
    dot dtype, the same values _centred gives, from one inline-PTX block per 4 bytes: packed 16-bit pairs,
    ~1.6 instructions per code instead of a shift, a mask, a 16-bit move and a subtract per code. Returns 4
    planes (4-bit: planes 0, 1 twice)."""
    if BITS == 2:
        if DOT == 2:
            p0, p1, p2, p3 = tl.inline_asm_elementwise(_PLANES_2_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b8],
                                                       dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                                       is_pure=True, pack=4)
        else:
            p0, p1, p2, p3 = tl.inline_asm_elementwise(_PLANES_2_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b8],
                                                       dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                       is_pure=True, pack=4)
    else:
        if DOT == 2:
            p0, p1 = _asm_byte_planes(b8, _PLANES_4_BF16, True)
        else:
            p0, p1 = _asm_byte_planes(b8, _PLANES_4_F16, False)
        p2 = p0
        p3 = p1
    return p0, p1, p2, p3


@triton.jit
def fma_token_pairs(a, s, m, DOT: tl.constexpr):
    """a·s + m in packed 16-bit pairs by inline PTX (fma.rn.{bf16,f16}x2: the HFMA2 the compiler emits for
    the plain expression). V_PAIRS: pack=2 takes two consecutive elements of the value operand's mma layout
    (kWidth 4 along the tokens), i.e. a token pair of one channel, which is how the decode produced them and
    how the mma takes them. Written plainly, LLVM's vectorizer pairs two channels of one token instead (one
    scale, broadcast) and re-pairs inputs and outputs with PRMTs (offline sm_90, 2-bit one warp: 184 -> 133
    PRMT, 1212 -> 1176 loop instructions per tile; 4-bit 1321 -> 1278)."""
    if DOT == 2:
        out = tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, s, m], dtype=tl.bfloat16,
                                        is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, s, m], dtype=tl.float16,
                                        is_pure=True, pack=2)
    return out


@triton.jit
def half_of(w, j: tl.constexpr, dtype: tl.constexpr):
    """16-bit field j (0..3) of the int64 w as the 2-byte float type dtype (VS_WORD's value scales)."""
    return ((w >> (16 * j)) & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)


@triton.jit
def word_pairs(w, dtype: tl.constexpr):
    """int32 words [n] -> their 2-byte halves [2n] as dtype, low half first (KS_WORD's key scales)."""
    return tl.reshape(tl.join(half_of(w, 0, dtype), half_of(w, 1, dtype)), [2 * w.shape[0]])
