"""Winograd F(m×m, 3×3) convolution on the GPU (or the Triton interpreter): generated Triton
kernels for the input and output transforms around one batched GEMM over the α² tile positions.

    V[ξ, c, p] = (Bᵀ d_{c,p} B)[ξ]      input transform  (Triton; constants unrolled in the source)
    M[ξ]       = U[ξ] @ V[ξ]            U = G g Gᵀ, done once at build time; cuBLAS bmm (tensor cores)
    y[n,k,tile]= Aᵀ M_{k,p} A + bias    output transform (Triton)

Layouts. Both transforms run over 2-D program blocks of (tiles p, channels c) and follow the input's
memory format so that the image side and the V/M side are both coalesced without a layout change:

* NCHW input ("nchw"): tiles are the fastest block axis (adjacent tiles are adjacent along w, so each
  of the α² loads walks a row of x with stride m and L1 serves the overlap), V is [α², C, P] and M is
  [α², K, P] with P contiguous (each warp stores/loads one contiguous run), and the GEMM is
  bmm(U[α², K, C], V) → M. y is written NCHW: per element (stride m along w, merged in L2) or, with
  ``out_rows``, each tile row's m outputs joined (tl.join) into one contiguous row segment.
* channels-last input ("nhwc"): channels are the fastest block axis (loads of x and stores of y are
  contiguous along c/k), V is [α², P, C] and M is [α², P, K], and the GEMM is bmm(V, Uᵀ) → M (cuBLAS
  reads the transposed U view without a copy). y is written channels-last.

Each program keeps α² fp32 values per (tile, channel) element in registers: the input transform is
computed row by row (α loads of patch row i → eᵢ = Bᵀ-row transform), then column sums; the output
transform row by row of M (α loads → m partial sums qᵣ), then y = Aᵀ q. Blocks are small enough
(WinogradConfig) that this does not spill. Image edges, padding and ragged channel/tile counts are
masks; x and y are addressed through their strides, so any layout is correct (the "nchw"/"nhwc"
choice only decides which one is fast).

Bytes model (fp16, N·C·H·W input x, K outputs, P = N·⌈H/m⌉·⌈W/m⌉ tiles, α = m + 2):
read x + write/read V (α²·C·P) + write/read M (α²·K·P) + write y. FLOPs of the GEMM: 2·α²·K·C·P,
(α/m)² / 9 of direct convolution's 2·9·K·C·H·W. Unfused, the V and M round trips dominate: this is
the baseline that a fused (transform-in-GEMM-prologue/epilogue) kernel must beat.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import interpreter_active, load_kernel


def _lin(coeffs, names) -> str:
    """Σ c·name with exact zeros skipped and ±1 written without a multiply."""
    terms = []
    for c, nm in zip(coeffs, names):
        c = float(c)
        if c == 0.0:
            continue
        terms.append(nm if c == 1.0 else f"-{nm}" if c == -1.0 else f"{c!r} * {nm}")
    return " + ".join(terms).replace("+ -", "- ") if terms else "0.0"


def _block_prologue(chan: str, count: str, block: str, m: int, pad: str) -> list[str]:
    """Source lines shared by both transforms: a 2-D block of (tile p, channel), oriented by the
    constexpr CL (channels fastest when True, tiles fastest when False), its bounds mask ``ok``, and
    each tile's image n and top-left corner (h0, w0)."""
    return [
        "    if CL:  # channels-last: channels are the fastest axis; V/M are [α², P, channels]",
        f"        {chan} = tl.program_id(1) * {block} + tl.arange(0, {block})[None, :]",
        "        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]",
        "    else:  # NCHW: tiles (adjacent along w) are the fastest axis; V/M are [α², channels, P]",
        f"        {chan} = tl.program_id(1) * {block} + tl.arange(0, {block})[:, None]",
        "        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]",
        f"    ok = ({chan} < {count}) & (p < P)",
        "    n = p // (NH * NW)",
        f"    h0 = ((p // NW) % NH) * {m}{pad}",
        f"    w0 = (p % NW) * {m}{pad}",
    ]


def input_transform_source(BT: np.ndarray, m: int, name: str) -> str:
    a = BT.shape[0]
    L = [(f"@triton.jit\ndef {name}(x, v, C, H, W, NH, NW, P, pad, sxn, sxc, sxh, sxw, CL: tl.constexpr, "
          "BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):")]
    L += _block_prologue("c", "C", "BLOCK_C", m, " - pad")
    L += ["    if CL:", "        vp = v + p * C + c", "    else:", "        vp = v + c * P + p",
          "    vs = C * P",
          "    xp = x + n * sxn + c * sxc + h0 * sxh + w0 * sxw"]
    L += [f"    q{j} = (w0 >= {-j}) & (w0 < W - {j})" for j in range(a)]
    for i in range(a):  # patch row i: α loads, then e_i = (row i of d) · B
        L.append(f"    r{i} = ok & (h0 >= {-i}) & (h0 < H - {i})")
        for j in range(a):
            off = " + ".join(t for t in (f"{i} * sxh" if i else "", f"{j} * sxw" if j else "") if t)
            L.append(f"    d{i}_{j} = tl.load(xp{' + ' + off if off else ''}, mask=r{i} & q{j}, other=0.0).to(tl.float32)")
        for s in range(a):
            L.append(f"    e{i}_{s} = {_lin(BT[s], [f'd{i}_{j}' for j in range(a)])}")
    for r in range(a):  # V[r, s] = Σ_i Bᵀ[r, i] e_i[s]
        for s in range(a):
            ptr = f"vp + {r * a + s} * vs" if r * a + s else "vp"
            L.append(f"    tl.store({ptr}, ({_lin(BT[r], [f'e{i}_{s}' for i in range(a)])}).to(v.dtype.element_ty), mask=ok)")
    return "\n".join(L) + "\n"


def _join_tree(names: list[str]) -> str:
    """tl.join expression whose flattened trailing axes list ``names`` in order (len a power of 2)."""
    if len(names) == 1:
        return names[0]
    return f"tl.join({_join_tree(names[0::2])}, {_join_tree(names[1::2])})"


def output_transform_source(AT: np.ndarray, m: int, name: str) -> str:
    a = AT.shape[1]
    mp = _pow2(m)
    L = [(f"@triton.jit\ndef {name}(mm, y, bias, K, HO, WO, NH, NW, P, syn, syk, syh, syw, HAS_BIAS: tl.constexpr, "
          "CL: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):")]
    L += _block_prologue("k", "K", "BLOCK_K", m, "")
    L += ["    if CL:", "        mp = mm + p * K + k", "    else:", "        mp = mm + k * P + p",
          "    ms = K * P",
          "    if HAS_BIAS:", "        b = tl.load(bias + k, mask=k < K, other=0.0).to(tl.float32)",
          "    else:", "        b = 0.0"]
    for r in range(a):  # row r of M: α loads, then q_r = (row r of M) · A
        for s in range(a):
            ptr = f"mp + {r * a + s} * ms" if r * a + s else "mp"
            L.append(f"    m{r}_{s} = tl.load({ptr}, mask=ok, other=0.0).to(tl.float32)")
        for j in range(m):
            L.append(f"    q{r}_{j} = {_lin(AT[j], [f'm{r}_{s}' for s in range(a)])}")
    for i in range(m):  # y[i, j] = Σ_r Aᵀ[i, r] q_r[j] + bias
        for j in range(m):
            L.append(f"    o{i}_{j} = ({_lin(AT[i], [f'q{r}_{j}' for r in range(a)])} + b).to(y.dtype.element_ty)")
    # ROWS (NCHW only): each tile row's m outputs are joined into one [BLOCK_K, BLOCK_P * mp] row segment
    # (mp = m rounded up to a power of 2, extra lanes masked), so adjacent lanes store adjacent w.
    L += ["    if ROWS:",
          f"        pw = tl.program_id(0) * (BLOCK_P * {mp}) + tl.arange(0, BLOCK_P * {mp})[None, :]",
          f"        pr = pw // {mp}", f"        jr = pw % {mp}",
          f"        h0r = ((pr // NW) % NH) * {m}", f"        w0r = (pr % NW) * {m} + jr",
          f"        okr = (k < K) & (pr < P) & (jr < {m}) & (w0r < WO)",
          "        ypr = y + (pr // (NH * NW)) * syn + k * syk + h0r * syh + w0r * syw"]
    for i in range(m):
        row = [f"o{i}_{j}" for j in range(m)] + [f"o{i}_0"] * (mp - m)
        L.append(f"        tl.store(ypr{f' + {i} * syh' if i else ''}, tl.reshape({_join_tree(row)}, (BLOCK_K, BLOCK_P * {mp})), "
                 f"mask=okr & (h0r < HO - {i}))")
    L += ["    else:", "        yp = y + n * syn + k * syk + h0 * syh + w0 * syw"]
    L += [f"        c{j} = w0 < WO - {j}" for j in range(m)]
    for i in range(m):
        L.append(f"        r{i} = ok & (h0 < HO - {i})")
        for j in range(m):
            off = " + ".join(t for t in (f"{i} * syh" if i else "", f"{j} * syw" if j else "") if t)
            L.append(f"        tl.store(yp{' + ' + off if off else ''}, o{i}_{j}, mask=r{i} & c{j})")
    return "\n".join(L) + "\n"


def filter_transform(weight: torch.Tensor, transform) -> torch.Tensor:
    """U = G g Gᵀ for every (k, c), in float64, laid out [α², K, C] for the batched GEMM."""
    _, G, _ = transform.numpy()
    a = transform.alpha
    G64 = torch.tensor(G, dtype=torch.float64, device=weight.device)
    U = G64 @ weight.double() @ G64.T  # (K, C, α, α)
    return U.permute(2, 3, 0, 1).reshape(a * a, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


@functools.lru_cache(maxsize=64)
def transform_kernels(m: int, points: str, scaling: str, device_type: str, cache_dir: str):
    """(input kernel, output kernel, source, transform) for the exact, verified transform with
    these finite points (space-separated rationals) and Lagrange-scaling placement."""
    from fxforge.passes.winograd.construct import toom_cook
    from fxforge.passes.winograd.verify import require_verified

    transform = require_verified(toom_cook(m, 3, points.split(), scaling), dims=(1,))
    AT, _, BT = transform.numpy()
    tag = hashlib.sha256(np.concatenate([AT.ravel(), BT.ravel()]).tobytes()).hexdigest()[:10]
    src = "# fxforge Winograd transforms " + transform.name + " points " + " ".join(transform.points_str()) + " inf\n"
    src += "import triton\nimport triton.language as tl\n\n\n"
    src += input_transform_source(BT, m, f"wino_in_{tag}") + "\n\n" + output_transform_source(AT, m, f"wino_out_{tag}")
    k_in = load_kernel(f"wino_in_{tag}", src, device_type, cache_dir)
    k_out = load_kernel(f"wino_out_{tag}", src, device_type, cache_dir)
    return k_in, k_out, src, transform


# ---------------------------------------------------------------------------------------------
# launch configurations

@dataclass(frozen=True)
class WinogradConfig:
    """Program blocks of the two transforms: (tiles, channels) per program and num_warps.
    ``layout`` is "auto" (follow x's memory format), "nchw" or "nhwc"."""
    in_p: int
    in_c: int
    in_warps: int
    out_p: int
    out_k: int
    out_warps: int
    layout: str = "auto"
    out_rows: bool = False  # NCHW output: store each tile row as one contiguous segment (tl.join)

    def label(self) -> str:
        rows = "r" if self.out_rows else ""
        return f"in{self.in_p}x{self.in_c}w{self.in_warps}_out{self.out_p}x{self.out_k}w{self.out_warps}{rows}"


# Best guesses first (register budget: α² fp32 values per element, ≤ ~2 elements per thread at
# m ≥ 4; the fast axis spans ≥ 64 fp16 = 128 B). benchmarks/probe_winograd.py sweeps these on the GPU;
# the first entry of each list is the default.
CONFIGS = {
    ("nchw", 2): [WinogradConfig(128, 2, 4, 128, 4, 4, out_rows=True)],
    # H100 probe (benchmarks/results/probe_winograd.md): input 128x1 w4 (1.80 TB/s) with output 64x4 w4
    # row stores (1.89 TB/s) was the fastest F(4,3) NCHW pair: 232 us per layer inside a CUDA graph.
    ("nchw", 4): [WinogradConfig(128, 1, 4, 64, 4, 4, out_rows=True), WinogradConfig(128, 1, 4, 128, 2, 4, out_rows=True),
                  WinogradConfig(128, 2, 4, 128, 1, 4), WinogradConfig(256, 2, 8, 256, 2, 8),
                  WinogradConfig(128, 4, 4, 128, 1, 4, out_rows=True), WinogradConfig(64, 2, 2, 64, 2, 2)],
    ("nchw", 6): [WinogradConfig(128, 1, 4, 128, 1, 4, out_rows=True), WinogradConfig(64, 1, 2, 64, 1, 2),
                  WinogradConfig(128, 2, 4, 128, 2, 4, out_rows=True), WinogradConfig(256, 1, 8, 256, 1, 8),
                  WinogradConfig(64, 2, 4, 64, 2, 4)],
    ("nhwc", 2): [WinogradConfig(4, 128, 4, 4, 128, 4)],
    ("nhwc", 4): [WinogradConfig(2, 64, 2, 2, 128, 4), WinogradConfig(2, 128, 4, 2, 128, 4),
                  WinogradConfig(4, 64, 4, 4, 64, 4), WinogradConfig(1, 128, 4, 1, 128, 4)],
    ("nhwc", 6): [WinogradConfig(1, 128, 4, 1, 128, 4), WinogradConfig(2, 64, 4, 2, 64, 4),
                  WinogradConfig(1, 64, 2, 1, 64, 2)],
}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def is_channels_last(x: torch.Tensor) -> bool:
    """x is stored NHWC (and not also plainly contiguous, as when C == 1 or H == W == 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def resolve_layout(x: torch.Tensor, config: WinogradConfig | None) -> str:
    layout = config.layout if config is not None else "auto"
    if layout == "auto":
        layout = "nhwc" if is_channels_last(x) else "nchw"
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be auto, nchw or nhwc, got {layout!r}")
    return layout


def default_config(m: int, layout: str, P: int, C: int, K: int, interpreted: bool) -> WinogradConfig:
    if interpreted:  # few, large programs: the interpreter pays per program, not per register
        bp, bc, bk = min(_pow2(P), 256), min(_pow2(C), 16), min(_pow2(K), 16)
        return WinogradConfig(bp, bc, 4, bp, bk, 4, layout)
    key = (layout, m if (layout, m) in CONFIGS else (4 if m < 6 else 6))
    return dataclasses.replace(CONFIGS[key][0], layout=layout)


# ---------------------------------------------------------------------------------------------
# the three launches


@dataclass(frozen=True)
class Geometry:
    N: int
    C: int
    H: int
    W: int
    K: int
    m: int
    padding: int

    @property
    def HO(self) -> int:
        return self.H + 2 * self.padding - 2

    @property
    def WO(self) -> int:
        return self.W + 2 * self.padding - 2

    @property
    def NH(self) -> int:
        return -(-self.HO // self.m)

    @property
    def NW(self) -> int:
        return -(-self.WO // self.m)

    @property
    def P(self) -> int:
        return self.N * self.NH * self.NW

    @property
    def alpha(self) -> int:
        return self.m + 2


def input_transform(x: torch.Tensor, m: int, points: str, padding: int, layout: str, config: WinogradConfig,
                    scaling: str = "G", cache_dir: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """V = Bᵀ d B for every (tile, channel): [α², C, P] ("nchw") or [α², P, C] ("nhwc")."""
    from fxforge.config import cache_dir as env_cache_dir

    k_in = transform_kernels(m, points, scaling, x.device.type, cache_dir or env_cache_dir())[0]
    N, C, H, W = x.shape
    g = Geometry(N, C, H, W, 0, m, padding)
    a, P, cl = g.alpha, g.P, layout == "nhwc"
    if out is None:
        out = torch.empty((a * a, P, C) if cl else (a * a, C, P), device=x.device, dtype=x.dtype)
    if max(x.numel(), out.numel()) >= 2**31:
        raise ValueError("Winograd transforms index with int32: tensor too large")
    grid = (-(-P // config.in_p), -(-C // config.in_c))
    k_in[grid](x, out, C, H, W, g.NH, g.NW, P, padding, *x.stride(), CL=cl, BLOCK_C=config.in_c,
               BLOCK_P=config.in_p, num_warps=config.in_warps)
    return out


def winograd_gemm(U: torch.Tensor, V: torch.Tensor, layout: str) -> torch.Tensor:
    """M[ξ] = U[ξ] V[ξ] ([α², K, P]) or, channels-last, V[ξ] U[ξ]ᵀ ([α², P, K]): cuBLAS, fp32 accumulation."""
    return torch.bmm(V, U.transpose(1, 2)) if layout == "nhwc" else torch.bmm(U, V)


def output_transform(M: torch.Tensor, bias: torch.Tensor | None, g: Geometry, layout: str, config: WinogradConfig,
                     points: str, scaling: str = "G", cache_dir: str | None = None) -> torch.Tensor:
    """y = Aᵀ M A + bias, NCHW ("nchw") or channels-last ("nhwc") storage."""
    from fxforge.config import cache_dir as env_cache_dir

    k_out = transform_kernels(g.m, points, scaling, M.device.type, cache_dir or env_cache_dir())[1]
    cl = layout == "nhwc"
    K = M.shape[2] if cl else M.shape[1]
    y = torch.empty(g.N, K, g.HO, g.WO, device=M.device, dtype=M.dtype,
                    memory_format=torch.channels_last if cl else torch.contiguous_format)
    if max(M.numel(), y.numel()) >= 2**31:
        raise ValueError("Winograd transforms index with int32: tensor too large")
    grid = (-(-g.P // config.out_p), -(-K // config.out_k))
    k_out[grid](M, y, bias if bias is not None else y, K, g.HO, g.WO, g.NH, g.NW, g.P, *y.stride(),
                HAS_BIAS=bias is not None, CL=cl, ROWS=config.out_rows and not cl, BLOCK_K=config.out_k, BLOCK_P=config.out_p,
                num_warps=config.out_warps)
    return y


def winograd_apply(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, m: int, points: str, padding: int,
                   scaling: str = "G", cache_dir: str | None = None, config: WinogradConfig | None = None) -> torch.Tensor:
    """conv2d(x, w, bias, padding) for U = filter_transform(w, transform(m, points, scaling)).
    The result has x's memory format (channels-last in, channels-last out)."""
    layout = resolve_layout(x, config)
    N, C, H, W = x.shape
    g = Geometry(N, C, H, W, U.shape[1], m, padding)
    if config is None:
        config = default_config(m, layout, g.P, C, g.K, x.device.type == "cpu" and interpreter_active())
    V = input_transform(x, m, points, padding, layout, config, scaling, cache_dir)
    M = winograd_gemm(U, V, layout)
    return output_transform(M, bias, g, layout, config, points, scaling, cache_dir)


@torch.library.custom_op("fxforge::winograd_conv2d", mutates_args=())
def winograd_conv2d(x: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, m: int, points: str,
                    padding: int, scaling: str) -> torch.Tensor:
    """The graph-level op the ``winograd_conv`` pass writes: a 3×3 stride-1 convolution whose filter
    was transformed at compile time (U), run by this module's kernels. The output is NCHW-contiguous
    (channels-last inputs use the channels-last kernels, then one copy), as the fake below says."""
    return winograd_apply(x, U, bias, m, points, padding, scaling).contiguous()


@winograd_conv2d.register_fake
def _(x, U, bias, m, points, padding, scaling):
    return x.new_empty((x.shape[0], U.shape[1], x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2))


class WinogradConv2d:
    """A 3×3, stride-1 convolution with fixed weights, run as Winograd F(m×m, 3×3).

    ``transform`` is an exact ``passes.winograd.construct.Transform`` (verified by the library);
    the filter transform U = G g Gᵀ happens here, once, in float64. ``config`` (a WinogradConfig)
    overrides the launch blocks; by default the first CONFIGS entry for the input's layout.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transform, padding: int, cache_dir: str | None = None,
                 config: WinogradConfig | None = None):
        from fxforge.config import cache_dir as env_cache_dir

        self.m, self.padding, self.bias, self.config = transform.m, padding, bias, config
        self.points, self.scaling = " ".join(transform.points_str()), transform.scaling
        self.U = filter_transform(weight, transform)
        self.cache_dir = cache_dir or env_cache_dir()
        self.source = transform_kernels(self.m, self.points, self.scaling, weight.device.type, self.cache_dir)[2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return winograd_apply(x, self.U, self.bias, self.m, self.points, self.padding, self.scaling, self.cache_dir,
                              self.config)
