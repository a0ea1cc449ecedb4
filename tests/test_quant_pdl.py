"""Programmatic dependent launch (PDL) of the weight-only kernels on the GPU: the split-K reduce launched with PDL,
the GEMVs that fetch their first code words before griddepcontrol.wait (WAIT), the Gluon GEMM's PREFETCH, and the
generated kernels that signal their dependents early (PDL_SIGNAL). Each compares bits with PDL off; the launch
paths are in runtime/quant_linear.py, the kernels in codegen/templates/dequant_gemv_words.py, dequant_gemv_tma.py,
dequant_gemm_gluon.py and dequant_matmul.py (the reduce)."""
import fxforge
import pytest
import torch
from fxforge.config import DEFAULT_PASSES
from fxforge.passes.quant import quantize
from fxforge.passes.quant.quantize_pass import Quantize
from fxforge.runtime import quant_linear as ql
from test_quant_pass import _args, _check_kernel, _pack


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["w4a16_g128", "w8a16", "nvint4", "mxfp4", "mxint8"])
def test_gpu_multi_step_gemv_and_pdl_reduce(fmt):
    # The compiled words GEMV over many K steps (PREFETCH_X / XT carry x, scales and words across steps)
    # and the split-K reduce launched with and without programmatic dependent launch (GEMV and M = 64
    # GEMM): the same bits either way, and within the fp64 bound. K = 2080: the last group is partial.
    k, n = 2080, 200
    _, qt = _pack(n, k, fmt, seed=21)
    g = torch.Generator().manual_seed(22)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, None, fmt, k)]
    for m, make in ((1, ql.gemv_configs), (3, ql.gemv_configs), (64, ql.gemm_configs), (64, ql.triton_gemm_configs)):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        cfg = make(m, n, k, fmt, False)[0]  # (M = 64: the Gluon GEMM where it applies, and the Triton tile)
        for split in ((1, 3) if m <= ql.GEMV_DISPATCH_M else (None, 3)):
            y_pdl = ql.quant_linear_apply(x.cuda(), *args, config=dict(cfg, PDL=True), split_k=split).cpu()
            y_off = ql.quant_linear_apply(x.cuda(), *args, config=dict(cfg, PDL=False), split_k=split).cpu()
            assert torch.equal(y_pdl, y_off), (m, split)
            _check_kernel(y_pdl, x, qt, None, gemm=m > ql.GEMV_DISPATCH_M)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90+ GPU (programmatic dependent launch)")
@pytest.mark.parametrize("fmt", ["w4a16_g128", "w8a16", "nvint4", "mxfp4"])
def test_gpu_pdl_chain_in_a_cuda_graph(fmt):
    # The default GEMV configs (WAIT), the TMA GEMV with WAIT and the Gluon GEMM with PREFETCH launch with PDL and
    # fetch code words before griddepcontrol.wait; x must still be read only after it. A chain of dependent layers
    # (x_{i+1} = y_i) captured in one CUDA graph, where each kernel is launched while the one before it still runs,
    # must give the bits of the same chain run eagerly with PDL off, for a fresh x0 before every replay (a replay
    # that read a stale x would see the previous replay's values). One layer's codes are a strided view (copied
    # inside the call: that copy is the kernel ahead, so the codes are read after the wait). M = 1 / 3 (GEMV, with
    # and without K splits) and 16 (the Gluon GEMM; K = 2176 is whole 128-element steps, which it needs).
    from fxforge.runtime import quant_gemm_gluon, quant_gemv_tma

    k = n = 2176
    layers = 6
    g = torch.Generator().manual_seed(41)
    qts = [quantize(torch.randn(n, k, generator=g) / k ** 0.5, fmt) for _ in range(layers)]
    args = [[a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(qt, None, fmt, k)] for qt in qts]
    wide = torch.zeros(n, args[2][0].shape[1] + 16, dtype=args[2][0].dtype, device="cuda")
    wide[:, :args[2][0].shape[1]] = args[2][0]
    args[2][0] = wide[:, :args[2][0].shape[1]]  # not contiguous
    cases = [(1, None, None), (1, 3, None), (3, None, None), (16, None, None)]
    if quant_gemv_tma.format_ok(ql.kernel_format(fmt)):
        cases += [(1, None, dict(quant_gemv_tma.DEFAULT_CONFIG, WAIT=True)),
                  (1, 2, dict(quant_gemv_tma.DEFAULT_CONFIG, WAIT=True))]
    quant_gemm_gluon.SKIPPED.clear()
    for m, split, cfg in cases:
        if cfg is None:
            cfg = (ql.gemv_configs if m <= ql.GEMV_DISPATCH_M else ql.gemm_configs)(m, n, k, fmt, False)[0]
        if cfg.get("GLUON"):
            cfg = dict(cfg, PREFETCH=True)  # (an option of the Gluon GEMM, off by default)

        def run(x, pdl, cfg=cfg, split=split):
            for a in args:
                x = ql.quant_linear_apply(x, *a, config=dict(cfg, PDL=pdl), split_k=split)
            return x
        x0 = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
        run(x0, True)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = run(x0, True)
        for _ in range(3):
            x0.copy_(torch.randn(m, k, generator=g).to(torch.bfloat16))
            ref = run(x0.clone(), False)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, ref), (m, split, cfg)
    assert not quant_gemm_gluon.SKIPPED, quant_gemm_gluon.SKIPPED  # M = 16 ran the Gluon GEMM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90+ GPU (programmatic dependent launch)")
def test_gpu_pdl_signal_in_a_quantized_decode_step(monkeypatch):
    # Compiled quantized decode steps on sm_90+: the generated norm / activation kernels signal their dependents at
    # their start (PDL_SIGNAL) and the GEMVs after them (WAIT) fetch code words while they run. The logits of every
    # step (CUDA-graph replays) must be the bits of the same model compiled with PDL off.
    import copy

    from fxforge.models import KVCacheLlama, TinyLlama
    from fxforge.runtime import executor as executor_module

    torch.manual_seed(0)
    base = KVCacheLlama(TinyLlama(dim=256, n_heads=8, n_kv_heads=2, ffn_dim=688), batch=1, max_seq=32)
    base = base.cuda().bfloat16().eval()
    ids = torch.randint(0, 256, (1, 8), device="cuda")

    def decode(model):
        with torch.no_grad():
            compiled = fxforge.compile(model, (ids[:, :1], torch.tensor([0], device="cuda")),
                                       passes=[*DEFAULT_PASSES, Quantize(format="w4a16_g128")],
                                       config=fxforge.Config(autotune=False))  # (the same kernels both times)
            model.reset()
            outs = [compiled(ids[:, i:i + 1], torch.tensor([i], device="cuda")).clone() for i in range(8)]
        assert compiled.report.cuda_graph == "captured"
        return compiled, outs

    on, outs_on = decode(copy.deepcopy(base))
    kws = [st[2] for steps, _ in on.executor._plans.values() for st in steps if st is not None]
    assert any(kw.get("PDL_SIGNAL") for kw in kws)  # the generated kernels signal
    monkeypatch.setattr(executor_module, "pdl_capable", lambda device: False)
    monkeypatch.setattr(ql, "REDUCE_PDL", False)  # (the default PDL of every quant_linear config)
    off, outs_off = decode(copy.deepcopy(base))
    assert not any(st[2].get("PDL_SIGNAL") for steps, _ in off.executor._plans.values() for st in steps if st)
    for a, b in zip(outs_on, outs_off):
        assert torch.equal(a, b)
