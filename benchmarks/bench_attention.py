"""Attention benchmark for issue 3: the fxforge attention template vs SDPA and FlexAttention.

Workloads (B=1, 16 heads, head dim 128, bf16):
- ``attn_causal_8k`` / ``attn_causal_32k``: dense causal forward; TFLOP/s with the
  4·B·H·N²·D/2 convention, as a fraction of the measured bf16 matmul ceiling.
- ``attn_sink_window_32k``: 128 sink tokens + 4096-token causal window. fxforge builds its block
  layout analytically; FlexAttention builds a BlockMask from a mask_mod. Mask construction time is
  reported separately and added into ``latency_incl_mask`` (first call, as a user would see it).
Correctness: error against an fp32 reference at 2048 tokens, next to SDPA's own bf16 error.
"""
from __future__ import annotations

import time

import fxforge  # noqa: F401
import torch
import torch.nn.functional as F
from common import Results, out_dirs, rel_err
from fxforge.runtime.attention import attention, block_configs, block_layout
from triton.testing import do_bench

B, H, D = 1, 16, 128


def ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def best(fn_of_cfg, n: int) -> tuple[float, dict]:
    """Fastest launch config of the template for this length (what fxforge's autotuner picks with
    autotune="max"; block_configs lists the probe's winner first, the default otherwise). A config
    that fails to compile (e.g. TMA or warp specialization on an older Triton) loses."""
    timed = []
    for c in block_configs(n, D, interpreted=False):
        try:
            timed.append((ms(lambda c=c: fn_of_cfg(c)), c))
        except Exception as e:  # noqa: BLE001
            print(f"config {c} failed: {type(e).__name__}: {str(e)[:200]}")
    return min(timed, key=lambda tc: tc[0])


def ceilings(res: Results) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = ms(lambda: a @ a)
    tflops = 2 * 8192 ** 3 / t / 1e9
    res.add("ceiling", "cublas", "bf16_matmul", tflops, "TFLOP/s")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    res.add("ceiling", "copy", "hbm_bandwidth", 2 * x.numel() / t / 1e9, "TB/s")  # bytes / ms / 1e9 = TB/s
    return tflops


def main() -> None:
    res = Results("attention_gpu")
    peak = ceilings(res)
    # correctness at a moderate length
    q, k, v = (torch.randn(B, H, 2048, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    res.add("attn_causal_2k_check", "fxforge", "rel_err_vs_fp32", rel_err(attention(q, k, v, causal=True), ref), "rel_err")
    res.add("attn_causal_2k_check", "sdpa", "rel_err_vs_fp32", rel_err(F.scaled_dot_product_attention(q, k, v, is_causal=True), ref), "rel_err")
    for n, name in ((8192, "attn_causal_8k"), (32768, "attn_causal_32k")):
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * n * n * D / 2
        t_sdpa = ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t_ours, cfg = best(lambda c, q=q, k=k, v=v: attention(q, k, v, causal=True, blocks=c), n)
        print(f"{name}: best config {cfg}")
        for impl, t in (("sdpa", t_sdpa), ("fxforge", t_ours)):
            res.add(name, impl, "latency", t, "ms")
            res.add(name, impl, "throughput", flops / t / 1e9, "TFLOP/s")
            res.add(name, impl, "fraction_of_matmul_peak", flops / t / 1e9 / peak, "ratio")
        res.add(name, "fxforge", "speed_vs_sdpa", t_sdpa / t_ours, "x")
        del q, k, v
    # sink + window at 32K
    n, sink, window = 32768, 128, 4096
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layouts = {}

    def sparse(c):
        key = (c["BLOCK_M"], c["BLOCK_N"])
        if key not in layouts:
            layouts[key] = block_layout(n, n, *key, True, sink, window, "cuda")
        return attention(q, k, v, causal=True, sink=sink, window=window, layout=layouts[key], blocks=c)
    t_ours, blocks = best(sparse, n)
    print(f"sink_window: best config {blocks}")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    layout = block_layout(n, n, blocks["BLOCK_M"], blocks["BLOCK_N"], True, sink, window, "cuda")
    torch.cuda.synchronize()
    t_layout = (time.perf_counter() - t0) * 1e3
    res.add("attn_sink_window_32k", "fxforge", "mask_build", t_layout, "ms")
    res.add("attn_sink_window_32k", "fxforge", "latency", t_ours, "ms")
    res.add("attn_sink_window_32k", "fxforge", "latency_incl_mask", t_ours + t_layout, "ms")
    # correctness of the sparse kernel on a slice of rows against a dense masked reference
    qs = q[:, :, -256:]
    i, j = torch.arange(n - 256, n, device="cuda")[:, None], torch.arange(n, device="cuda")[None, :]
    vis = (j <= i) & (((i - j) < window) | (j < sink))
    ref = F.scaled_dot_product_attention(qs.float(), k.float(), v.float(), attn_mask=vis)
    out = attention(q, k, v, causal=True, sink=sink, window=window, layout=layout, blocks=blocks)[:, :, -256:]
    res.add("attn_sink_window_32k", "fxforge", "rel_err_vs_fp32", rel_err(out, ref), "rel_err")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def sink_window(b, h, qi, ki):
            return (ki <= qi) & (((qi - ki) < window) | (ki < sink))
        t0 = time.perf_counter()
        bm = create_block_mask(sink_window, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
        torch.cuda.synchronize()
        t_mask = (time.perf_counter() - t0) * 1e3
        flex = torch.compile(flex_attention)
        flex(q, k, v, block_mask=bm)
        t_flex = ms(lambda: flex(q, k, v, block_mask=bm))
        res.add("attn_sink_window_32k", "flex", "mask_build", t_mask, "ms")
        res.add("attn_sink_window_32k", "flex", "latency", t_flex, "ms")
        res.add("attn_sink_window_32k", "flex", "latency_incl_mask", t_flex + t_mask, "ms")
        res.add("attn_sink_window_32k", "flex", "rel_err_vs_fp32", rel_err(flex(q, k, v, block_mask=bm)[:, :, -256:], ref), "rel_err")
        res.add("attn_sink_window_32k", "fxforge", "speed_vs_flex", t_flex / t_ours, "x")
        res.add("attn_sink_window_32k", "fxforge", "speed_vs_flex_incl_mask", (t_flex + t_mask) / (t_ours + t_layout), "x")
    except Exception as e:  # noqa: BLE001 — report, keep the other rows
        print(f"flex attention unavailable: {type(e).__name__}: {e}")
    t_dense = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    res.add("attn_sink_window_32k", "sdpa", "latency_dense_causal", t_dense, "ms")
    res.write(out_dirs())


if __name__ == "__main__":
    main()
