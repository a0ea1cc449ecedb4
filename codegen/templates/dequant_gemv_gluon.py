# fxforge dequant-GEMV template in Gluon, Hopper (sm_90): y = x @ dequant(W)^T (+ bias) for one row of bf16 x per
# program (decode, M <= 4) and an int8 per-row-scaled weight (w8a16, passes/quant/formats.py) whose codes are read
# as int32 words [N, K / 4] through TMA. Launched by runtime/quant_gemv_gluon.py.
#
# Why Gluon: the weight does not depend on the kernel before this one, x does. Launched with programmatic dependent
# launch (PDL) and PREFETCH set, a program issues the TMA loads of its first STAGES code boxes *before*
# griddepcontrol.wait, i.e. while the previous kernel of the decode step (the norm, the previous GEMV) still runs,
# and reads x and writes y only after the wait. Triton's loop pipeliner issues a step's code and x loads together,
# so the Triton TMA GEMV (dequant_gemv_tma.py) cannot split them around the wait; here the schedule is explicit.
# It also signals griddepcontrol.launch_dependents right after the wait, so the next PDL kernel starts its own
# prefetch while this one computes.
#
# Kernel
#   dequant_gemv_gluon  Grid (N / BN row tiles, K splits, M). Each program walks its K range in steps of one TMA box
#                       [BN rows, BW words]; STAGES boxes in flight (one mbarrier each). Per step:
#                       - the box is read from shared memory into registers, [BN, BW] words in layout L (each thread
#                         BW / 32 consecutive words of BN / num_warps rows; the warps take the rows);
#                       - x of the step, [BW, 4] bf16 (each thread 4 x BW / 32 consecutive elements: two 16-byte
#                         loads, broadcast over the warps' rows), loaded one step ahead into registers;
#                       - the exact mask decode of the words GEMV (dequant_gemv_tma.py DEC 0): the word XOR
#                         0x80808080 makes byte j offset-binary u = c + 128; (byte plane | the exponent of
#                         2^(23 - 8 (j % 2))) - (2^(23 - 8 (j % 2)) + 128) is the code c (LOP3 + FADD), times x
#                         (FFMA): exact products;
#                       - a thread barrier, then the TMA of step i + STAGES into the freed stage.
#                       Epilogue: row sums, the per-row scale (+ bias), bf16 y or fp32 partials [SPLITS, M, N] for
#                       dequant_splitk_reduce.
#
# Bytes model: N * K (codes) + 2 * N (bf16 scales) + 2 * M * K (x) + 2 * M * N (y); 4096 x 4096, M = 1: 16.80 MB,
# 5.60 us at 3.0 TB/s (runtime/quant_linear.py bytes_model, format w8a16).
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
def _plane(w, mask, EXP: gl.constexpr, C0: gl.constexpr):
    # byte plane under mask OR-ed with EXP (the exponent of 2^(23 - 8 (j % 2))), minus that power plus 128: the code
    return ((w & mask) | EXP).to(gl.float32, bitcast=True) - C0


@gluon.jit
def _x_step(x, k4, K, XL3: gl.constexpr, BW: gl.constexpr):
    # x [4 k4 .. 4 k4 + 4 BW) as fp32 planes (x0, x1, x2, x3): plane j holds the elements 4 w + j
    w = gl.arange(0, BW, layout=gl.SliceLayout(1, XL3))
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, XL3))
    offs = (k4 + w[:, None]) * 4 + j[None, :]
    xv = gl.load(x + offs, mask=offs < K, other=0.0).to(gl.float32)
    xe, xo = gl.split(gl.reshape(xv, [BW, 2, 2]))  # elements 0 2 | 1 3 of each word
    x0, x2 = gl.split(xe)
    x1, x3 = gl.split(xo)
    return x0, x1, x2, x3


@gluon.jit
def dequant_gemv_gluon(w_desc, x, scales, bias, out, partials, M, N, K, KW, words_per_split, s_xm, s_om, mask0,
                       STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, PREFETCH: gl.constexpr,
                       num_warps: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BW: gl.constexpr = w_desc.block_type.shape[1]
    gl.static_assert(BW % 32 == 0)
    gl.static_assert(BN % num_warps == 0)
    SPT: gl.constexpr = BW // 32
    L3: gl.constexpr = gl.BlockedLayout([BN // num_warps, SPT, 4], [1, 32, 1], [num_warps, 1, 1], [2, 1, 0])
    L: gl.constexpr = gl.SliceLayout(2, L3)  # the words [BN, BW]
    XL3: gl.constexpr = gl.SliceLayout(0, L3)  # x of a step [BW, 4], replicated over the warps
    XL: gl.constexpr = gl.SliceLayout(0, L)  # one plane of x [BW]

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m = gl.program_id(2)
    off_n = pid_n * BN
    kw0 = pid_k * words_per_split
    nsteps = gl.cdiv(gl.minimum(words_per_split, KW - kw0), BW)

    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BW], w_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(bar.index(st), count=1)
    for st in gl.static_range(STAGES):  # the codes of the first STAGES steps: nothing writes them
        ok = st < nsteps
        mbarrier.expect(bar.index(st), w_desc.block_type.nbytes, pred=ok)
        _tma_load(w_desc, [off_n, kw0 + st * BW], bar.index(st), w_s.index(st), pred=ok)
    if PREFETCH:
        _grid_wait()  # x may still be being written by the kernel before this one
        _launch_dependents()
    xr = x + m * s_xm
    xn0, xn1, xn2, xn3 = _x_step(xr, kw0, K, XL3, BW)
    acc = gl.zeros([BN, BW], gl.float32, L)
    for i in range(nsteps):
        x0 = gl.convert_layout(xn0, XL, assert_trivial=True)
        x1 = gl.convert_layout(xn1, XL, assert_trivial=True)
        x2 = gl.convert_layout(xn2, XL, assert_trivial=True)
        x3 = gl.convert_layout(xn3, XL, assert_trivial=True)
        xn0, xn1, xn2, xn3 = _x_step(xr, kw0 + (i + 1) * BW, K, XL3, BW)  # (past the range: masked or unused)
        s = i % STAGES
        mbarrier.wait(bar.index(s), (i // STAGES) & 1)
        wd = w_s.index(s).load(L)
        gl.thread_barrier()  # every warp has its words of stage s: refill it
        nxt = i + STAGES
        ok = nxt < nsteps
        mbarrier.expect(bar.index(s), w_desc.block_type.nbytes, pred=ok)
        _tma_load(w_desc, [off_n, kw0 + nxt * BW], bar.index(s), w_s.index(s), pred=ok)
        wd = wd ^ -2139062144  # 0x80808080: signed bytes -> offset binary c + 128
        wh = wd >> 16
        acc += x0[None, :] * _plane(wd, mask0, 0x4B000000, 8388736.0)
        acc += x1[None, :] * _plane(wd, mask0 << 8, 0x47000000, 32896.0)
        acc += x2[None, :] * _plane(wh, mask0, 0x4B000000, 8388736.0)
        acc += x3[None, :] * _plane(wh, mask0 << 8, 0x47000000, 32896.0)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(bar.index(st))

    rows = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, L))
    n_ok = rows < N
    y = gl.sum(acc, axis=1) * gl.load(scales + rows, mask=n_ok, other=0.0).to(gl.float32)
    if SPLIT:
        gl.store(partials + (pid_k * M + m) * N + rows, y, mask=n_ok)
    else:
        if HAS_BIAS:
            y = y + gl.load(bias + rows, mask=n_ok, other=0.0).to(gl.float32)
        gl.store(out + m * s_om + rows, y.to(out.dtype.element_ty), mask=n_ok)
