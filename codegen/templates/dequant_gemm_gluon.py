# fxforge dequant-GEMM template in Gluon (Triton's explicit-layout dialect), Hopper (sm_90) only: y = x @ dequant(W)^T
# for 5 <= M <= 64 rows of bf16 x and a weight W [N, K] in a packed format of passes/quant/formats.py (w8a16,
# MXINT8, w4a16, NVINT4, MXFP4, NVFP4). Launched by runtime/quant_gemm_gluon.py (GLUON configs, first in
# quant_configs.gemm_configs). The Triton SWAP tile (dequant_matmul.py) leaves its layouts, its loop schedule and
# the A-operand registers to the compiler, and its floor with a free decode was 13.4 us against bf16's 14.5-14.9
# (probe_gemm_m64_floor.md); here they are spelled out (a hand-scheduled kernel in the spirit of Marlin / Machete,
# written in Gluon so it stays Python):
#
#   acc^T [BN, BM] += decode(codes [BN, BK]) @ x^T [BK, BM]     (swap AB: the weight rows are wgmma's M side,
#                                                              BM = the next power of two >= M, 16..64)
# Kernel
#   dequant_gemm_gluon  Grid (N / BN row tiles, K splits). Each program walks its K range in steps of BK
#                       elements. Per step:
#                       - TMA: the code box [BN, BK / 2 storage units] and the x box [BM, BK] land in one of
#                         STAGES shared-memory stages (one mbarrier each); zero-filled past N, M and K.
#                       - the storage units (a byte of two 4-bit codes; an int16 pair of int8 codes) are read from
#                         shared memory straight into wgmma's register-A layout at k_width 1: a unit holds
#                         elements 2j, 2j + 1, exactly the pair one 32-bit operand register wants, so the pair
#                         the decode writes *is* the operand (the join/reshape conversion is asserted trivial).
#                       - decode + scale: one inline-PTX block per unit producing the bf16x2 register (below).
#                       - wgmma (async) of that register tile against the x stage (transposed smem view).
#                       Hand software pipeline, unrolled by two (registers a0 / a1): step i's wgmma runs while
#                       step i + 1 is decoded into the other set (listed among the wait's operands so the
#                       compiler neither sinks the decode past the wait nor copies a loop-carried set into the
#                       registers the wgmma names: that cost 32 moves a step); the TMA of step i + STAGES - 1 goes
#                       into the stage step i - 1 released. Group scales (and zero points) are loaded one step
#                       ahead into registers in the slice of the unit layout seen as [BN, BK / G, G / 2], the group
#                       dimension first in registers (vectorized loads), rows / steps clamped instead of masked.
#                       PDL: griddepcontrol.launch_dependents once the prologue's TMAs are issued, so the split-K
#                       reduce (launched with programmatic dependent launch) is already resident when this ends.
#                       PREFETCH (an option, off by default): the kernel itself launched with PDL; the prologue's
#                       code boxes go out before griddepcontrol.wait, its x boxes after (the stage barriers expect
#                       both), and the dependents are signalled after the wait. In a chain of dependent layers at
#                       4096^2 (probe_pdl_chain_gemm.md) it moved M = 16 / 64 by -1.1 .. +0.8 us depending on the
#                       format: no consistent gain. At M = 1 it took this kernel from 9.4-10.5 to 8.1-9.6 us, still
#                       slower than the words GEMV (probe_pdl_chain.md).
#                       Epilogue: the per-row scale (w8a16), the per-tensor scale (NV formats), MXINT8's element
#                       step 2^-6, NVFP4's 2^9, then fp32 partials [SPLITS, M, N] for dequant_splitk_reduce, or
#                       (one split) y in x's dtype + bias.
#
# Decodes (exact; tests/test_quant_gemm_gluon.py runs these PTX strings in an emulator against formats.py for every
# code and scale). A 4-bit unit b: b * 0x8008 puts the low nibble at bits 3-6 and the high one at 19-22 (the two
# shifted copies never overlap), one LOP3 masks them and ORs the bf16 exponent of 16: the pair (16 + u_lo, 16 + u_hi).
#   uint4 (w4a16)    (16 + u) - (16 + z) (exact), times the bf16 scale: (u - z)·s rounded once to bf16 (as SWAP).
#   int4 (nvint4)    the LOP3 also flips bit 3 (u ^ 8 = c + 8): fma.bf16x2(24 + c, s, -24·s) = c·s, exact (E4M3 s).
#   e2m1 (mx/nvfp4)  b * (2^6 + 2^18) and b * (2^12 + 2^24) place magnitudes at bf16 bits 6-8 / 22-24 and signs at
#                    15 / 31: the pair is the values times 2^-126 (a bf16 subnormal for the 0.5 code). NVFP4: one
#                    multiply by s·2^117 (2^9 in the epilogue); MXFP4: by 2^126, then by 2^(e - 127).
#   int8 (w8a16, mxint8)  the pair XOR 0x8080, each byte PRMT-ed under the exponent of 2^23: 2^23 + 128 + c; one
#                    fp32 FFMA each with s = 2^(e - 127) (w8a16: 1) and -(2^23 + 128)·s (exact for e <= 104, which
#                    quantize enforces for MXINT8), one cvt packs the pair.
#   scales           E4M3 bits moved into a bf16 (bias 127, a subnormal for e = 0) times 2^120; E8M0 e -> bf16 bits
#                    e << 7 (e = 0: the subnormal 2^-127) or fp32 e << 23; bf16 as is, duplicated into both halves.
#   ELEM 9           the probe's free decode (16 + u, no scale; benchmarks/probe_gemm_m64_gluon.py): this schedule's
#                    floor, not a format.
# sm_90 loop (triton 3.6, 64 rows x 128 elements, 4 warps): NVINT4 322 instructions per step per thread (5.0 per
# element; the first fp32-decode version 600), the free decode 229.
#
# Bytes model: as dequant_matmul.py (codes + scales + zero points + x + y + 2 * SPLITS * M * N * 4 partials);
# M = 64, 4096 x 4096: nvfp4 / nvint4 9.45 MB + 0.5 MB x + 2 MB partials at 4 splits -> ~4 us at 3.0 TB/s. The
# tensor cores need 2 * 64 * N * K = 2.1 GFLOP (~2.7 us at 800 TFLOP/s); x is re-read from L2 by every row tile
# (32 MB at 64 rows of x). H100 (results/quant_gpu.md, M = 64, 4096^2, bf16 cuBLAS 15.3 us): w8a16 12.5 us,
# MXINT8 12.8, NVFP4 12.3, NVINT4 12.3, MXFP4 11.7, w4a16 11.5 (1.20-1.34x); M = 16: 9.7-11.7 us against 16.3.
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# the TMA load's name: async_load from triton 3.7 on (async_copy_global_to_shared there only raises), the old one
# before (triton 3.6 on the H100 here)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _e4m3_f32(b):
    # uint8 E4M3 bits (positive) -> fp32: exponent / mantissa at fp32 bits 23-26 / 20-22, times 2^120
    bits = (b.to(gl.int32) & 127) << 20
    return bits.to(gl.float32, bitcast=True) * 1.329227995784916e36


@gluon.jit
def _e8m0_f32(b):
    # E8M0 biased exponent e -> 2^(e - 127); e = 0 -> 2^-127 (the subnormal 0x00400000)
    return gl.maximum(b.to(gl.int32) << 23, 0x00400000).to(gl.float32, bitcast=True)


@gluon.jit
def _bf16x2(v):
    # fp32 v (exactly representable in bf16) -> the int32 bits of the bf16 pair (v, v)
    return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", [v], dtype=gl.int32, is_pure=True,
                                     pack=1)


# Per storage unit u (a byte of two 4-bit codes, or a 16-bit pair of int8 codes; zero-extended in $2): the bf16
# pair (element 2j in $0, 2j + 1 in $1) of wgmma's A operand. $3 / $4: the group's multiplier / addend (bf16x2 bits
# for the 4-bit codes, fp32 for int8). See the header for the math.
# the pair (16 + u_lo, 16 + u_hi) of a byte's two nibbles (uint4, and the probe's free decode)
_NIB_PAIR = """mul.lo.u32 t, $2, 0x8008;
  lop3.b32 t, t, 0x00780078, 0x41804180, 0xEA;"""
# the pair of a byte's two E2M1 codes, times 2^-126 (magnitudes at bf16 bits 6-8 / 22-24, signs at 15 / 31)
_E2M1_PAIR = """mul.lo.u32 m, $2, 0x00040040;
  mul.lo.u32 g, $2, 0x01001000;
  lop3.b32 m, m, 0x01C001C0, 0, 0xC0;
  lop3.b32 m, g, 0x80008000, m, 0xEA;"""
_ASM_NIB = gl.constexpr("""{ .reg .b32 t;
  """ + _NIB_PAIR + """
  mov.b32 {$0, $1}, t; }""")
_ASM_INT4 = gl.constexpr("""{ .reg .b32 t;
  mul.lo.u32 t, $2, 0x8008;
  lop3.b32 t, t, 0x00780078, 0x41C041C0, 0x6A;
  fma.rn.bf16x2 t, t, $3, $4;
  mov.b32 {$0, $1}, t; }""")
_ASM_UINT4 = gl.constexpr("""{ .reg .b32 t;
  """ + _NIB_PAIR + """
  sub.rn.bf16x2 t, t, $4;
  mul.rn.bf16x2 t, t, $3;
  mov.b32 {$0, $1}, t; }""")
_ASM_E2M1 = gl.constexpr("""{ .reg .b32 m, g;
  """ + _E2M1_PAIR + """
  mul.rn.bf16x2 m, m, $3;
  mov.b32 {$0, $1}, m; }""")
_ASM_E2M1_E8M0 = gl.constexpr("""{ .reg .b32 m, g;
  """ + _E2M1_PAIR + """
  mov.b32 g, 0x7E807E80;
  mul.rn.bf16x2 m, m, g;
  mul.rn.bf16x2 m, m, $3;
  mov.b32 {$0, $1}, m; }""")
_ASM_INT8 = gl.constexpr("""{ .reg .b32 x, f, h;
  xor.b32 x, $2, 0x8080;
  prmt.b32 f, x, 0x4B000000, 0x7540;
  prmt.b32 h, x, 0x4B000000, 0x7541;
  fma.rn.f32 f, f, $3, $4;
  fma.rn.f32 h, h, $3, $4;
  cvt.rn.bf16x2.f32 f, h, f;
  mov.b32 {$0, $1}, f; }""")


@gluon.jit
def _decode(units, s2, c2, A_LAYOUT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr,
            ELEM: gl.constexpr, SCALE: gl.constexpr):
    # units [BN, BK / 2] (a byte of two 4-bit codes or a 16-bit pair of int8 codes per element, operand layout
    # k_width 1) -> bf16 [BN, BK] in A_LAYOUT; s2 / c2 [BN, BK / G]: the group's multiplier / addend
    u = gl.reshape(units.to(gl.int32), [BN, BK // G, G // 2])
    s3 = gl.expand_dims(s2, 2)
    c3 = gl.expand_dims(c2, 2)
    if ELEM == 0:
        asm: gl.constexpr = _ASM_INT8
    elif ELEM == 1:
        asm: gl.constexpr = _ASM_UINT4
    elif ELEM == 2:
        asm: gl.constexpr = _ASM_INT4
    elif ELEM == 3:
        asm: gl.constexpr = _ASM_E2M1_E8M0 if SCALE == 1 else _ASM_E2M1
    else:
        asm: gl.constexpr = _ASM_NIB
    if ELEM == 0:
        cons: gl.constexpr = "=h,=h,r,f,f"
    else:
        cons: gl.constexpr = "=h,=h,r,r,r"
    lo, hi = gl.inline_asm_elementwise(asm, cons, [u, s3, c3], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
                                       pack=1)
    v = gl.reshape(gl.join(lo, hi), [BN, BK])
    return gl.convert_layout(v, A_LAYOUT, assert_trivial=True)


# bf16x2 constants of the scale path (module level so tests/test_quant_gemm_gluon.py can emulate it bit for bit)
BF16X2_2P120 = gl.constexpr(0x7B807B80)  # (2^120, 2^120): E4M3 bits placed in a bf16 (bias 127) times this
BF16X2_M24 = gl.constexpr(0xC1C0C1C0)  # (-24, -24): NVINT4's addend -24·s
BF16X2_2P117 = gl.constexpr(0x7A007A00)  # (2^117, 2^117): NVFP4's scale factor (2^9 more in the epilogue)
MXINT8_ADDEND = gl.constexpr(-8388736.0)  # -(2^23 + 128): MXINT8's addend per unit of scale
NVFP4_EPILOGUE = gl.constexpr(512.0)  # 2^9: 2^126 (E2M1 bits) = 2^117 (scale) * 2^9


@gluon.constexpr_function
def _groups_first(layout):
    # the same distribution with the register bases along dim 1 (groups) first: each thread's scales of one row
    # are then consecutive registers, so their load vectorizes (the layouts differ only in register order: the
    # conversion to the slice layout the decode broadcasts from is a register renaming)
    regs = sorted(layout.reg_bases, key=lambda b: (b[1] == 0, b[1], b[0]))
    return gl.DistributedLinearLayout(regs, layout.lane_bases, layout.warp_bases, layout.block_bases, layout.shape)


@gluon.jit
def _dup_bf16(bits16):
    # int32 holding bf16 bits in 0..15 -> the pair (v, v) as int32 bits
    return bits16 * 0x10001


@gluon.jit
def _hmul2(a, b):
    return gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def _group_scales(scales, zeros, off_n, step, N, total_steps, s_sn, BN: gl.constexpr, BK: gl.constexpr,
                  G: gl.constexpr, ELEM: gl.constexpr, SCALE: gl.constexpr, PER_ROW: gl.constexpr,
                  S_LAYOUT: gl.constexpr):
    # the multiplier and addend of each (row, group) of K step ``step``, [BN, BK / G] in S_LAYOUT, as the decode
    # takes them: bf16x2 bits for the 4-bit codes, fp32 for int8. Rows past N and steps past the split's last are
    # clamped instead of masked (their values are never used), so the loads stay unmasked and vectorized. Every
    # step's groups lie inside the row: quant_gemm_gluon.why_not refuses group formats whose padded K is not a
    # multiple of BK (a group read past the row's end could be NaN, and 0 x NaN is NaN).
    if PER_ROW:  # w8a16: the codes themselves (times 1, minus 2^23 + 128); the row scale waits for the epilogue
        m = gl.full([BN, BK // G], 1.0, gl.float32, S_LAYOUT)
        c = m * MXINT8_ADDEND
    else:
        L: gl.constexpr = _groups_first(gl.to_linear_layout(S_LAYOUT, [BN, BK // G]))
        rows = gl.minimum(off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, L)), N - 1)
        grp = gl.minimum(step, total_steps - 1) * (BK // G) + gl.arange(0, BK // G, layout=gl.SliceLayout(0, L))
        offs = rows[:, None] * s_sn + grp[None, :]
        raw = gl.convert_layout(gl.load(scales + offs), S_LAYOUT)
        if ELEM == 0:  # MXINT8: fp32 2^(e - 127) and -(2^23 + 128)·2^(e - 127)
            m = _e8m0_f32(raw)
            c = m * MXINT8_ADDEND
        elif ELEM == 1:  # uint4 - zero point, times the bf16 group scale
            m = _dup_bf16(raw.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF)
            c = _bf16x2(gl.convert_layout(gl.load(zeros + offs), S_LAYOUT).to(gl.float32) + 16.0)
        elif SCALE == 2:  # E4M3 bits moved to bf16 bits 4-10 (a subnormal for e = 0), times 2^120 in bf16
            m = _hmul2(_dup_bf16((raw.to(gl.int32) & 127) << 4), BF16X2_2P120)
            if ELEM == 2:  # NVINT4: (24 + c)·s - 24·s
                c = _hmul2(m, BF16X2_M24)
            else:  # NVFP4: the E2M1 bits are the value times 2^-126; s·2^117 here, 2^9 in the epilogue
                m = _hmul2(m, BF16X2_2P117)
                c = m
        else:  # MXFP4: times 2^126 in the decode, then 2^(e - 127) (bf16 bits e << 7; e = 0: the subnormal 2^-127)
            m = _dup_bf16(gl.maximum(raw.to(gl.int32) << 7, 0x40))
            c = m
    return m, c


@gluon.jit
def _launch_dependents():
    # griddepcontrol.launch_dependents: the split-K reduce launched after this kernel with programmatic dependent
    # launch may be scheduled now (it waits in griddepcontrol.wait for this grid to complete and flush)
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _grid_wait():
    # griddepcontrol.wait: block until the kernel before this one (launched with programmatic dependent launch) has
    # completed and its writes are visible
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _refill_w(w_desc, x_desc, w_s, bar, j, nsteps, off_n, first, BKB: gl.constexpr, STAGES: gl.constexpr):
    # the codes' TMA of step j (when it exists) into its stage; the stage's barrier expects the x box as well
    sj = j % STAGES
    ok = j < nsteps
    mbarrier.expect(bar.index(sj), w_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=ok)
    _tma_load(w_desc, [off_n, (first + j) * BKB], bar.index(sj), w_s.index(sj), pred=ok)


@gluon.jit
def _refill_x(x_desc, x_s, bar, j, nsteps, first, BK: gl.constexpr, STAGES: gl.constexpr):
    # the x box of step j into its stage (after _refill_w of the same step)
    _tma_load(x_desc, [0, (first + j) * BK], bar.index(j % STAGES), x_s.index(j % STAGES), pred=j < nsteps)


@gluon.jit
def _refill(w_desc, x_desc, w_s, x_s, bar, j, nsteps, off_n, first, BKB: gl.constexpr, BK: gl.constexpr,
            STAGES: gl.constexpr):
    # TMA of step j (when it exists) into its stage, which step j - STAGES used (its wgmma has completed)
    _refill_w(w_desc, x_desc, w_s, bar, j, nsteps, off_n, first, BKB, STAGES)
    _refill_x(x_desc, x_s, bar, j, nsteps, first, BK, STAGES)


@gluon.jit
def _decode_step(w_s, bar, i, s2, c2, U_LAYOUT: gl.constexpr, A_LAYOUT: gl.constexpr, BN: gl.constexpr,
                 BK: gl.constexpr, G: gl.constexpr, ELEM: gl.constexpr, SCALE: gl.constexpr, STAGES: gl.constexpr):
    # wait for step i's codes, read them in the operand layout and decode them
    mbarrier.wait(bar.index(i % STAGES), (i // STAGES) & 1)
    return _decode(w_s.index(i % STAGES).load(U_LAYOUT), s2, c2, A_LAYOUT, BN, BK, G, ELEM, SCALE)


@gluon.jit
def dequant_gemm_gluon(w_desc, x_desc, scales, zeros, tensor_scale, bias, partials, M, N, NB, s_sn, steps_per_split,
                       total_steps, s_om, ELEM: gl.constexpr, SCALE: gl.constexpr, HAS_ZERO: gl.constexpr,
                       HAS_TS: gl.constexpr, STEP: gl.constexpr, EPB: gl.constexpr, G: gl.constexpr,
                       PER_ROW: gl.constexpr, PDL: gl.constexpr,
                       STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr,
                       PREFETCH: gl.constexpr = False):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BKB: gl.constexpr = w_desc.block_type.shape[1]  # storage units: bytes (4-bit codes) / int16 pairs (int8)
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    gl.static_assert(BK == 2 * BKB)
    gl.static_assert(BN == 16 * num_warps)

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    off_n = pid_n * BN
    first = pid_k * steps_per_split
    nsteps = gl.minimum(steps_per_split, total_steps - first)

    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BM, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    # a storage unit (byte of two 4-bit codes, 16-bit pair of int8 codes) holds the operand's register pair
    U_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    # the unit tile's layout seen as [BN, BK / G, G / 2] (what reshape infers; the probe tensor is dead code)
    G3: gl.constexpr = gl.reshape(gl.full([BN, BK // 2], 0, gl.int32, U_LAYOUT), [BN, BK // G, G // 2]).type.layout
    S_LAYOUT: gl.constexpr = gl.SliceLayout(2, G3)

    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BKB], w_desc.layout)
    x_s = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(bar.index(st), count=1)
    if PREFETCH:
        # launched with PDL: the weight's codes (which no kernel writes) are fetched while the kernel before this
        # one still runs; x, and every store, wait for its completion
        for st in gl.static_range(STAGES - 1):
            _refill_w(w_desc, x_desc, w_s, bar, st, nsteps, off_n, first, BKB, STAGES)
        _grid_wait()
        for st in gl.static_range(STAGES - 1):
            _refill_x(x_desc, x_s, bar, st, nsteps, first, BK, STAGES)
    else:
        for st in gl.static_range(STAGES - 1):
            _refill(w_desc, x_desc, w_s, x_s, bar, st, nsteps, off_n, first, BKB, BK, STAGES)
    if PDL or PREFETCH:
        _launch_dependents()

    acc = gl.zeros([BN, BM], gl.float32, MMA)
    # two register sets for the A operand (a0: even steps, a1: odd): wgmma reads one while the other is decoded,
    # and neither needs copying into the registers the next wgmma names (a loop-carried single set did: 32 moves)
    s_nxt, c_nxt = _group_scales(scales, zeros, off_n, first, N, first + nsteps, s_sn, BN, BK, G, ELEM, SCALE,
                                 PER_ROW, S_LAYOUT)
    a0 = _decode_step(w_s, bar, 0, s_nxt, c_nxt, U_LAYOUT, A_LAYOUT, BN, BK, G, ELEM, SCALE, STAGES)
    s_nxt, c_nxt = _group_scales(scales, zeros, off_n, first + 1, N, first + nsteps, s_sn, BN, BK, G, ELEM, SCALE,
                                 PER_ROW, S_LAYOUT)
    for p in range((nsteps - 1) // 2):
        i = 2 * p
        _refill(w_desc, x_desc, w_s, x_s, bar, i + STAGES - 1, nsteps, off_n, first, BKB, BK, STAGES)
        acc = warpgroup_mma(a0, x_s.index(i % STAGES).permute((1, 0)), acc, is_async=True)
        s_use, c_use = s_nxt, c_nxt
        s_nxt, c_nxt = _group_scales(scales, zeros, off_n, first + i + 2, N, first + nsteps, s_sn, BN, BK, G, ELEM,
                                     SCALE, PER_ROW, S_LAYOUT)
        a1 = _decode_step(w_s, bar, i + 1, s_use, c_use, U_LAYOUT, A_LAYOUT, BN, BK, G, ELEM, SCALE, STAGES)
        # a1 among the wait's operands: computed before the wait (not sunk past it, where it would serialize with
        # the wgmma), and a0's registers stay untouched until the wait
        acc, a0, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a0, a1))
        _refill(w_desc, x_desc, w_s, x_s, bar, i + STAGES, nsteps, off_n, first, BKB, BK, STAGES)
        acc = warpgroup_mma(a1, x_s.index((i + 1) % STAGES).permute((1, 0)), acc, is_async=True)
        s_use, c_use = s_nxt, c_nxt
        s_nxt, c_nxt = _group_scales(scales, zeros, off_n, first + i + 3, N, first + nsteps, s_sn, BN, BK, G, ELEM,
                                     SCALE, PER_ROW, S_LAYOUT)
        a0 = _decode_step(w_s, bar, i + 2, s_use, c_use, U_LAYOUT, A_LAYOUT, BN, BK, G, ELEM, SCALE, STAGES)
        acc, a1, a0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a1, a0))
    last = nsteps - 1
    if (nsteps - 1) % 2 == 1:  # an even count: a0 holds step nsteps - 2, step nsteps - 1 is still to decode
        _refill(w_desc, x_desc, w_s, x_s, bar, last - 1 + STAGES - 1, nsteps, off_n, first, BKB, BK, STAGES)
        acc = warpgroup_mma(a0, x_s.index((last - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        a1 = _decode_step(w_s, bar, last, s_nxt, c_nxt, U_LAYOUT, A_LAYOUT, BN, BK, G, ELEM, SCALE, STAGES)
        acc, a0, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a0, a1))
        acc = warpgroup_mma(a1, x_s.index(last % STAGES).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    else:
        acc = warpgroup_mma(a0, x_s.index(last % STAGES).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(bar.index(st))

    if HAS_TS:
        acc = acc * gl.load(tensor_scale)
    if PER_ROW:  # w8a16: the bf16 scale of each weight row, once on the fp32 accumulator
        srow = gl.load(scales + gl.minimum(off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)), N - 1) * s_sn)
        acc = acc * srow.to(gl.float32)[:, None]
    if ELEM == 3 and SCALE == 2:
        acc = acc * NVFP4_EPILOGUE  # NVFP4: the 2^9 its scales left out
    if STEP != 1.0:
        acc = acc * STEP
    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    cols = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    ok = (rows[:, None] < N) & (cols[None, :] < M)
    if SPLIT:  # fp32 partials [SPLITS, M, N] (transposed: acc holds rows of W x rows of x)
        gl.store(partials + pid_k * M * N + cols[None, :] * N + rows[:, None], acc, mask=ok)
    else:
        if HAS_BIAS:
            acc = acc + gl.load(bias + rows, mask=rows < N, other=0.0).to(gl.float32)[:, None]
        gl.store(partials + cols[None, :] * s_om + rows[:, None], acc.to(partials.dtype.element_ty), mask=ok)
