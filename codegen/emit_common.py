"""Pieces shared by the kernel emitters: source buffers, operand naming, index decomposition."""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from fxforge.runtime.program import Operand

from .ops import TL_STORAGE, cast_to, compute_dtype, val  # noqa: F401  (cast_to re-exported)


def tensor_sig(t: torch.Tensor):
    """Shape, strides (eager's layout: a later view may rely on it), dtype and device of a value."""
    from fxforge.runtime.program import TensorSig

    def sz(d):
        return size_str(d.node.expr if isinstance(d, torch.SymInt) else d)
    return TensorSig([sz(d) for d in t.shape], str(t.dtype).replace("torch.", ""), str(t.device), [sz(d) for d in t.stride()])


def out_val(n: fx.Node) -> torch.Tensor:
    v = n.meta["val"]
    return v[0] if isinstance(v, (tuple, list)) else v


def size_str(x) -> int | str:
    """A size as stored in a Program: an int when static, else the sympy expression's string."""
    x = sympy.sympify(x)
    return int(x) if x.is_Integer else str(x)


class Source:
    def __init__(self):
        self.lines: list[str] = []
        self.indent = 1

    def __call__(self, line: str = ""):
        self.lines.append("    " * self.indent + line if line else "")

    def text(self) -> str:
        return "\n".join(self.lines)


def decompose(index: str, sizes: list[str], prefix: str) -> list[tuple[str, str]]:
    """Split a linear ``index`` over row-major ``sizes`` into one index per dim.

    The first dim needs no modulo (the mask bounds it) and the last no division.
    """
    out = []
    k = len(sizes)
    for d in range(k):
        inner = sizes[d + 1:]
        expr = index if not inner else f"({index} // ({' * '.join(inner)}))"
        if d > 0:
            expr = f"({expr} % {sizes[d]})"
        out.append((f"{prefix}{d}", expr))
    return out


class OperandTable:
    """Kernel pointer arguments: loads (``in*``) and stores (``out*``), deduplicated by recipe."""

    def __init__(self):
        self.loads: list[tuple[str, Operand, fx.Node]] = []
        self.stores: list[tuple[str, Operand, fx.Node]] = []
        self._load_key: dict = {}

    def load(self, node: fx.Node, kdims: list[int], tdims: list[int], tag=None) -> tuple[str, bool]:
        """``tag`` keeps loads apart that address the same tensor differently (a cat's shifted reads)."""
        key = (node.name, tuple(kdims), tuple(tdims), tag)
        if key in self._load_key:
            return self._load_key[key], False
        name = f"in{len(self.loads)}"
        self.loads.append((name, Operand(node.name, list(kdims), list(tdims)), node))
        self._load_key[key] = name
        return name, True

    def store(self, node: fx.Node, kdims: list[int], tdims: list[int]) -> str:
        name = f"out{len(self.stores)}"
        self.stores.append((name, Operand(node.name, list(kdims), list(tdims)), node))
        return name

    def pointer_args(self) -> list[str]:
        return [n for n, _, _ in self.loads] + [n for n, _, _ in self.stores]

    def stride_args(self) -> list[str]:
        out = []
        for name, op, _ in self.loads + self.stores:
            out += [f"{name}_s{k}" for k in op.kdims]
        return out


def offset(name: str, op: Operand, index_var) -> str:
    terms = [f"{index_var(k)} * {name}_s{k}" for k in op.kdims]
    return " + ".join(terms) if terms else None


def load_cast(node: fx.Node) -> str:
    d = val(node).dtype
    return f".to({compute_dtype(d)})" if TL_STORAGE[d] != compute_dtype(d) else ""


def store_dtype(node: fx.Node) -> str:
    return TL_STORAGE[val(node).dtype]


def is_static_one(x) -> bool:
    return sympy.sympify(x) == 1


_TO_BF16 = '''

@triton.jit
def to_bf16(v, INTERPRETED: tl.constexpr):
    # Triton's CPU interpreter truncates fp32 -> bf16; round to nearest even there, as the GPU does.
    v = v.to(tl.float32)
    if INTERPRETED:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        v = tl.where(v != v, v, u.to(tl.float32, bitcast=True))
    return v.to(tl.bfloat16)
'''


def header(name: str, kind: str, nodes: list[fx.Node], body: str = "") -> str:
    prov = "\n".join(f"#   {n.format_node()}" for n in nodes)
    helpers = _TO_BF16 if "to_bf16(" in body else ""
    return (
        f"# fxforge {kind} kernel {name}\n# fused FX nodes:\n{prov}\n"
        f"import triton\nimport triton.language as tl\n{helpers}\n\n@triton.jit\n"
    )
