"""Where the decode step's time goes (H100): kernel times inside fxforge's CUDA graph (torch.profiler
over graph replays), the bare graph replay vs the full call (bind + input copies + output clone), for
the 853M decoder of bench_decode.py. Writes results/profile_decode.md.

Usage: ``python benchmarks/profile_decode.py``
"""
from __future__ import annotations

import torch
from bench_decode import POS, build
from common import out_dirs, time_cuda

import fxforge


def main() -> None:
    model = build(torch.bfloat16)
    ids = torch.randint(0, 32000, (1, 1), device="cuda")
    pos = torch.tensor([POS], device="cuda")
    with torch.no_grad():
        compiled = fxforge.compile(model, (ids, pos))
        compiled(ids, pos)
        full = time_cuda(compiled, ids, pos, reps=100)
        graph = compiled.executor._graph[0]
        replay = time_cuda(graph.replay, reps=100)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    lines = ["# profile_decode", "", f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}",
             f"full call {full:.3f} ms; bare graph replay {replay:.3f} ms (5 replays profiled below)", "", "```", table, "```"]
    lines += ["", "autotune winners:"] + [f"- {t['kernel']} {t['shape']}: {t['winner']} {t['ms']}" for t in compiled.report.autotune]
    text = "\n".join(lines)
    print(text)
    for d in out_dirs():
        if d:
            from pathlib import Path

            Path(d, "profile_decode.md").write_text(text)


if __name__ == "__main__":
    main()
