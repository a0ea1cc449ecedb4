"""KIVI decode-attention launches for Nsight Compute (issue 4's kv_decode_32k shape: B = 1, 32 query / 8 KV
heads, head dim 128, 32K tokens, bf16, bf16 scales; 2-bit and 4-bit, default configs):
``ncu --clock-control none -k regex:kivi --set full python benchmarks/profile_kivi.py``."""
from __future__ import annotations

import os

import torch
from fxforge.passes.quant.kv import kivi_quantize
from fxforge.runtime.kivi_attention import kivi_configs, kivi_decode_attention

# PROFILE_W1=1 (session 15): 2-bit, the two-warp config capped at 128 registers (kivi_configs' second; the
# default before session 15) then the one-warp uncapped default, then the 4-bit default, 128 splits each
W1 = os.environ.get("PROFILE_W1") == "1"


def main() -> None:
    B, HQ, HKV, S, D = 1, 32, 8, 32768, 128
    k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    for bits in (2, 4):
        cache = kivi_quantize(k, v, bits=bits, group=32, residual=32, scale_dtype=torch.bfloat16)
        cfgs = kivi_configs(1, HQ, HKV, D, 32, False, bits=bits, v_group=32)
        for cfg in ([cfgs[1], cfgs[0]] if W1 and bits == 2 else [cfgs[0]] if W1 else [None, None]):
            kivi_decode_attention(q, cache, blocks=cfg, num_splits=128 if W1 else None)
        torch.cuda.synchronize()
        print("bits", bits, flush=True)


if __name__ == "__main__":
    main()
