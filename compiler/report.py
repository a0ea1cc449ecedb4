"""What a compile did: passes, kernels, fallbacks (each with its reason) and the memory plan."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CompileReport:
    passes: list = field(default_factory=list)  # PassResult dicts
    kernels: list = field(default_factory=list)  # one per launch: {"name", "kind", "nodes"}
    unique_kernels: int = 0  # distinct Triton sources (identical layers share one)
    fallbacks: list = field(default_factory=list)  # {"node", "op", "reason"}
    views: int = 0
    library_calls: int = 0  # fxforge custom ops run by their own kernels (e.g. Winograd convolution)
    memory: dict = field(default_factory=dict)
    autotune: list = field(default_factory=list)  # matmul winners: {"kernel", "shape", "winner", "ms"}
    cuda_graph: str = ""  # "captured", or "disabled: <reason>"
    compile_seconds: float = 0.0
    graph_nodes: int = 0

    @property
    def num_kernels(self) -> int:
        return len(self.kernels)

    def kernel_kinds(self) -> dict:
        out: dict = {}
        for k in self.kernels:
            out[k["kind"]] = out.get(k["kind"], 0) + 1
        return out

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_program(cls, program, fallbacks, passes=None, seconds=0.0, graph_nodes=0) -> "CompileReport":
        from fxforge.runtime.program import AtenStep, KernelStep

        return cls(
            passes=[p.__dict__ if hasattr(p, "__dict__") else p for p in (passes or [])],
            kernels=[{"name": s.kernel, "kind": s.kind, "nodes": s.nodes} for s in program.steps if isinstance(s, KernelStep)],
            unique_kernels=len(program.kernels),
            fallbacks=list(fallbacks),
            views=sum(1 for s in program.steps if isinstance(s, AtenStep) and s.role in ("view", "getitem")),
            library_calls=sum(1 for s in program.steps if isinstance(s, AtenStep) and s.role == "library"),
            memory={"bytes_unplanned": program.memory.bytes_unplanned, "bytes_planned": program.memory.bytes_planned,
                    "slots": len(program.memory.slots)},
            compile_seconds=seconds, graph_nodes=graph_nodes,
        )

    def render(self) -> str:
        lines = [f"graph nodes: {self.graph_nodes}   compile: {self.compile_seconds:.2f} s"]
        if self.passes:
            lines.append("passes:")
            for p in self.passes:
                lines.append(f"  {p['name']:<16} modified={str(p['modified']):<5} nodes {p['nodes_before']}->{p['nodes_after']}  {p['seconds'] * 1e3:.1f} ms")
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.kernel_kinds().items()))
        lines.append(f"kernels: {self.num_kernels} launches of {self.unique_kernels} distinct ({kinds})   view/getitem steps: {self.views}"
                     + (f"   library ops: {self.library_calls}" if self.library_calls else ""))
        for k in self.kernels:
            lines.append(f"  {k['name']:<48} {len(k['nodes'])} nodes")
        lines.append(f"fallbacks: {len(self.fallbacks)}")
        for f in self.fallbacks:
            lines.append(f"  {f['node']:<24} {f['op']:<40} {f['reason']}")
        if self.cuda_graph:
            lines.append(f"cuda graph: {self.cuda_graph}")
        if self.autotune:
            lines.append("autotune (which won):")
            for t in self.autotune:
                best = t["ms"].get(t["winner"], float("nan"))
                others = ", ".join(f"{k} {v:.3f}" for k, v in t["ms"].items() if k != t["winner"])
                lines.append(f"  {t['kernel']:<48} shape={'x'.join(map(str, t['shape']))}  {t['winner']} {best:.3f} ms  ({others})")
        m = self.memory
        if m:
            lines.append(f"memory plan: {m.get('bytes_unplanned')} B of kernel outputs -> {m.get('bytes_planned')} B in {m.get('slots')} reused slots")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()
