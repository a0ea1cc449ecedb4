"""Lower SDPA nodes onto the attention template (codegen/templates/attention.py).

Accepted: ``aten.scaled_dot_product_attention`` and the backend-specific variants AOTAutograd
produces (flash-for-CPU, flash, efficient, cuDNN) when only their output (not the logsumexp) is
used; dropout 0; q/k/v 4-D, fp16/bf16/fp32, head dim ≤ 256; optional bool/float mask.
"""
from __future__ import annotations

import math
import operator

import torch
from fxforge.runtime.program import KernelStep, Operand
from torch import fx

from .emit_common import size_str, tensor_sig
from .ops import val

aten = torch.ops.aten
_VARIANT_MASK_POS = {  # op -> (position of attn_mask/bias among args or None, position of is_causal)
    aten.scaled_dot_product_attention.default: (3, 5),
    aten._scaled_dot_product_flash_attention_for_cpu.default: (None, 4),
    aten._scaled_dot_product_flash_attention.default: (None, 4),
    aten._scaled_dot_product_efficient_attention.default: (3, 6),
    aten._scaled_dot_product_cudnn_attention.default: (3, 6),
}


def attention_args(n: fx.Node) -> dict | None:
    """Normalized SDPA arguments, or None when the node's target is not an attention op."""
    if n.target not in _VARIANT_MASK_POS:
        return None
    mpos, cpos = _VARIANT_MASK_POS[n.target]
    a = list(n.args)
    mask = a[mpos] if mpos is not None and len(a) > mpos else n.kwargs.get("attn_mask", n.kwargs.get("attn_bias"))
    dropout_pos = cpos - 1
    dropout = a[dropout_pos] if len(a) > dropout_pos else n.kwargs.get("dropout_p", 0.0)
    causal = a[cpos] if len(a) > cpos else n.kwargs.get("is_causal", False)
    return {"q": a[0], "k": a[1], "v": a[2], "mask": mask, "dropout": dropout, "causal": bool(causal),
            "scale": n.kwargs.get("scale"), "gqa": n.kwargs.get("enable_gqa", False)}


def unsupported_reason(n: fx.Node) -> str | None:
    args = attention_args(n)
    if args is None:
        return "attention: unknown variant"
    q, k, v = (val(args[x]) for x in "qkv")
    if args["dropout"]:
        return "attention: dropout_p > 0"
    if any(t is None or t.dim() != 4 for t in (q, k, v)):
        return "attention: q/k/v must be 4-D tensors"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        return f"attention: dtype {q.dtype}"
    if isinstance(q.shape[-1], torch.SymInt) or int(q.shape[-1]) > 256 or q.shape[-1] != v.shape[-1]:
        return "attention: head dim must be static, <= 256, equal for q and v"
    if isinstance(n.meta.get("val"), (tuple, list)) and any(
            u.target is not operator.getitem or u.args[1] != 0 for u in n.users):
        return "attention: a logsumexp/aux output is used"
    mask = args["mask"]
    if mask is not None and not isinstance(mask, fx.Node):
        return "attention: non-tensor mask"
    return None


def emit_attention_group(g, name: str, outputs: list[fx.Node], source: str) -> tuple[str, KernelStep]:
    n = g.anchor
    args = attention_args(n)
    q, k = val(args["q"]), val(args["k"])
    out = outputs[0]
    mask = args["mask"]
    loads = [Operand(args[x].name, [0, 1, 2, 3], [0, 1, 2, 3]) for x in "qkv"]
    if mask is not None:
        r = val(mask).dim()
        loads.append(Operand(mask.name, [0, 1, 2, 3], [d - (4 - r) for d in range(4)]))
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(int(q.shape[-1]))
    launch = {"B": size_str(q.shape[0]), "H": size_str(q.shape[1]), "LQ": size_str(q.shape[2]), "LK": size_str(k.shape[2]),
              "causal": args["causal"], "scale": float(scale), "has_mask": mask is not None}
    step = KernelStep(kernel=name, kind="attention", loads=loads, stores=[Operand(out.name, [0, 1, 2, 3], [0, 1, 2, 3])],
                      outputs={out.name: tensor_sig(val(out) if val(out) is not None else n.meta["val"][0])},
                      sizes=[], launch=launch, nodes=[m.name for m in g.nodes])
    prov = "\n".join(f"#   {m.format_node()}" for m in g.nodes)
    return f"# fxforge attention kernel {name}\n# lowered FX nodes:\n{prov}\n" + source, step
