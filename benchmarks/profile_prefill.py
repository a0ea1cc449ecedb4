"""Where the decoder prefill (2048 tokens, 853M, bf16) spends its time, fxforge vs Inductor, as
kernel tables from torch.profiler over 3 CUDA-graph replays (fxforge) / 3 calls (Inductor).
Writes results/profile_prefill.md. Usage: ``python benchmarks/profile_prefill.py``
"""
from __future__ import annotations

from pathlib import Path

import fxforge
import torch
from common import autotune_lines, out_dirs, time_cuda
from fxforge.models import TinyLlama, llama_decoder_853m
from torch.profiler import ProfilerActivity, profile


def table(fn, n=3) -> str:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)


def main() -> None:
    torch.manual_seed(0)
    model = TinyLlama(**llama_decoder_853m()).cuda().bfloat16().eval()
    ids = torch.randint(0, 32000, (1, 2048), device="cuda")
    lines = ["# profile_prefill", "", f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", ""]
    with torch.no_grad():
        compiled = fxforge.compile(model, (ids,))
        compiled(ids)
        ms = time_cuda(compiled, ids, reps=30)
        lines += [f"## fxforge {ms:.3f} ms", "```", table(compiled.executor._graph[0].replay), "```"]
        lines += ["### autotune (which won)", "```", *autotune_lines(compiled.report), "```"]
        del compiled
        inductor = torch.compile(model)
        inductor(ids)
        ms = time_cuda(inductor, ids, reps=30)
        lines += [f"## inductor {ms:.3f} ms", "```", table(lambda: inductor(ids)), "```"]
    text = "\n".join(lines)
    print(text)
    for d in out_dirs():
        if d:
            Path(d, "profile_prefill.md").write_text(text)


if __name__ == "__main__":
    main()
