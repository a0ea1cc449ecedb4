"""SmoothQuant for W8A8 linear layers, with a per-layer alpha search on calibration data (issue 4).

SmoothQuant (Xiao et al., arXiv 2211.10438; mit-han-lab/smoothquant, research notes §3.4) moves the
quantization difficulty of activation outlier channels into the weights with an exact rescaling of the
input dimension: per input channel j,

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)          (both clamped >= 1e-5, as the reference code)
    y = x W^T = (x / s) (W * s)^T

then W * s is quantized per output channel to int8 and x / s per token to int8 at run time
(runtime/w8a8.py, ``fxforge::w8a8_linear``; the division by s is fused into the activation quantizer
instead of being folded into a preceding norm, so any nn.Linear can be smoothed on its own).
alpha = 0.5 is the paper's default, 0.8-0.85 is what its README uses for Llama; alpha must be tuned per
model (TRT-LLM / NeMo sweeps never find 1.0 optimal), so ``calibrate_smoothquant`` searches it per layer:
it records each linear's input over calibration batches (forward hooks) and keeps, per layer, the alpha
whose W8A8-simulated output (the op's exact math, ``runtime/w8a8.reference``) has the lowest MSE against
the float64 layer on those inputs.

    smoothing = calibrate_smoothquant(model, batches)           # {name: (alpha, s)}
    swap_linears_w8a8(model, smoothing)                         # nn.Linear -> W8A8Linear (in place)
    compiled = fxforge.compile(model, inputs)                   # runs fxforge::w8a8_linear as a library op
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from fxforge.runtime import w8a8 as _w8a8  # registers fxforge::w8a8_linear
from torch import nn

from .formats import QuantFormat, quantize

__all__ = ["DEFAULT_ALPHAS", "W8A8_WEIGHT", "W8A8Linear", "calibrate_smoothquant", "simulate_w8a8",
           "smoothing_factors", "swap_linears_w8a8", "w8a8_quantize_linear"]

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
EPS = 1e-5  # floor of max|X_j|, max|W_j| and s_j (the reference implementation's clamp)
# Calibration rows kept per layer for the alpha search (amax uses every row). They are kept on the CPU in
# the activation dtype: 1024 x 4096 bf16 = 8 MB per layer; the search itself runs on the layer's device.
MAX_CALIB_ROWS = 1024
# int8 symmetric per output channel with an fp32 scale: formats.py's conventions (s = amax / 127 in fp32,
# codes round-half-even, clamped to [-127, 127]); the scale stays fp32 because the GEMM epilogue is fp32.
W8A8_WEIGHT = QuantFormat("w8a8_weight", "int8", None, "fp32", note="W8A8 weights: int8 per channel, fp32 scale")


def smoothing_factors(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (float32 [K], floored at 1e-5)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    if act_amax.shape != w_amax.shape or act_amax.dim() != 1:
        raise ValueError(f"smoothquant: per-channel maxima must be two [K] vectors, got {tuple(act_amax.shape)} "
                         f"and {tuple(w_amax.shape)}")
    a = act_amax.double().clamp(min=EPS)
    w = w_amax.double().clamp(min=EPS)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=EPS).float()


def w8a8_quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, s: torch.Tensor | None = None):
    """The op's tensors for ``nn.Linear`` ``weight [N, K]`` / ``bias [N]`` smoothed by ``s [K]`` (or None):
    ``(w_codes int8 [N, K], w_scale fp32 [N], smooth fp32 [K] | None, bias)``. The weight columns are
    multiplied by the same fp32 s that the activation quantizer divides x by, in float64, before the
    per-channel int8 quantization."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"w8a8_quantize_linear: weight must be a float [N, K] tensor, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    n, k = weight.shape
    w64 = weight.detach().double()
    smooth = None
    if s is not None:
        if tuple(s.shape) != (k,) or not s.is_floating_point() or not bool((s > 0).all()):
            raise ValueError(f"w8a8_quantize_linear: s must be positive float [{k}], got {s.dtype} {tuple(s.shape)}")
        smooth = s.detach().to(device=weight.device, dtype=torch.float32).contiguous()
        w64 = w64 * smooth.double()[None, :]
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise ValueError(f"w8a8_quantize_linear: bias must be float [{n}], got {bias.dtype} {tuple(bias.shape)}")
    qt = quantize(w64, W8A8_WEIGHT)
    w_scale = qt.scales.reshape(n).to(torch.float32)
    return qt.codes.contiguous(), w_scale.contiguous(), smooth, (bias.detach() if bias is not None else None)


def simulate_w8a8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  s: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 layer's output in float64 (the op's exact math, no kernels): x [..., K] -> [..., N]."""
    w_codes, w_scale, smooth, b = w8a8_quantize_linear(weight, bias, s)
    x2 = x.reshape(-1, weight.shape[1])
    codes, x_scale = _w8a8.reference_quantize_activations(x2, smooth)
    return _w8a8.reference_float64(codes, x_scale, w_codes, w_scale, b).reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------- calibration
class _Recorder:
    """Per-channel amax of a linear's input over every calibration row, plus the first ``max_rows`` rows."""

    def __init__(self, max_rows: int):
        self.amax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.kept = 0
        self.max_rows = max_rows

    def __call__(self, module, args, output):
        x = args[0].detach()
        x2 = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x2).all():
            raise ValueError("calibrate_smoothquant: a linear input contains NaN or inf")
        a = x2.abs().amax(dim=0).float().cpu() if x2.shape[0] else torch.zeros(x2.shape[-1])
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        take = min(self.max_rows - self.kept, x2.shape[0])
        if take > 0:
            self.rows.append(x2[:take].cpu())
            self.kept += take


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _default_filter(name: str, module: nn.Linear) -> bool:
    return True


@torch.no_grad()
def calibrate_smoothquant(model: nn.Module, batches: Iterable, alphas: Iterable[float] = DEFAULT_ALPHAS, *,
                          filter: Callable[[str, nn.Linear], bool] | None = None, max_rows: int = MAX_CALIB_ROWS,
                          history: dict | None = None) -> dict[str, tuple[float, torch.Tensor]]:
    """Run ``model`` on ``batches`` (each a tensor or a tuple of positional inputs) and choose, per
    ``nn.Linear`` accepted by ``filter(name, module)``, the alpha of ``alphas`` minimizing the output MSE of
    the W8A8-simulated layer against float64 on the recorded inputs. Returns ``{name: (alpha, s)}`` with s a
    float32 [K] tensor on the layer's device. ``history`` (a dict) receives ``{name: {"mse": {alpha: mse},
    "mse_unsmoothed": mse, "alpha", "sqnr_db", "sqnr_db_unsmoothed"}}`` (output SQNR vs float64).
    Ties keep the smaller alpha."""
    alphas = tuple(float(a) for a in alphas)
    if not alphas:
        raise ValueError("calibrate_smoothquant: alphas is empty")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"calibrate_smoothquant: alpha must be in [0, 1], got {a}")
    if max_rows < 1:
        raise ValueError(f"calibrate_smoothquant: max_rows must be >= 1, got {max_rows}")
    keep = filter or _default_filter
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and keep(name, m)}
    if not layers:
        raise ValueError("calibrate_smoothquant: the model has no nn.Linear layer to calibrate")
    recorders = {name: _Recorder(max_rows) for name in layers}
    handles = [m.register_forward_hook(recorders[name]) for name, m in layers.items()]
    try:
        n_batches = 0
        for batch in batches:
            model(*_as_args(batch))
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("calibrate_smoothquant: no calibration batches")
    result = {}
    for name, m in layers.items():
        rec = recorders[name]
        if rec.amax is None or not rec.rows:
            continue  # never called on these batches: left unsmoothed
        w = m.weight.detach().float()
        x = torch.cat(rec.rows).to(device=w.device, dtype=torch.float32)
        ref = x.double() @ w.double().T  # the bias cancels in the error
        w_amax = w.abs().amax(dim=0).cpu()
        errors = {}
        for a in alphas:
            s = smoothing_factors(rec.amax, w_amax, a)
            errors[a] = (simulate_w8a8(x, w, None, s) - ref).pow(2).mean().item()
        best = min(alphas, key=lambda a: (errors[a], a))
        result[name] = (best, smoothing_factors(rec.amax, w_amax, best).to(m.weight.device))
        if history is not None:
            base = (simulate_w8a8(x, w, None, None) - ref).pow(2).mean().item()
            signal = ref.pow(2).mean().item()
            history[name] = {"mse": errors, "mse_unsmoothed": base, "alpha": best,
                             "sqnr_db": 10 * math.log10(signal / errors[best]) if errors[best] > 0 else math.inf,
                             "sqnr_db_unsmoothed": 10 * math.log10(signal / base) if base > 0 else math.inf}
    return result


# ---------------------------------------------------------------------------------------------- modules
class W8A8Linear(nn.Module):
    """A linear layer calling ``fxforge::w8a8_linear`` (exported graphs capture the op; fxforge runs its
    kernels as a library op). Buffers: ``w_codes int8 [N, K]``, ``w_scale fp32 [N]``, optional
    ``smooth fp32 [K]`` and ``bias [N]``."""

    def __init__(self, w_codes: torch.Tensor, w_scale: torch.Tensor, smooth: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, alpha: float | None = None):
        super().__init__()
        self.out_features, self.in_features = w_codes.shape
        self.alpha = alpha
        self.register_buffer("w_codes", w_codes)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("smooth", smooth)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, s: torch.Tensor | None = None, alpha: float | None = None) -> W8A8Linear:
        w_codes, w_scale, smooth, bias = w8a8_quantize_linear(linear.weight, linear.bias, s)
        return cls(w_codes, w_scale, smooth, bias, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxforge.w8a8_linear(x, self.w_codes, self.w_scale, self.smooth, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"smooth={self.smooth is not None}, alpha={self.alpha}")


def swap_linears_w8a8(model: nn.Module, smoothing: dict | None = None, *,
                      filter: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Replace (in place) every ``nn.Linear`` accepted by ``filter(name, module)`` with a ``W8A8Linear``,
    smoothed by ``smoothing[name] = (alpha, s)`` where given (``calibrate_smoothquant``'s result) and
    unsmoothed elsewhere. Returns the swapped names."""
    smoothing = smoothing or {}
    keep = filter or _default_filter
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and keep(name, m)]
    unknown = sorted(set(smoothing) - {name for name, _ in targets})
    if unknown:
        raise ValueError(f"swap_linears_w8a8: smoothing names no swapped nn.Linear: {unknown}")
    for name, m in targets:
        alpha, s = smoothing.get(name, (None, None))
        if not name:
            raise ValueError("swap_linears_w8a8: the model itself is an nn.Linear; wrap it in a module")
        new = W8A8Linear.from_linear(m, s, alpha)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return [name for name, _ in targets]
