"""A Hopper-tuned twin of the generated matmul kernel: TMA tensor descriptors for A and B, a
persistent tile loop over #SM programs, and the SAME fused epilogue text as codegen/emit_matmul.py.

Emitted next to the regular kernel in the same source (``<name>_tma``), so artifacts carry it and
autotuning (runtime/autotune.py) can time it against cuBLAS + an epilogue launch.

Bytes/FLOPs model: 2·M·N·K FLOPs; bytes ≈ (M·K + K·N)·elt (A/B, re-read from L2 per tile row/col:
GROUP_M row-blocks share each B tile) + epilogue inputs + outputs, each once. For ViT fc1
(12608×3072×768 fp16): 59.5 GFLOP → 79 µs at 750 TFLOP/s; its 77 MB output at 3.0 TB/s is 26 µs,
which is why fusing bias+GELU here (one write instead of write + read + write + read) is the win.

Why each piece:
- TMA loads (host-side ``triton.tools.tensor_descriptor.TensorDescriptor``): hardware address
  generation and zero-fill of out-of-bounds rows/cols/K, so the K loop has no masks and the
  pipeliner can issue async bulk copies. Host descriptors are encoded by the launcher into kernel
  parameters (a CPU call, no device allocation), so CUDA-graph capture records them by value.
- persistent loop (``tl.range(..., flatten=FLATTEN)``): #SM programs walk the tiles; flattening lets
  the next tile's loads overlap this tile's epilogue. A separate epilogue tile counter keeps the
  flattened loop's prologue and epilogue independent (as in Triton's persistent tutorial).
- the epilogue runs on the fp32 accumulator, on the whole tile or (EPI_SPLIT = 2 or 4) on its column
  slices in turn (register-only splits of the wgmma accumulator), so its temporaries need 1/2 or 1/4
  of the registers: compiled for sm_90, 128x256 w8 + bias+GELU went from 255 registers and 232 B of
  spills to 239 and none in halves.
- output store (OUT_TMA): the first output goes registers -> shared memory -> TMA store through a
  host descriptor (``c_desc``, block [BLOCK_M, EPI_N]) when it is a row-major M x N matrix with
  16-byte aligned base and rows (runtime/autotune.tma_store_refusal; otherwise, and for further
  outputs, plain masked stores with any strides). No per-element 64-bit address and mask math, the
  TMA unit clips at M and N, and the bulk copy drains while the next slice / tile is computed.
  Measured offline (sm_90 cubin, triton 3.9): fc1's 128x128 w8 bias+GELU 181 -> 121 registers.
  With it, full-tile epilogue operands (a residual, SiLU*up's up; ``t<j>_desc``, bit j of IN_TMA)
  that are row-major M x N matrices are TMA-loaded too: a residual epilogue at 128x128x64 w8 s3 in 4
  slices went from 2864 SASS instructions and 120 KB of shared memory to 2240 and 112 KB.
- CTAs per SM: the grid is min(#tiles, NUM_SMS) programs with NUM_SMS = #SM x ctas_per_sm (a config
  field). Two co-resident CTAs let one CTA's epilogue (erf-GELU: ~36 SASS instructions per element,
  ALU-bound) run while the other's wgmmas keep the tensor cores busy; a config only fits twice with
  <= 65536 / (2 x threads) registers and <= ~113 KB of shared memory (128x128x64 w8 s3 in 4 slices
  with the TMA store: 107 registers, 104 KB for bias+GELU).
- Triton's automatic warp specialization (``tl.range(..., warp_specialize=True)``) does not partition
  this kernel for sm_90: compiled with triton 3.9, neither the persistent tile loop nor the K loop
  got a ``ttg.warp_specialize`` region, so the overlap comes from the two CTAs instead.

Requirements (checked at run time by runtime/autotune.tma_refusal, which records why a matmul is
not offered this variant): 2-D mm/addmm, A and B each with one unit stride (row- or column-major),
the other stride ·elt a multiple of 16 bytes, 16-byte aligned base pointers.
"""
from __future__ import annotations

TMA_CONSTEXPRS = ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "NUM_SMS", "A_T", "B_T", "FLATTEN", "EPI_SPLIT", "EPI_N",
                  "OUT_TMA", "IN_TMA", "INTERPRETED"]


def _indent(text: str, levels: int) -> str:
    pad = "    " * levels
    return "\n".join(pad + line if line.strip() else line for line in text.splitlines())


def emit_tma_function(name: str, params: list[str], index_text: str, body_text: str, fp32: bool,
                      first_store: tuple[str, str] | None = None, tile_loads: list[tuple[str, str]] = ()) -> str:
    """Source of ``@triton.jit def <name>_tma(a_desc, b_desc, c_desc, *params, <TMA_CONSTEXPRS>)``.

    ``params``: the regular kernel's runtime parameters (pointers, M, N, K, row sizes, strides) in
    the same order, so one argument list launches either kernel; the A/B pointers go unused here.
    ``index_text``/``body_text``: the epilogue lines of the regular kernel (indent 1), which read
    ``acc``, ``row``, ``col`` and ``tile_mask``. ``first_store``: (the body's store line of the first
    output, the value it stores); with OUT_TMA that store goes through ``c_desc`` (a [BLOCK_M, EPI_N]
    block descriptor over the output as a row-major M x N matrix) instead. ``tile_loads``: (the body's
    load line of a full-tile operand, the same load through ``t<j>_desc``); bit j of IN_TMA picks the
    descriptor load (the host passes a descriptor where the operand is a row-major M x N matrix).
    """
    prec = ', input_precision="ieee"' if fp32 else ""
    sig = ", ".join(["a_desc", "b_desc", "c_desc"] + [f"t{j}_desc" for j in range(len(tile_loads))] + params + [f"{c}: tl.constexpr" for c in TMA_CONSTEXPRS])
    lines = [
        f"def {name}_tma({sig}):",
        "    start = tl.program_id(0)",
        "    num_pid_m = tl.cdiv(M, BLOCK_M)",
        "    num_pid_n = tl.cdiv(N, BLOCK_N)",
        "    num_tiles = num_pid_m * num_pid_n",
        "    k_tiles = tl.cdiv(K, BLOCK_K)",
        "    group_tiles = GROUP_M * num_pid_n",
        "    tile_e = start - NUM_SMS  # the epilogue's own tile counter (independent of the loads')",
        "    # NUM_SMS: the number of persistent programs (#SM x CTAs per SM)",
        "    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):",
        "        # grouped ordering: GROUP_M row-blocks in flight share each B tile in L2",
        "        first_m = (tile // group_tiles) * GROUP_M",
        "        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)",
        "        off_m = (first_m + tile % group_m) * BLOCK_M",
        "        off_n = ((tile % group_tiles) // group_m) * BLOCK_N",
        "        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "        for kb in range(k_tiles):",
        "            off_k = kb * BLOCK_K",
        "            # TMA zero-fills past M, N and K: no masks, and the K tail adds zeros",
        "            if A_T:",
        "                a = a_desc.load([off_k, off_m]).T",
        "            else:",
        "                a = a_desc.load([off_m, off_k])",
        "            if B_T:",
        "                b = b_desc.load([off_n, off_k]).T",
        "            else:",
        "                b = b_desc.load([off_k, off_n])",
        "            if INTERPRETED:  # the CPU interpreter's low-precision dot is unreliable; upcast there",
        "                a = a.to(tl.float32)",
        "                b = b.to(tl.float32)",
        f"            acc = tl.dot(a, b, acc{prec})",
        "        tile_e += NUM_SMS",
        "        first_e = (tile_e // group_tiles) * GROUP_M",
        "        group_e = tl.minimum(num_pid_m - first_e, GROUP_M)",
        "        m0 = (first_e + tile_e % group_e) * BLOCK_M",
        "        rm = m0 + tl.arange(0, BLOCK_M)",
        "        n0 = ((tile_e % group_tiles) // group_e) * BLOCK_N",
        "        row = rm[:, None]",
        "        # epilogue on the fp32 tile (the same lines as the non-TMA kernel), on the whole tile or on",
        "        # EPI_SPLIT = 2 or 4 column slices in turn: the epilogue's temporaries (a residual tile,",
        "        # GELU's intermediates) then need 1/2 or 1/4 of the registers (a 128x256 tile with 8 warps",
        "        # does not spill), and with OUT_TMA each slice's TMA store drains while the next is computed",
    ]
    body = body_text
    if first_store is not None:
        line, value = first_store
        tma_store = "\n".join([
            "    if OUT_TMA:  # registers -> shared memory -> async bulk copy (clipped at M and N by the TMA unit)",
            f"        c_desc.store([m0, cn], tl.broadcast_to({value}, (BLOCK_M, EPI_N)))",
            "    else:",
            f"        {line}"])
        assert ("    " + line) in body, "the first output's store line must be in the epilogue body"
        body = body.replace("    " + line, tma_store, 1)
    for j, (plain, tma) in enumerate(tile_loads):
        assert ("    " + plain) in body, "a full-tile load line must be in the epilogue body"
        body = body.replace("    " + plain, "\n".join([
            f"    if (IN_TMA >> {j}) & 1:  # TMA load (zero-filled past M and N) instead of per-element addresses",
            f"        {tma}",
            "    else:",
            f"        {plain}"]), 1)
    # the epilogue's full-tile shapes become [BLOCK_M, EPI_N] (EPI_N = BLOCK_N // EPI_SPLIT)
    epi = _indent(index_text + "\n" + body.replace("[BLOCK_M, BLOCK_N]", "[BLOCK_M, EPI_N]"), 2)

    def piece(acc: str | None, j: int) -> list[str]:
        return ([f"            acc = {acc}"] if acc else []) + [
            f"            cn = n0{f' + {j} * EPI_N' if j else ''}",
            "            rn = cn + tl.arange(0, EPI_N)",
            "            col = rn[None, :]",
            "            tile_mask = (rm[:, None] < M) & (rn[None, :] < N)",
            epi,
        ]

    def split(src: str, width: str, lo: str, hi: str) -> str:
        # register-only: the column halves of a wgmma accumulator are whole per-thread register groups
        return f"            {lo}, {hi} = tl.split(tl.permute(tl.reshape({src}, (BLOCK_M, 2, {width})), (0, 2, 1)))"
    lines += ["        if EPI_SPLIT == 1:"] + piece(None, 0)
    lines += ["        elif EPI_SPLIT == 2:", split("acc", "EPI_N", "acc_0", "acc_1")] + piece("acc_0", 0) + piece("acc_1", 1)
    lines += ["        else:  # EPI_SPLIT == 4",
              "            tl.static_assert(EPI_SPLIT == 4)",
              split("acc", "2 * EPI_N", "acc_lo", "acc_hi"),
              split("acc_lo", "EPI_N", "acc_0", "acc_1"),
              split("acc_hi", "EPI_N", "acc_2", "acc_3")]
    for j in range(4):
        lines += piece(f"acc_{j}", j)
    return "\n".join(lines) + "\n"
