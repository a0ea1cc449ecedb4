"""@triton.jit tile decodes of the dequant GEMM (codegen/templates/dequant_matmul.py) that produce the dot
operand directly: per-element group scales broadcast to the tile, the 16-bit packed-pair decodes of the SWAP
tile (uint4 + zero point, int4, e2m1) and MXINT8's one-FFMA decode. Kept apart from the template so it stays
a readable size; exactness of each trick is argued where it is defined (and tested in tests/test_quant_pass.py)."""
import triton
import triton.language as tl


@triton.jit
def group_bcast(s, BLOCK_N: tl.constexpr, KE: tl.constexpr, GE: tl.constexpr):
    # per-group values s ([BLOCK_N] when the tile lies in one group, KE <= GE, else [BLOCK_N, KE // GE]) ->
    # [BLOCK_N, KE], each repeated over its group's GE elements. Broadcasting the small tensor (rather than
    # viewing the tile as [BLOCK_N, KE // GE, GE]) keeps the tile's own layout: Triton can then load the
    # codes straight in the wgmma register-operand layout (sm_90 SASS: no shared-memory conversion of the
    # decoded tile, no serialized wgmma).
    if KE <= GE:
        return tl.broadcast_to(s[:, None], (BLOCK_N, KE))
    return tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, KE // GE, GE)), (BLOCK_N, KE))


@triton.jit
def as_dot_dtype(lo, hi, BLOCK_N: tl.constexpr, KE: tl.constexpr, ACT: tl.constexpr):
    # int32 bit patterns of 16-bit floats for the low / high nibble of each code byte -> the [BLOCK_N, KE]
    # tile in the dot dtype (bf16 for ACT 2, else fp16), in element order: adjacent elements share a
    # 32-bit register, so the arithmetic on the tile runs packed (HADD2 / HMUL2).
    if ACT == 2:
        lo = lo.to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = hi.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        lo = lo.to(tl.int16).to(tl.float16, bitcast=True)
        hi = hi.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, KE))


@triton.jit
def decode_zero_packed(b, z, BLOCK_N: tl.constexpr, KE: tl.constexpr, ACT: tl.constexpr):
    # GPU SWAP path, uint4 codes minus the group's zero point [BLOCK_N] straight in the 16-bit dot dtype:
    # BASE | c is the float BASE + c (bf16 0x4300 = 128, fp16 0x6400 = 1024; ulp 1), and minus BASE + z
    # it is c - z exactly -- the same values the fp32 decode casts, with no fp32 round trip / F2FP.
    # (per byte: two masks and a shift; the one-multiply nibble pair made this loop longer: 395 -> 427)
    BASE: tl.constexpr = 0x4300 if ACT == 2 else 0x6400
    bi = b.to(tl.int32)
    w = as_dot_dtype((bi & 15) | BASE, ((bi >> 4) & 15) | BASE, BLOCK_N, KE, ACT)
    return w - (z + (128.0 if ACT == 2 else 1024.0)).to(w.dtype)[:, None]


@triton.jit
def decode_int4_scaled_packed(b, s, BLOCK_N: tl.constexpr, GB: tl.constexpr, KE: tl.constexpr,
                               ACT: tl.constexpr):
    # GPU SWAP path, int4 two's-complement codes (nvint4) times their group scale s (fp32, exact in the
    # 16-bit dot dtype: E4M3 values), in the dot dtype: (c ^ 8) | BASE is BASE + c + 8, minus BASE + 8 it
    # is c exactly; c·s then rounds once, as the fp32 decode's cast of the exact product does.
    BASE: tl.constexpr = 0x4300 if ACT == 2 else 0x6400
    # offset binary c + 8 in both halves: (nibbles ^ 8) | BASE is one mask-xor, the OR bits lie outside
    bu = b.to(tl.uint32)
    pair = (((bu * 0x1001) & 0x000F000F) ^ (BASE * 0x10001 + 0x00080008)).to(tl.int32, bitcast=True)
    w = as_dot_dtype(pair & 0xFFFF, (pair >> 16) & 0xFFFF, BLOCK_N, KE, ACT)
    w = w - (136.0 if ACT == 2 else 1032.0)
    return w * group_bcast(s.to(w.dtype), BLOCK_N, KE, 2 * GB)  # the element group is 2·GB elements


@triton.jit
def decode_e2m1_scaled_packed(b, s, BLOCK_N: tl.constexpr, GB: tl.constexpr, KE: tl.constexpr):
    # GPU SWAP path, e2m1 codes (mxfp4, nvfp4) times their group scale s, straight in bf16: exponent /
    # mantissa / sign bits moved to bf16 bits 7-8 / 6 / 15 make 2^(e - 127)·(1 + m/2), or the subnormal
    # m·2^-127 for e = 0, and one packed multiply by 2^126 gives the e2m1 value exactly; times s (E8M0 /
    # E4M3, exact in bf16) the product is exact too -- the values the fp32 decode casts.
    # Both nibbles of a byte at once: byte·(2^6 + 2^18) puts the low nibble's magnitude bits at 6-8 and the
    # high nibble's at 22-24, byte·(2^12 + 2^24) the signs at 15 and 31 (the two shifted copies never
    # overlap, so no carries; the masks clear the other bits): one 32-bit register holding the bf16 pair
    # (was four shifts and four masks per byte)
    bu = b.to(tl.uint32)
    pair = (((bu * 0x40040) & 0x01C001C0) | ((bu * 0x1001000) & 0x80008000)).to(tl.int32, bitcast=True)
    w = as_dot_dtype(pair & 0xFFFF, (pair >> 16) & 0xFFFF, BLOCK_N, KE, 2)
    w = w * 8.507059173023462e37  # 2^126
    return w * group_bcast(s.to(tl.bfloat16), BLOCK_N, KE, 2 * GB)


@triton.jit
def decode_int8_e8m0(b, s, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, GB: tl.constexpr):
    # MXINT8: int8 codes [BLOCK_N, BLOCK_KB] times their E8M0 (power-of-two) group scales s (fp32) in one
    # FFMA per element: (2^23 + c + 128)·s minus (2^23 + 128)·s, both products exact (s = 2^e, e <= 104:
    # formats.quantize refuses larger MXINT8 scales), so the difference is c·s exactly (was a FADD and a
    # FMUL); c·s has at most 8 significant bits, so its cast to bf16 / fp16 for the dot is exact too.
    v = (b.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True)
    return tl.fma(v, group_bcast(s, BLOCK_N, BLOCK_KB, GB), group_bcast(s * -8388736.0, BLOCK_N, BLOCK_KB, GB))
