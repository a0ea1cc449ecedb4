# fxforge dequant-GEMV template on the tensor cores through inline mma.sync, in Gluon: y = x @ dequant(W)^T (+ bias)
# for M <= 4 rows of bf16 / fp16 x and a w4a16_g128 weight W [N, K] (uint4 codes, integer zero points, bf16 scales
# per group of 128 along K) packed by passes/quant/formats.py, its codes read in place as int32 words (word w of a row
# holds elements 8w .. 8w + 7, element 8w + e in bits 4e .. 4e + 3). Launched by runtime/quant_gemv_mma.py (MMA
# configs: the default GEMV for this format from 12288 rows -- 8192 at M >= 2 -- and K <= 4096: quant_configs).
#
# Why: the words GEMV (dequant_gemv_words.py) spends 3 CUDA-core instructions per weight element on decode + FMA
# (LOP3, FADD, FFMA) and ~4.4 in its whole loop; with the decode free it was 19% faster at 4096^2 and 28% at 14336
# rows (session 20, probe_gemv_gluon_r4.md). Here the multiply-adds go to the tensor cores and the decode works on
# bf16 pairs. Per thread, a scale group of rows g and g + 8 of a 16-row tile (4 code words each):
#   3 SHF per word (w >> 4, 8, 12), one LOP3 per bf16 pair: (w & 0x000F000F) | 0x43004300 is the pair
#   (128 + c_e, 128 + c_{e+4}) exactly (bf16's ulp at 128 is 1); one packed FMA (HADD2) subtracts 128 + z: c - z
#   exactly; x's pairs regrouped by PRMT to match; 8 chained mma.sync m16n8k16 with fp32 accumulation.
#   28 instructions per 16 weight elements (1.75); the sm_90 loop (triton 3.6) is 162 instructions per 64 elements
#   (2.5 per element: addressing, loads, the scale FFMA) against the words loop's 4.4.
#
# Kernel
#   dequant_gemv_mma    One program per 16 weight rows and row of x (grid (N / 16, 1, M)); its W warps split the K
#                       range by scale groups (step s: groups s * Q .. s * Q + Q - 1, Q = W * QW; warp w takes group
#                       w (+ W, ...), or with ADJ groups w * QW .. w * QW + QW - 1) and are summed through shared memory
#                       at the end. A thread (lane = 4 g + t) holds, per group, words 4t .. 4t + 3 of rows g and g + 8
#                       (one 16-byte load each) and the 32 x elements they multiply (four 16-byte loads).
#                       mma.sync's A fragment of a thread is rows g / g + 8 x logical k 2t, 2t + 1, 2t + 8, 2t + 9;
#                       here logical k (2t, 2t + 1) is a word's elements (e, e + 4) and (2t + 8, 2t + 9) its (e + 1,
#                       e + 5) (e = 0, then 2 for the word's second mma): a k permutation inside the 16-element chunk,
#                       applied to x's B fragment too, so the dot is unchanged. Every column of B carries the same x,
#                       so each lane's D holds rows g (c0 = c1) and g + 8 (c2 = c3). A group's dot times its scale
#                       goes into per-(group slot, row) fp32 accumulators; the epilogue stores from the t = 0 lanes.
#                       A step's (group, lane) structure is one elementwise inline-asm call with pack=4: the 4 packed
#                       slots are the thread's 4 words for the code / x inputs and the mma's 4 accumulator registers
#                       for the output; zero points are broadcast along them.
#                       Loads: the code words of the next PREFETCH steps in registers (the loop unrolled by PREFETCH so
#                       each step refills its own slot; a cp.async ring in shared memory instead was slower everywhere,
#                       probe_gemv_mma_r6.md, and was removed); AUX: x, zero points and scales one step ahead. EVEN (N % 16 == 0, whole steps, K = 128 * NB):
#                       no masks; steps past the last are clamped (a repeat of the last step's L2-resident words).
#                       WAIT (PDL, sm_90+): the first PREFETCH steps' code words are loaded before griddepcontrol.wait
#                       (the weights are written by no kernel in the stream), x, the scales and zero points and every
#                       store after it; the kernel after this one is signalled after the wait.
#                       H100 (results/quant_gpu.md, session 21; 20 launches per CUDA graph, bf16 cuBLAS 42.0 us):
#                       14336 x 4096, M = 1: 14.25-14.31 us (2.94-2.95x, 0.72 of 3.0 TB/s); the words GEMV 16.1.
#                       ncu (isolated launch, probe config): DRAM 58% (words 49%), 25 warps per SM, 68% of stalls on
#                       global-load scoreboards; 896 programs in one wave -- configs that need more registers or
#                       shared memory (deeper prefetch, 8 warps, a cp.async ring) lose the single wave and 15-35%.
#                       At 4096^2 the best config took 6.0 us (8 warps, 2 adjacent groups per warp; the default 7.8)
#                       against the words GEMV's 5.5-5.7: the words GEMV stays the default there (quant_configs).
#
# Bytes model: as the words GEMV (runtime/quant_linear.py bytes_model): 4096 x 14336, w4a16 g128, M = 1: 30.8 MB ->
# 10.3 us at 3.0 TB/s.
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# (bf16 pair base 0x4300 = 128.0, one 0x3F80; fp16 base 0x6400 = 1024.0, one 0x3C00)
_MMA_BF16 = gl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
_MMA_F16 = gl.constexpr("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")


def _group_asm(mma: str, base: int, one: int, fma: str) -> str:
    """PTX of one instance (a scale group of 128 elements of rows g and g + 8 per thread: 4 words each, 8 mma):
    code words $4..$7 (row g) / $8..$11 (row g + 8), x pairs 01 / 23 / 45 / 67 of those words in $12..$15 /
    $16..$19 / $20..$23 / $24..$27, -(base + z) pairs $28 (row g) / $32 (row g + 8) -> D in $0..$3."""
    lut = f"{base * 0x10001:#010x}"
    onep = f"{one * 0x10001:#010x}"
    lines = ["{", ".reg .b32 a0, a1, a2, a3, b0, b1, l1, h1, l2, h2, l3, h3, one;", ".reg .f32 zf;",
             "mov.f32 zf, 0f00000000;", f"mov.b32 one, {onep};"]

    def decode(a, src, nz):
        return [f"lop3.b32 {a}, {src}, 0x000f000f, {lut}, 0xea;", f"{fma} {a}, {a}, one, {nz};"]

    for i in range(4):
        wl, wh, x01, x23, x45, x67 = (f"${4 + i}", f"${8 + i}", f"${12 + i}", f"${16 + i}", f"${20 + i}", f"${24 + i}")
        lines += [f"shr.u32 l1, {wl}, 4;", f"shr.u32 h1, {wh}, 4;", f"shr.u32 l2, {wl}, 8;", f"shr.u32 h2, {wh}, 8;",
                  f"shr.u32 l3, {wl}, 12;", f"shr.u32 h3, {wh}, 12;"]
        for half, (s0, s1, s2, s3, xa, xb) in enumerate(((wl, wh, "l1", "h1", x01, x45), ("l2", "h2", "l3", "h3", x23, x67))):
            lines += decode("a0", s0, "$28") + decode("a1", s1, "$32") + decode("a2", s2, "$28") + decode("a3", s3, "$32")
            lines += [f"prmt.b32 b0, {xa}, {xb}, 0x5410;", f"prmt.b32 b1, {xa}, {xb}, 0x7632;"]
            acc = "{zf, zf, zf, zf}" if i == 0 and half == 0 else "{$0, $1, $2, $3}"
            lines.append(f"{mma} {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}}, {{b0, b1}}, {acc};")
    return "\n".join(lines + ["}"])


_CONSTRAINTS = gl.constexpr("=f,=f,=f,=f," + ",".join(["r"] * 32))  # D (4 slots); 8 int32 inputs x pack 4
_ASM_BF16 = gl.constexpr(_group_asm(_MMA_BF16.value, 0x4300, 0x3F80, "fma.rn.bf16x2"))
_ASM_F16 = gl.constexpr(_group_asm(_MMA_F16.value, 0x6400, 0x3C00, "fma.rn.f16x2"))


@gluon.jit
def _add(a, b):
    # (gl.sum's combine function is a triton.jit one, which the offline compile cannot take under TRITON_INTERPRET=1)
    return a + b


@gluon.jit
def _grid_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _code_words(codes, rows, grp, tt, ii, N, NB, s_cn, EVEN: gl.constexpr):
    # int32 code words [Q, 8, 4, 4] of rows ``rows`` ([1, 8, 1, 1]) for groups ``grp`` ([Q, 1, 1, 1]): words
    # 4t .. 4t + 3 of each group's 16; zero past N and past the last group (they decode to base + 0 against a zero
    # point of 0: a zero product)
    offs = rows * s_cn + grp * 16 + tt * 4 + ii
    if EVEN:  # every row and group exists: no masks (a masked load also zeroes its registers first)
        return gl.load(codes + offs)
    return gl.load(codes + offs, mask=(rows < N) & (grp < NB), other=0)


@gluon.jit
def _step_aux(xrow, zeros, scales, step, q5, x_pair, qz, rows_z, N, NB, KX, s_zn, s_sn, Q: gl.constexpr,
              EVEN: gl.constexpr):
    # step ``step``'s x pairs [Q, 1, 4, 4, 4] and its zero points / bf16 scales of rows g and g + 8 ([Q, 8, 4]), as
    # loaded (converted where used, so the loads stay in flight across the step before)
    xoff = (step * Q + q5) * 64 + x_pair
    grpz = step * Q + qz
    if EVEN:
        xp = gl.load(xrow + xoff)
        zl = gl.load(zeros + rows_z * s_zn + grpz)
        zh = gl.load(zeros + (rows_z + 8) * s_zn + grpz)
        s_lo = gl.load(scales + rows_z * s_sn + grpz)
        s_hi = gl.load(scales + (rows_z + 8) * s_sn + grpz)
    else:
        xp = gl.load(xrow + xoff, mask=xoff < KX, other=0)
        okl = (rows_z < N) & (grpz < NB)
        okh = (rows_z + 8 < N) & (grpz < NB)
        zl = gl.load(zeros + rows_z * s_zn + grpz, mask=okl, other=0)
        zh = gl.load(zeros + (rows_z + 8) * s_zn + grpz, mask=okh, other=0)
        s_lo = gl.load(scales + rows_z * s_sn + grpz, mask=okl, other=0.0)
        s_hi = gl.load(scales + (rows_z + 8) * s_sn + grpz, mask=okh, other=0.0)
    return xp, zl, zh, s_lo, s_hi


@gluon.jit
def dequant_gemv_mma(x32, codes, scales, zeros, bias, out, N, NB, KX, s_xm, s_cn, s_sn, s_zn, s_om,
                     QW: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr, EVEN: gl.constexpr,
                     PREFETCH: gl.constexpr, WAIT: gl.constexpr, num_warps: gl.constexpr, AUX: gl.constexpr = True,
                     ADJ: gl.constexpr = False):
    # x32: x [M, K] seen as int32 pairs [M, KX = K / 2] (K % 8 == 0; s_xm a row stride in pairs), read as zero past
    # KX (the groups' padding); codes: int32 words [N, NB * 16] (groups of 128 elements). EVEN: N % 16 == 0,
    # NB % (warps * QW) == 0 and K == 128 * NB (no masks anywhere).
    W: gl.constexpr = num_warps
    Q: gl.constexpr = W * QW  # groups per step
    # instances [Q, 8 (g), 4 (t), 4 (slot)]: slot = word i of the thread's 4 for the code words and x pairs, the
    # accumulator register for D
    L4: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 8, 4, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    # x as loaded: [Q, 1, 4 (t), 4 (i), 4 (pair)], 64 contiguous bytes per thread
    L5: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4, 4], [1, 8, 4, 1, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    pid_n = gl.program_id(0)
    m = gl.program_id(2)
    off_n = pid_n * 16
    q4 = gl.arange(0, Q, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))[:, None, None, None]
    g4 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))[None, :, None, None]
    t4 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))[None, None, :, None]
    i4 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))[None, None, None, :]
    rows_lo = off_n + g4
    rows_hi = rows_lo + 8
    Z3: gl.constexpr = gl.SliceLayout(3, L4)  # [Q, 8, 4 (t)]: per (group, row) values, the same in every t
    qz = gl.arange(0, Q, layout=gl.SliceLayout(1, gl.SliceLayout(2, Z3)))[:, None, None]
    rows_z = off_n + gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, Z3)))[None, :, None]
    q5 = gl.arange(0, Q, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5)))))
    t5 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, L5)))))
    i5 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, L5)))))
    p5 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    q5 = q5[:, None, None, None, None]
    if ADJ:  # a warp's QW groups of a step adjacent (64 * QW contiguous bytes per row), not W apart
        q4 = (q4 % W) * QW + q4 // W
        q5 = (q5 % W) * QW + q5 // W
        qz = (qz % W) * QW + qz // W
    x_pair = (t5[None, None, :, None, None] * 16 + i5[None, None, None, :, None] * 4
              + p5[None, None, None, None, :])  # pair index in a group
    xrow = x32 + m * s_xm
    nsteps = (NB + Q - 1) // Q

    # the first PREFETCH steps' code words: before the wait (WAIT), i.e. while the kernel ahead still runs (steps
    # past the last are clamped to it: an unmasked read past the codes' end could fault; the repeat is an L2 hit and
    # its words are never used)
    wl0 = _code_words(codes, rows_lo, q4, t4, i4, N, NB, s_cn, EVEN)
    wh0 = _code_words(codes, rows_hi, q4, t4, i4, N, NB, s_cn, EVEN)
    if PREFETCH >= 2:
        wl1 = _code_words(codes, rows_lo, gl.minimum(1, nsteps - 1) * Q + q4, t4, i4, N, NB, s_cn, EVEN)
        wh1 = _code_words(codes, rows_hi, gl.minimum(1, nsteps - 1) * Q + q4, t4, i4, N, NB, s_cn, EVEN)
    if PREFETCH >= 3:
        wl2 = _code_words(codes, rows_lo, gl.minimum(2, nsteps - 1) * Q + q4, t4, i4, N, NB, s_cn, EVEN)
        wh2 = _code_words(codes, rows_hi, gl.minimum(2, nsteps - 1) * Q + q4, t4, i4, N, NB, s_cn, EVEN)
    if PREFETCH >= 4:
        wl3 = _code_words(codes, rows_lo, gl.minimum(3, nsteps - 1) * Q + q4, t4, i4, N, NB, s_cn, EVEN)
        wh3 = _code_words(codes, rows_hi, gl.minimum(3, nsteps - 1) * Q + q4, t4, i4, N, NB, s_cn, EVEN)
    if WAIT:
        _grid_wait()
        _launch_dependents()
    if AUX:
        xp_n, zl_n, zh_n, sl_n, sh_n = _step_aux(xrow, zeros, scales, 0, q5, x_pair, qz, rows_z, N, NB, KX, s_zn, s_sn,
                                                 Q, EVEN)
    acc_lo = gl.zeros([Q, 8, 4], gl.float32, Z3)
    acc_hi = gl.zeros([Q, 8, 4], gl.float32, Z3)
    # unrolled by PREFETCH so that each step refills its own register slot (a rotating ring costs moves); steps past
    # the last (nsteps not a multiple of PREFETCH) run on clamped loads with a zero scale
    for s0 in range(0, nsteps, PREFETCH):
        for j in gl.static_range(PREFETCH):
            s = s0 + j
            # the code words of step s + PREFETCH first (Gluon does not pipeline plain loads)
            sn = gl.minimum(s + PREFETCH, nsteps - 1) * Q + q4
            if j == 0:
                wl, wh = wl0, wh0
                wl0 = _code_words(codes, rows_lo, sn, t4, i4, N, NB, s_cn, EVEN)
                wh0 = _code_words(codes, rows_hi, sn, t4, i4, N, NB, s_cn, EVEN)
            elif j == 1:
                wl, wh = wl1, wh1
                wl1 = _code_words(codes, rows_lo, sn, t4, i4, N, NB, s_cn, EVEN)
                wh1 = _code_words(codes, rows_hi, sn, t4, i4, N, NB, s_cn, EVEN)
            elif j == 2:
                wl, wh = wl2, wh2
                wl2 = _code_words(codes, rows_lo, sn, t4, i4, N, NB, s_cn, EVEN)
                wh2 = _code_words(codes, rows_hi, sn, t4, i4, N, NB, s_cn, EVEN)
            else:
                wl, wh = wl3, wh3
                wl3 = _code_words(codes, rows_lo, sn, t4, i4, N, NB, s_cn, EVEN)
                wh3 = _code_words(codes, rows_hi, sn, t4, i4, N, NB, s_cn, EVEN)
            # x, zero points and scales: with AUX this step's from the registers and the next step's loads issued
            # now (their L2 latency off the step's path)
            if AUX:
                xp, zl, zh, s_lo, s_hi = xp_n, zl_n, zh_n, sl_n, sh_n
                xp_n, zl_n, zh_n, sl_n, sh_n = _step_aux(xrow, zeros, scales, gl.minimum(s + 1, nsteps - 1), q5,
                                                         x_pair, qz, rows_z, N, NB, KX, s_zn, s_sn, Q, EVEN)
            else:
                xp, zl, zh, s_lo, s_hi = _step_aux(xrow, zeros, scales, gl.minimum(s, nsteps - 1), q5, x_pair, qz,
                                                   rows_z, N, NB, KX, s_zn, s_sn, Q, EVEN)
            live = (s < nsteps).to(gl.float32)
            acc_lo, acc_hi = _mma_step(wl, wh, xp, zl, zh, s_lo.to(gl.float32) * live, s_hi.to(gl.float32) * live,
                                       acc_lo, acc_hi, Q, BF16, L4, Z3)
    _store_rows(out, bias, gl.reduce(acc_lo, 0, _add), off_n, m, N, s_om, HAS_BIAS)
    _store_rows(out, bias, gl.reduce(acc_hi, 0, _add), off_n + 8, m, N, s_om, HAS_BIAS)


@gluon.jit
def _mma_step(wl, wh, xp, zl, zh, s_lo, s_hi, acc_lo, acc_hi, Q: gl.constexpr, BF16: gl.constexpr,
              L4: gl.constexpr, Z3: gl.constexpr):
    # one step: Q groups of rows g / g + 8 through the inline mma chain, each group's dot times its scale into acc
    xa, xb = gl.split(gl.reshape(xp, [Q, 1, 4, 4, 2, 2]))  # pairs 0 2 | 1 3
    x01, x45 = gl.split(xa)
    x23, x67 = gl.split(xb)
    x01 = gl.convert_layout(x01, L4, assert_trivial=True)
    x23 = gl.convert_layout(x23, L4, assert_trivial=True)
    x45 = gl.convert_layout(x45, L4, assert_trivial=True)
    x67 = gl.convert_layout(x67, L4, assert_trivial=True)
    if BF16:  # -(base + z) as a bf16 / fp16 pair
        nzl = (zl.to(gl.int32) | 0xC300) * 65537
        nzh = (zh.to(gl.int32) | 0xC300) * 65537
    else:
        nzl = (zl.to(gl.int32) | 0xE400) * 65537
        nzh = (zh.to(gl.int32) | 0xE400) * 65537
    zero4 = gl.zeros([Q, 8, 4, 4], gl.int32, L4)  # (+ 0: a broadcast to the instance shape, folded away)
    args = [wl, wh, x01 + zero4, x23 + zero4, x45 + zero4, x67 + zero4, nzl[:, :, :, None] + zero4,
            nzh[:, :, :, None] + zero4]
    if BF16:
        d = gl.inline_asm_elementwise(_ASM_BF16, _CONSTRAINTS, args, dtype=gl.float32, is_pure=True, pack=4)
    else:
        d = gl.inline_asm_elementwise(_ASM_F16, _CONSTRAINTS, args, dtype=gl.float32, is_pure=True, pack=4)
    # D's slots: c0 = c1 row g, c2 = c3 row g + 8
    d_even, _ = gl.split(gl.reshape(d, [Q, 8, 4, 2, 2]))
    d_lo, d_hi = gl.split(d_even)
    acc_lo += gl.convert_layout(d_lo, Z3, assert_trivial=True) * s_lo
    acc_hi += gl.convert_layout(d_hi, Z3, assert_trivial=True) * s_hi
    return acc_lo, acc_hi


@gluon.jit
def _store_rows(out, bias, y, row0, m, N, s_om, HAS_BIAS: gl.constexpr):
    # y [8, 4 (t)]: row row0 + g, the same in every t; stored from the t = 0 lanes
    gy = gl.arange(0, 8, layout=gl.SliceLayout(1, y.type.layout))[:, None]
    ty = gl.arange(0, 4, layout=gl.SliceLayout(0, y.type.layout))[None, :]
    rows = row0 + gy + 0 * ty
    ok = (rows < N) & (ty == 0)
    if HAS_BIAS:
        y = y + gl.load(bias + rows, mask=ok, other=0.0).to(gl.float32)
    gl.store(out + m * s_om + rows, y.to(out.dtype.element_ty), mask=ok)
