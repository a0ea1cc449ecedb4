"""Test session setup: CPU tests run Triton through its interpreter, which must be chosen before
triton is imported; on a CUDA machine without TRITON_INTERPRET=1 they are skipped (GPU tests run
there instead), since one process cannot mix the interpreter and compiled kernels."""
import os

import pytest
import torch

import fxforge  # noqa: F401  (sets TRITON_INTERPRET=1 itself when CUDA is absent)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if INTERPRETED or not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CPU-interpreter test: run with TRITON_INTERPRET=1 on a CUDA machine")
    for item in items:
        if "gpu" not in item.keywords:
            item.add_marker(skip)
