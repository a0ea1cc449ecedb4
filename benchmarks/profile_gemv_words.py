"""Run one words-GEMV launch per (format, N, config) for Nsight Compute (ncu) to profile:
``ncu --clock-control none -k regex:dequant_gemv_words --set full python benchmarks/profile_gemv_words.py``.
Cases (CASES): w4a16 g128 at 14336 x 4096 (16 rows x 256 B, prefetch 1, with and without the cp.async
loop pipeline), w8a16 (32 rows x 256 B, 8 warps) and w4a16 at 4096 x 4096 (8 rows x 512 B), M = 1, bf16 x;
each launched three times."""
from __future__ import annotations

import torch
from fxforge.passes.quant.formats import quantize
from fxforge.runtime import quant_linear as ql

# (format, N, BLOCK_N, code bytes per row per step, warps, PREFETCH, LOOP_STAGES)
CASES = [("w4a16_g128", 14336, 16, 256, 4, 1, 1), ("w4a16_g128", 14336, 16, 256, 4, 1, 3),
         ("w8a16", 14336, 32, 256, 8, 1, 1), ("w4a16_g128", 4096, 8, 512, 4, 1, 1)]


def main() -> None:
    K = 4096
    for fmt, N, bn, kbytes, warps, pf, ls in CASES:
        kf = ql.kernel_format(fmt)
        gb = 4 * ql.WORDS_ROW_GW if kf["PER_ROW"] else kf["GB"]
        q = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, fmt)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        cfg = {"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_G": kbytes // gb, "WORDS": True, "POST": True, "PREFETCH": pf,
               "LOOP_STAGES": ls, "num_warps": warps, "num_stages": 1}
        for _ in range(3):
            ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K, config=dict(cfg))
        torch.cuda.synchronize()
        print(fmt, N, cfg, flush=True)


if __name__ == "__main__":
    main()
