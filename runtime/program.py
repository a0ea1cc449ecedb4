"""The program a compiled graph becomes: buffers, an ordered step list, Triton kernel sources.

Everything here is plain data that round-trips through JSON, so an artifact is this object plus
weights; nothing is pickled. Sizes are ints or sympy expression strings over the graph's shape
symbols (``s0``...), bound at call time from the input shapes.

Steps:
- ``KernelStep``: launch a generated Triton kernel (pointwise / reduction / matmul).
- ``AtenStep``: call an ATen op eagerly. ``role`` is "view" (metadata-only alias), "getitem", or
  "fallback" with a typed ``reason`` such as ``no_lowering: aten.cat.default``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

Size = Any  # int | str (sympy expression)


@dataclass
class TensorSig:
    shape: list  # of Size
    dtype: str
    device: str = "cpu"
    stride: list | None = None  # None: contiguous


@dataclass
class Operand:
    """A tensor a kernel reads or writes, and which tensor dim gives the stride of each kernel dim."""
    buf: str
    kdims: list  # kernel dims this operand is indexed by
    tdims: list  # tensor dim whose stride is used for each kdim (stride 0 where that size is 1)


@dataclass
class KernelStep:
    kernel: str
    kind: str  # pointwise | reduction | matmul
    loads: list  # of Operand
    stores: list  # of Operand
    outputs: dict  # buf -> TensorSig (allocated before launch)
    sizes: list  # kernel dim sizes, in kernel signature order
    launch: dict  # kind-specific sizes: xnumel/rnumel, or M/N/K/batch
    nodes: list  # provenance: FX node names fused into this kernel
    role: str = "kernel"


@dataclass
class AtenStep:
    op: str  # "aten::add.Tensor" | "getitem"
    args: Any  # JSON template: {"buf": name} | {"sym": expr} | {"dtype": ..} | scalars | lists
    kwargs: dict
    outputs: list  # buffer names produced (one, or one per tuple element name for tuple results)
    role: str  # view | getitem | fallback
    reason: str | None = None
    node: str = ""


@dataclass
class MemoryPlan:
    slots: list = field(default_factory=list)  # slot sizes in bytes (Size)
    assignment: dict = field(default_factory=dict)  # buf -> slot index
    bytes_unplanned: Size = 0
    bytes_planned: Size = 0


@dataclass
class Program:
    inputs: list  # of {"name", "kind": "tensor"|"sym", "sig": TensorSig | None, "expr": str|None}
    symbols: dict  # symbol name -> [input index, dim] (dim -1 for a SymInt input)
    constants: dict  # name -> TensorSig
    steps: list  # KernelStep | AtenStep
    outputs: list  # JSON refs like AtenStep args
    kernels: dict  # kernel name -> {"source": str, "entry": str, "kind": str, "nodes": [...]}
    memory: MemoryPlan = field(default_factory=MemoryPlan)
    out_spec: str | None = None  # pytree treespec_dumps of the user-facing output structure
    # Constants the program updates (module buffers such as a KV cache): the first len(mutations)
    # outputs are their new values, written back after each run (skipped where updated in place).
    mutations: list = field(default_factory=list)
    device: str = "cpu"

    def to_json(self) -> dict:
        d = asdict(self)
        d["steps"] = [{"type": type(s).__name__, **asdict(s)} for s in self.steps]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Program":
        d = dict(d)
        steps = []
        for s in d["steps"]:
            s = dict(s)
            typ = s.pop("type")
            if typ == "KernelStep":
                s["loads"] = [Operand(**o) for o in s["loads"]]
                s["stores"] = [Operand(**o) for o in s["stores"]]
                s["outputs"] = {k: TensorSig(**v) for k, v in s["outputs"].items()}
                steps.append(KernelStep(**s))
            else:
                steps.append(AtenStep(**s))
        d["steps"] = steps
        d["constants"] = {k: TensorSig(**v) for k, v in d["constants"].items()}
        d["inputs"] = [dict(i, sig=TensorSig(**i["sig"]) if i.get("sig") else None) for i in d["inputs"]]
        d["memory"] = MemoryPlan(**d["memory"])
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)
