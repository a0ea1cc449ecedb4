# fxforge dequant-GEMV template in Gluon, Hopper (sm_90): y = x @ dequant(W)^T (+ bias) for one row of bf16 x per
# program (decode, M <= 4) and a 4-bit group-scaled weight (w4a16: uint4 codes, a zero point and a bf16 scale per
# group; passes/quant/formats.py) whose codes are read as int32 words through TMA. Launched by
# runtime/quant_gemv_gluon.py.
#
# Why: in a decode step every GEMV follows a kernel that writes its x, and its weight depends on nothing. Launched
# with programmatic dependent launch (WAIT), a program issues the TMA loads of its first STAGES code boxes -- with
# STAGES >= the steps of its K range, its *whole* slice of the weight -- into shared memory before
# griddepcontrol.wait, i.e. while the kernel before it still runs, and only reads x and writes y after the wait. The
# Triton words GEMV (dequant_gemv_words.py) holds its prefetch in registers (one step: 254 registers at 16 rows x
# 1024 B), so its first step is all it can fetch early, and two of its programs fill an SM's registers: the next
# kernel's programs cannot become resident before they exit. Here the codes wait in shared memory and a program
# needs few registers, so the next GEMV's programs sit beside this one's, fetching.
#
# Kernel
#   dequant_gemv_gluon  Grid (N / BN row tiles, K splits, M). Codes viewed as int32 words [N, NB, GW] (GW = group /
#                       8 words per scale group: word w of a group holds elements 8 w .. 8 w + 7, element i in
#                       bits 4 i .. 4 i + 3, the formats.py byte layout read little-endian), TMA boxes [BN, BG, GW]
#                       (BG groups a step). Registers: layout L3 over [BN, BG, GW], each thread 4 consecutive
#                       words of one group in BN / num_warps rows (warps over rows, lanes over groups and words),
#                       x of a step [BG, GW, 8] in the slice of L3 extended by the element axis, so a thread
#                       converts its 32 x elements once for all its rows. Per step:
#                       - the exact mask decode of the words GEMV: plane J of a word (bits 4 J .. 4 J + 3, J <= 4;
#                         elements 5..7 at planes 2..4 after one shift by 12) OR-ed with the exponent of 2^(23 - 4 J)
#                         is the float 2^(23 - 4 J) + u (one LOP3), minus 2^(23 - 4 J) + z it is u - z (FADD),
#                         times x as loaded (FFMA): exact products;
#                       - the group scale multiplies each word's partial dot once (POST);
#                       - x, the scales and the zero points of the next step are loaded one step ahead;
#                       - a thread barrier, then the TMA of step i + STAGES into the freed stage.
#                       Epilogue: row sums, bf16 y (+ bias) or fp32 partials [SPLITS, M, N] for dequant_splitk_reduce.
#
# Bytes model: N * K / 2 (codes) + 3 * N * K / group (bf16 scale + uint8 zero point) + 2 * M * K (x) + 2 * M * N (y);
# 4096 x 4096, M = 1, group 128: 8.80 MB, 2.93 us at 3.0 TB/s (runtime/quant_linear.py bytes_model, w4a16_g128).
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

# the TMA load's name: async_load from triton 3.7 on, async_copy_global_to_shared before (triton 3.6)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _grid_wait():
    # griddepcontrol.wait: block until the kernel before this one has completed and its writes are visible
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _launch_dependents():
    # griddepcontrol.launch_dependents: the next kernel, if launched with PDL, may be scheduled now
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _plane(w, mask, EXP: gl.constexpr, zf):
    # plane under mask OR-ed with EXP (the exponent of 2^(23 - 4 J)): the float 2^(23 - 4 J) + u; minus zf = that
    # power plus the zero point: u - z exactly
    return ((w & mask) | EXP).to(gl.float32, bitcast=True) - zf


@gluon.jit
def _x_step(xr, g0, K, XL: gl.constexpr, BG: gl.constexpr, GW: gl.constexpr):
    # x of the groups g0 .. g0 + BG as fp32 planes x0..x7 [BG, GW] (plane i: elements 8 w + i of every word w)
    g = gl.arange(0, BG, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    w = gl.arange(0, GW, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    e = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    k = ((g0 + g[:, None, None]) * GW + w[None, :, None]) * 8 + e[None, None, :]
    xv = gl.load(xr + k, mask=k < K, other=0.0).to(gl.float32)
    xe, xo = gl.split(gl.reshape(xv, [BG, GW, 4, 2]))  # elements 0 2 4 6 | 1 3 5 7
    xee, xeo = gl.split(gl.reshape(xe, [BG, GW, 2, 2]))  # 0 4 | 2 6
    xoe, xoo = gl.split(gl.reshape(xo, [BG, GW, 2, 2]))  # 1 5 | 3 7
    x0, x4 = gl.split(xee)
    x2, x6 = gl.split(xeo)
    x1, x5 = gl.split(xoe)
    x3, x7 = gl.split(xoo)
    return x0, x1, x2, x3, x4, x5, x6, x7


@gluon.jit
def _group_step(ptr, rows, n_ok, g0, NB, stride, SL: gl.constexpr, BG: gl.constexpr):
    # one value per (row, group g0 + j) of a step: [BN, BG], as stored
    g = g0 + gl.arange(0, BG, layout=gl.SliceLayout(0, SL))
    return gl.load(ptr + rows[:, None] * stride + g[None, :], mask=n_ok[:, None] & (g < NB)[None, :], other=0)


@gluon.jit
def dequant_gemv_gluon(w_desc, x, scales, zeros, bias, out, partials, M, N, K, NB, groups_per_split, s_xm, s_sn,
                       s_zn, s_om, mask0, STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr,
                       WAIT: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BG: gl.constexpr = w_desc.block_type.shape[1]
    GW: gl.constexpr = w_desc.block_type.shape[2]
    gl.static_assert(BN % num_warps == 0)
    gl.static_assert(GW % 4 == 0)
    TW: gl.constexpr = GW // 4  # lanes over a group's words (4 words each)
    TG: gl.constexpr = 32 // TW  # lanes over groups
    gl.static_assert(BG % TG == 0)
    RPT: gl.constexpr = BN // num_warps
    L4: gl.constexpr = gl.BlockedLayout([RPT, 1, 4, 8], [1, TG, TW, 1], [num_warps, 1, 1, 1], [3, 2, 1, 0])
    L3: gl.constexpr = gl.SliceLayout(3, L4)  # the words [BN, BG, GW]
    XL: gl.constexpr = gl.SliceLayout(0, L4)  # x of a step [BG, GW, 8], replicated over the warps' rows
    PL: gl.constexpr = gl.SliceLayout(0, L3)  # one plane of x [BG, GW]
    SL: gl.constexpr = gl.SliceLayout(2, L3)  # per (row, group) [BN, BG]

    if SPLIT and not WAIT:  # the split-K reduce may be scheduled now (it waits for this grid)
        if PDL:
            _launch_dependents()
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m = gl.program_id(2)
    off_n = pid_n * BN
    gs0 = pid_k * groups_per_split
    nsteps = gl.cdiv(gl.minimum(groups_per_split, NB - gs0), BG)

    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BG, GW], w_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(bar.index(st), count=1)
    for st in gl.static_range(STAGES):  # the codes of the first STAGES steps: no kernel writes them
        ok = st < nsteps
        mbarrier.expect(bar.index(st), w_desc.block_type.nbytes, pred=ok)
        _tma_load(w_desc, [off_n, gs0 + st * BG, 0], bar.index(st), w_s.index(st), pred=ok)
    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, SL))
    n_ok = rows < N
    # the first step's scales and zero points (weights as well)
    sn = _group_step(scales, rows, n_ok, gs0, NB, s_sn, SL, BG)
    zn = _group_step(zeros, rows, n_ok, gs0, NB, s_zn, SL, BG)
    if WAIT:
        _grid_wait()  # x may still be being written by the kernel before this one
        _launch_dependents()
    xr = x + m * s_xm
    xn0, xn1, xn2, xn3, xn4, xn5, xn6, xn7 = _x_step(xr, gs0, K, XL, BG, GW)
    acc = gl.zeros([BN, BG, GW], gl.float32, L3)
    for i in range(nsteps):
        x0 = gl.convert_layout(xn0, PL, assert_trivial=True)[None, :, :]
        x1 = gl.convert_layout(xn1, PL, assert_trivial=True)[None, :, :]
        x2 = gl.convert_layout(xn2, PL, assert_trivial=True)[None, :, :]
        x3 = gl.convert_layout(xn3, PL, assert_trivial=True)[None, :, :]
        x4 = gl.convert_layout(xn4, PL, assert_trivial=True)[None, :, :]
        x5 = gl.convert_layout(xn5, PL, assert_trivial=True)[None, :, :]
        x6 = gl.convert_layout(xn6, PL, assert_trivial=True)[None, :, :]
        x7 = gl.convert_layout(xn7, PL, assert_trivial=True)[None, :, :]
        s3 = sn.to(gl.float32)[:, :, None]
        # zf_J = 2^(23 - 4 J) + z, exact in fp32 (z < 16)
        zf = ((zn.to(gl.int32) | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0)[:, :, None]
        g1 = gs0 + (i + 1) * BG  # (past the range: masked)
        xn0, xn1, xn2, xn3, xn4, xn5, xn6, xn7 = _x_step(xr, g1, K, XL, BG, GW)
        sn = _group_step(scales, rows, n_ok, g1, NB, s_sn, SL, BG)
        zn = _group_step(zeros, rows, n_ok, g1, NB, s_zn, SL, BG)
        s = i % STAGES
        mbarrier.wait(bar.index(s), (i // STAGES) & 1)
        wd = w_s.index(s).load(L3)
        gl.thread_barrier()  # every warp has its words of stage s: refill it
        nxt = i + STAGES
        ok = nxt < nsteps
        mbarrier.expect(bar.index(s), w_desc.block_type.nbytes, pred=ok)
        _tma_load(w_desc, [off_n, gs0 + nxt * BG, 0], bar.index(s), w_s.index(s), pred=ok)
        zf0 = zf + 8388608.0
        zf1 = zf + 524288.0
        zf2 = zf + 32768.0
        zf3 = zf + 2048.0
        zf4 = zf + 128.0
        wh = wd >> 12
        part = x0 * _plane(wd, mask0, 0x4B000000, zf0)
        part += x1 * _plane(wd, mask0 << 4, 0x49000000, zf1)
        part += x2 * _plane(wd, mask0 << 8, 0x47000000, zf2)
        part += x3 * _plane(wd, mask0 << 12, 0x45000000, zf3)
        part += x4 * _plane(wd, mask0 << 16, 0x43000000, zf4)
        part += x5 * _plane(wh, mask0 << 8, 0x47000000, zf2)
        part += x6 * _plane(wh, mask0 << 12, 0x45000000, zf3)
        part += x7 * _plane(wh, mask0 << 16, 0x43000000, zf4)
        acc += part * s3
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(bar.index(st))

    y = gl.sum(gl.sum(acc, axis=2), axis=1)
    yrows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, SL))
    if SPLIT:
        gl.store(partials + (pid_k * M + m) * N + yrows, y, mask=yrows < N)
    else:
        if HAS_BIAS:
            y = y + gl.load(bias + yrows, mask=yrows < N, other=0.0).to(gl.float32)
        gl.store(out + m * s_om + yrows, y.to(out.dtype.element_ty), mask=yrows < N)
