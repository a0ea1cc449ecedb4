"""The debug switch (``FXFORGE_DEBUG=1``): graph dumps per pass, Triton source, numerics checks."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx

from .errors import NumericsError


def debug_dir(cfg) -> Path:
    d = Path(cfg.debug_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


def dump_graph(cfg, gm: fx.GraphModule, stage: str) -> Path:
    path = debug_dir(cfg) / f"{stage}.graph.txt"
    lines = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        meta = f"  # {tuple(val.shape)} {val.dtype}" if isinstance(val, torch.Tensor) else ""
        lines.append(f"{n.format_node()}{meta}")
    path.write_text("\n".join(lines) + "\n")
    return path


def dump_text(cfg, name: str, text: str) -> Path:
    path = debug_dir(cfg) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative norm error; NaN/Inf mismatches count as infinite error (NaN never passes)."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if o.shape != r.shape:
        return float("inf")
    fin_o, fin_r = torch.isfinite(o), torch.isfinite(r)
    if not torch.equal(fin_o, fin_r) or not torch.equal(o[~fin_o].nan_to_num(0), r[~fin_r].nan_to_num(0)):
        return float("inf")
    o, r = o[fin_o], r[fin_r]
    if r.numel() == 0:
        return 0.0
    denom = r.norm().item()
    num = (o - r).norm().item()
    return num / denom if denom > 0 else num


def flat_tensors(x) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(x)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def check_numerics(gm, inputs, reference, stage: str, rtol: float) -> None:
    with torch.no_grad():
        outs = flat_tensors(gm(*inputs))
    refs = flat_tensors(reference)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not o.is_floating_point():
            if not torch.equal(o.cpu(), r.cpu()):
                raise NumericsError(f"{stage} changed integer output {i}")
            continue
        err = rel_err(o, r)
        if not err <= rtol:
            raise NumericsError(f"{stage} broke numerics: output {i} relative error {err:.3g} > {rtol:g}")
