"""Where ViT-B/16 (batch 64, fp16) spends GPU time under fxforge and Inductor: top kernels by total
CUDA time from torch.profiler (CUDA graphs off, so kernels are visible). A diagnostic for issue 3,
not a results table: prints and writes benchmarks/results/profile_vit.md."""
from __future__ import annotations

import os
from pathlib import Path

import fxforge
import timm
import torch
from common import autotune_lines
from torch.profiler import ProfilerActivity, profile


def top_kernels(fn, x, n=24) -> str:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def main():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().eval().half()
    x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.float16)
    ours = fxforge.compile(model, (x,), config=fxforge.Config(cuda_graphs="off"))
    inductor = torch.compile(model)
    with torch.no_grad():
        text = "## fxforge (5 iterations)\n```\n" + top_kernels(ours, x) + "\n```\n\n## inductor (5 iterations)\n```\n" + top_kernels(inductor, x) + "\n```\n"
    text += "\n## fxforge autotune (which won)\n```\n" + "\n".join(autotune_lines(ours.report)) + "\n```\n"
    print(text)
    out = Path(__file__).parent / "results" / "profile_vit.md"
    out.write_text(f"# ViT-B/16 b64 fp16 kernel profile\n\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}\n\n" + text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "profile_vit.md").write_text(out.read_text())


if __name__ == "__main__":
    main()
