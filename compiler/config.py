"""Typed configuration for fxforge; every knob can be set from the environment as ``FXFORGE_<NAME>``.

One dataclass, one place: the pass list, the debug switch and the codegen limits all live here, and
``Config.cache_id()`` is part of every cache key so that a changed knob never reuses stale kernels.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_PASSES = ("remove_noops", "patch_conv", "dce", "cse", "cat_sign", "reinplace", "gqa_attention", "merge_linears", "constant_fold", "dce")


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fxforge")


@dataclass
class Config:
    passes: tuple[str, ...] = DEFAULT_PASSES
    debug: bool = False  # dump graphs per pass + Triton source, check numerics after every pass
    debug_dir: str = "fxforge_debug"
    cache_dir: str = field(default_factory=_default_cache_dir)
    # Largest reduction length kept whole in registers (persistent reduction); longer ones loop.
    max_persistent_rblock: int = 32768
    fuse: bool = True  # False: one kernel per op (useful to bisect fusion bugs)
    matmul: bool = True  # False: mm/addmm/bmm run as eager ATen calls
    # "fuse": pointwise epilogues join the matmul kernel; "defer": the matmul stays bare (cuBLAS can
    # write it directly) and its epilogue fuses forward into the next kernel (e.g. residual add into
    # the following layer norm); "auto" (on CUDA): defer only the epilogues a following reduction
    # (norm, softmax) absorbs and keep the rest fused, where autotune weighs a TMA kernel with the
    # epilogue fused against cuBLAS + an epilogue launch; on the CPU: fuse.
    matmul_epilogue: str = "auto"
    memory_plan: bool = True
    # GPU: time kernel variants once per shape and cache the winner on disk. "fast": cuBLAS vs one
    # Triton config per matmul (few compiles); "max": the whole config list; "off": heuristics.
    autotune: str = "fast"
    cuda_graphs: str = "auto"  # "auto"/"on": capture static-shape programs on CUDA; "off"
    # Where to run Triton: "auto" uses the Triton CPU interpreter for CPU tensors.
    debug_rtol: float = 1e-2

    def __post_init__(self):
        from .errors import ConfigError

        aliases = {"0": "off", "false": "off", "no": "off", "1": "fast", "true": "fast", "yes": "fast"}
        self.autotune = aliases.get(str(self.autotune).lower(), str(self.autotune).lower()) if not isinstance(self.autotune, bool) \
            else ("fast" if self.autotune else "off")
        if self.autotune not in ("fast", "max", "off"):
            raise ConfigError(f"autotune must be 'fast', 'max' or 'off', got {self.autotune!r}")
        if self.matmul_epilogue not in ("auto", "fuse", "defer"):
            raise ConfigError(f"matmul_epilogue must be 'auto', 'fuse' or 'defer', got {self.matmul_epilogue!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graphs must be 'auto', 'on' or 'off', got {self.cuda_graphs!r}")
        if self.max_persistent_rblock < 1:
            raise ConfigError(f"max_persistent_rblock must be positive, got {self.max_persistent_rblock}")
        if isinstance(self.passes, str):
            raise ConfigError("passes must be a sequence of pass names, not a string")

    def cache_id(self) -> str:
        """Hash of every knob that changes generated code (not of paths or the debug switch)."""
        keyed = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("debug", "debug_dir", "cache_dir", "debug_rtol")}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


def _parse(value: str, current):
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return value


def from_env(base: Config | None = None, environ=os.environ) -> Config:
    """A Config with ``FXFORGE_<FIELD>`` environment variables applied over ``base``."""
    cfg = base or Config()
    changes = {}
    for f in fields(cfg):
        key = "FXFORGE_" + f.name.upper()
        if key in environ:
            try:
                changes[f.name] = _parse(environ[key], getattr(cfg, f.name))
            except ValueError as e:
                raise ValueError(f"invalid {key}={environ[key]!r}: {e}") from None
    return cfg.replace(**changes) if changes else cfg


_ENV_KEYS = tuple("FXFORGE_" + f.name.upper() for f in fields(Config)) + ("XDG_CACHE_HOME", "HOME")
_current: tuple = ((), None)  # (the environment values current() last saw, its Config)


def current() -> Config:
    """The environment's Config, parsed again only when one of the variables it depends on changed (parsing
    every knob took ~150 us per call on the H100 host); each caller gets its own shallow copy."""
    global _current
    key = tuple(map(os.environ.get, _ENV_KEYS))
    if _current[0] != key or _current[1] is None:
        _current = (key, from_env())
    return copy.copy(_current[1])


_cache_dir: tuple = ((), "")


def cache_dir() -> str:
    """``current().cache_dir`` from the three variables it depends on (a kernel loader's per-call question:
    current() reads every knob's variable, ~20 us on the H100 host)."""
    global _cache_dir
    key = (os.environ.get("FXFORGE_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))
    if _cache_dir[0] != key:
        _cache_dir = (key, key[0] if key[0] is not None else _default_cache_dir())
    return _cache_dir[1]
