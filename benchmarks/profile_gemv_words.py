"""Run one words-GEMV launch per (format, N, config) for Nsight Compute (ncu) to profile:
``ncu --clock-control none -k regex:dequant_gemv_words --set full python benchmarks/profile_gemv_words.py``.
(and ``-k regex:dequant_gemv_kspan`` for the K-span kernel). Cases (CASES): the words defaults of w4a16 g128
at 14336 x 4096 and 4096 x 4096 and of w8a16 at 14336 x 4096, and the K-span kernel (dequant_gemv_kspan) at
the same shapes, M = 1, bf16 x; each launched three times."""
from __future__ import annotations

import torch
from fxforge.passes.quant.formats import quantize
from fxforge.runtime import quant_linear as ql

KSPAN = {"BLOCK_M": 1, "BLOCK_N": 8, "Q": 128, "WPT": 4, "WORDS": True, "KSPAN": True, "PREFETCH": 1,
         "num_warps": 4, "num_stages": 1}
# (format, N, config; None: the first WORDS config of gemv_configs -- at 14336 rows w4a16_g128's default is the MMA GEMV)
CASES = [("w4a16_g128", 14336, None), ("w4a16_g128", 14336, KSPAN), ("w4a16_g128", 4096, None),
         ("w4a16_g128", 4096, KSPAN), ("w8a16", 14336, None), ("w8a16", 14336, KSPAN)]


def main() -> None:
    K = 4096
    for fmt, N, cfg in CASES:
        q = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, fmt)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        cfg = cfg or next(c for c in ql.gemv_configs(1, N, K, fmt, False) if c.get("WORDS"))
        for _ in range(3):
            ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K, config=dict(cfg))
        torch.cuda.synchronize()
        print(fmt, N, cfg, flush=True)


if __name__ == "__main__":
    main()
