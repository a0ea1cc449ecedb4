"""Load generated Triton source as modules, and launch them.

Sources are written under ``<cache_dir>/kernels/<key>/`` where the key hashes the source with the
fxforge, torch and triton versions, the config and the device type; Triton's own cache then keeps
the compiled binaries. On the CPU the kernels run through Triton's interpreter: ``triton.jit``
decides at decoration time, so the module is imported with ``TRITON_INTERPRET=1`` set.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch

_lock = threading.Lock()
_loaded: dict[tuple[str, str], object] = {}


def interpreter_active() -> bool:
    """Triton reads TRITON_INTERPRET when it is imported (its standard library is jit-decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=16)
def cuda_capability(index: int) -> tuple[int, int]:
    """torch.cuda.get_device_capability, cached per device index (~7 us a call on a kernel's hot path)."""
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=16)
def cuda_sm_count(index: int) -> int:
    """Streaming multiprocessors of a CUDA device, cached per device index."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_index(device) -> int:
    """The CUDA device index of ``device`` (a torch.device or its string; no index: the current device)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device_index: {device} is not a CUDA device")
    return device.index if device.index is not None else torch.cuda.current_device()


def pdl_capable(device) -> bool:
    """Programmatic dependent launch (griddepcontrol): NVIDIA sm_90 and later with triton >= 3.4; never in
    the interpreter (also not with CUDA tensors under TRITON_INTERPRET=1) and not on ROCm, whose capability
    numbers mean something else."""
    from fxforge.codegen.quant_helpers import HAS_GDC

    return (device.type == "cuda" and HAS_GDC and torch.version.hip is None and not interpreter_active()
            and cuda_capability(device_index(device))[0] >= 9)


def versions() -> dict:
    import triton
    from fxforge import __version__

    return {"fxforge": __version__, "torch": torch.__version__, "triton": triton.__version__}


def kernel_key(source: str, device_type: str, config_id: str = "") -> str:
    v = versions()
    blob = "\n".join([source, device_type, config_id, v["fxforge"], v["torch"], v["triton"]])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=64)
def template_kernels(template: str, names: tuple, device_type: str, cache_dir: str, kernel_name: str | None = None) -> tuple:
    """The ``@triton.jit`` functions ``names`` of a kernel template file (``FXFORGE_KERNEL_NAME`` replaced
    by ``kernel_name`` when given), loaded once per (template, device, cache): callers on hot paths
    (an executor step, a custom op call) neither re-read the file nor re-hash its source."""
    src = Path(template).read_text()
    if kernel_name is not None:
        src = src.replace("FXFORGE_KERNEL_NAME", kernel_name)
    return tuple(load_kernel(n, src, device_type, cache_dir) for n in names)


def load_kernel(name: str, source: str, device_type: str, cache_dir: str, config_id: str = ""):
    """The ``@triton.jit`` function ``name`` defined by ``source``, compiled for ``device_type``."""
    key = kernel_key(source, device_type, config_id)
    with _lock:
        if (key, name) in _loaded:
            return _loaded[(key, name)]
        d = Path(cache_dir) / "kernels" / key
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.py"
        if not path.exists() or path.read_text() != source:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(source)
            tmp.replace(path)
        mod_name = f"fxforge_kernels.{key}.{name}.{device_type}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        if device_type == "cpu" and not interpreter_active():
            from fxforge.errors import FxforgeError

            raise FxforgeError("CPU tensors run Triton kernels through its interpreter: set TRITON_INTERPRET=1 before "
                               "triton is imported (fxforge sets it itself when imported first on a machine without CUDA)")
        spec.loader.exec_module(module)
        sys.modules[mod_name] = module
        fn = getattr(module, name)
        _loaded[(key, name)] = fn
        return fn


INT32_MAX = 2**31 - 1
GEMV_MAX_M = 4  # matmuls with at most this many rows use the GEMV branch (decode)


def max_offset(t) -> int:
    """Largest element offset a kernel computes for tensor ``t`` (bounds 32-bit index math)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def launch_config(kind: str, launch: dict, interpreted: bool) -> tuple[tuple, dict]:
    """Grid and constexpr/launch kwargs for a kernel step, from its evaluated sizes."""
    if kind == "pointwise":
        xn = launch["xnumel"]
        xb = min(next_pow2(xn), 8192 if interpreted else 1024)
        kw = {"XBLOCK": xb, "INDEX64": False, "INTERPRETED": interpreted}
        if not interpreted:
            kw["num_warps"] = 4 if xb >= 512 else 2
        return ((xn + xb - 1) // xb,), kw
    if kind == "reduction":
        xn, rn = launch["xnumel"], launch["rnumel"]
        rb = next_pow2(rn)
        budget = 65536 if interpreted else 4096
        xb = max(1, min(next_pow2(xn), budget // rb, 64))
        kw = {"XBLOCK": xb, "RBLOCK": rb, "INDEX64": False, "INTERPRETED": interpreted}
        if not interpreted:  # long rows: more warps so each thread holds at most ~64 values
            kw["num_warps"] = 16 if rb >= 8192 else 8 if rb >= 2048 else 4
        return ((xn + xb - 1) // xb,), kw
    if kind == "matmul":
        M, N, K, B = launch["M"], launch["N"], launch["K"], launch["batch"]
        gemv = M <= GEMV_MAX_M
        if gemv:  # decode-sized: the CUDA-core GEMV branch (small tiles in the interpreter)
            bm, bn, bk = next_pow2(M), 4, 32 if interpreted else (1024 if M == 1 else 256)
        else:
            bm = 16 if M <= 16 else 32 if M <= 32 else 64 if (interpreted or M <= 64) else 128
            bn = 32 if N <= 32 else 64 if (interpreted or N <= 64) else 128
            bk = 32 if K <= 32 else 64
        kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EXTERNAL_ACC": False, "GEMV": gemv,
              "EVEN_K": gemv and K % bk == 0, "INTERPRETED": interpreted}
        if not interpreted:
            kw["num_warps"] = 8 if bm * bn >= 128 * 128 else 4
            kw["num_stages"] = 1 if gemv else 3
        grid = (((M + bm - 1) // bm) * ((N + bn - 1) // bn), B)
        return grid, kw
    raise ValueError(f"unknown kernel kind {kind!r}")


def first_that_fits(fallbacks: dict, key, cands: list, run, what: str):
    """``run(cands[i])`` for the first config that launches, starting from the one remembered for ``key``:
    a launch failing with Triton's OutOfResources (e.g. shared memory of a large tile on this GPU) moves
    on to the next config, recorded in ``fallbacks[key]`` and warned about; the last one's error propagates."""
    import warnings

    from triton.runtime.errors import OutOfResources

    for i in range(fallbacks.get(key, {}).get("index", 0), len(cands)):
        try:
            return run(cands[i])
        except OutOfResources as e:
            if i + 1 == len(cands):
                raise
            fallbacks[key] = {"index": i + 1, "failed": cands[i], "error": str(e).splitlines()[0][:200]}
            warnings.warn(f"{what}: config {cands[i]} out of resources ({e}); trying {cands[i + 1]}", stacklevel=3)
    raise ValueError(f"{what}: no launch config")  # an empty candidate list
