"""Launch the M = 64 dequant GEMM (codegen/templates/dequant_matmul.py) of w4a16 g128, mxfp4 and w8a16 at
4096 x 4096 with its default config, plus bf16 cuBLAS, for Nsight Compute:
``ncu --clock-control none -k regex:"dequant|gemm|splitk" --set full python benchmarks/profile_gemm_m64.py``."""
from __future__ import annotations

import torch
from fxforge.passes.quant.formats import quantize
from fxforge.runtime import quant_linear as ql


def main() -> None:
    N = K = 4096
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
    for fmt in ("w4a16_g128", "mxfp4", "w8a16"):
        q = quantize(w, fmt)
        for _ in range(2):
            ql.quant_linear_apply(x, q.codes, q.scales, q.zeros, q.tensor_scale, None, fmt, K)
        torch.cuda.synchronize()
        print(fmt, ql.triton_gemm_configs(64, N, K, fmt, False)[0], flush=True)
    torch.mm(x, w.t())
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
