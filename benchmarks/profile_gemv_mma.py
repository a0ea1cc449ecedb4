"""Run w4a16 g128 GEMV launches (M = 1, K = 4096) of the tensor-core GEMV (dequant_gemv_mma) and of the words GEMV
(the first WORDS config of gemv_configs) for Nsight Compute:
``ncu --clock-control none -k regex:dequant_gemv --section SpeedOfLight --section Occupancy --section
WarpStateStats --section LaunchStats python benchmarks/profile_gemv_mma.py``. Each case launched three times, alone
(no CUDA graph, no PDL overlap): the stall profile, not the bench's time. PROFILE_CFGS: warps:QW:PREFETCH:WAIT[:AUX
[:ADJ]] configs (probe_gemv_mma.cfg_of)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from fxforge.passes.quant.formats import quantize
from fxforge.runtime import quant_linear as ql
from probe_gemv_mma import FMT, cfg_of, name_of, run_mma


def main() -> None:
    K = 4096
    cfgs = [cfg_of(s) for s in os.environ.get("PROFILE_CFGS", "4:1:1:1").split(",")]
    for N in (14336, 4096):
        q = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, FMT)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, None, None, FMT, K, config=next(
                c for c in ql.gemv_configs(1, N, K, FMT, False) if c.get("WORDS")))
        for c in cfgs:
            for _ in range(3):
                run_mma(x, q, None, c, pdl=False)
            print(N, name_of(c), flush=True)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
