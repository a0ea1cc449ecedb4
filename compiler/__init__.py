"""fxforge: a torch.fx graph compiler — capture, a flat pipeline of named passes, fused Triton
kernels and a small runtime.

Front doors:
    torch.compile(model, backend="fxforge")          # JIT, through Dynamo + AOTAutograd
    compiled = fxforge.compile(model, example_inputs)  # AOT, through torch.export
    fxforge.save(compiled, "model.fxf"); fxforge.load("model.fxf")
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

if "triton" not in _sys.modules and "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    # Without CUDA, Triton kernels can only run through its CPU interpreter, which must be chosen
    # before triton is imported.
    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from . import backend  # noqa: E402,F401  (fxforge.backend.reports / last_report)
from .runtime import winograd as _winograd  # noqa: E402,F401  (registers the fxforge::winograd_conv2d op)
from .runtime import quant_linear as _quant_linear  # noqa: E402,F401  (registers the fxforge::quant_linear op)
from .runtime import w8a8 as _w8a8  # noqa: E402,F401  (registers the fxforge::w8a8_linear op)
from .runtime import kivi_cache as _kivi_cache  # noqa: E402,F401  (registers the fxforge::kivi_append_attention op)
from .api import CompiledModel, compile  # noqa: E402
from .artifact import load, save  # noqa: E402
from .config import Config  # noqa: E402
from .errors import ArtifactError, ConfigError, FxforgeError, NumericsError, PassError, SignatureMismatch  # noqa: E402
from .pipeline import Pass, Pipeline  # noqa: E402
from .registry import registry  # noqa: E402

__all__ = ["compile", "save", "load", "Config", "CompiledModel", "Pass", "Pipeline", "registry", "FxforgeError",
           "ArtifactError", "ConfigError", "NumericsError", "PassError", "SignatureMismatch", "__version__"]
