"""Artifacts: a directory with ``manifest.json``, ``kernels/*.py`` and ``weights.safetensors``.

The manifest holds the format version, the fxforge/torch/triton versions, the program (steps,
signatures, memory plan), the compile report and a sha256 of every other file. Loading verifies
all of it and runs without torch.export or the pass pipeline. No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from safetensors.torch import load_file, save_file

from .config import Config
from .errors import ArtifactError
from .report import CompileReport

FORMAT = "fxforge-artifact"
FORMAT_VERSION = 1


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def save(compiled, path) -> Path:
    """Write ``compiled`` (from ``fxforge.compile``) to directory ``path``."""
    from fxforge.runtime.kernels import versions

    root = Path(path)
    (root / "kernels").mkdir(parents=True, exist_ok=True)
    prog = compiled.program.to_json()
    files = {}
    for name, k in prog["kernels"].items():
        rel = f"kernels/{name}.py"
        (root / rel).write_text(k["source"])
        files[rel] = _sha(root / rel)
        k["source"] = None  # stored in its own file
    weights = {k: t.detach().to("cpu").contiguous().clone() for k, t in compiled.constants.items()}
    save_file(weights, str(root / "weights.safetensors"))
    files["weights.safetensors"] = _sha(root / "weights.safetensors")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), "program": prog,
                "report": compiled.report.to_json(), "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


class LoadedModel:
    """A program loaded from an artifact; call it like the compiled model."""

    def __init__(self, program, constants, report, cache_dir: str):
        from fxforge.runtime.executor import Executor

        self.program, self.constants, self.report = program, constants, report
        self.executor = Executor(program, constants, cache_dir, report=report)
        self.out_spec = pytree.treespec_loads(program.out_spec) if program.out_spec else None

    def __call__(self, *args, **kwargs):
        from .api import call_program

        return call_program(self.executor, self.out_spec, args, kwargs)


def load(path, *, device: str | None = None, config: Config | None = None) -> LoadedModel:
    """Load an artifact; ``ArtifactError`` names what is wrong (missing file, checksum, version)."""
    from fxforge.runtime.kernels import versions
    from fxforge.runtime.program import Program

    root = Path(path)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{root}: not an fxforge artifact (missing manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{root}: unsupported artifact format {manifest.get('format')!r} v{manifest.get('format_version')}")
    have = versions()
    for lib in ("fxforge", "triton"):
        want = manifest["versions"].get(lib, "?")
        if _minor(want) != _minor(have[lib]):
            raise ArtifactError(f"{root}: built with {lib} {want}, this environment has {have[lib]}; recompile the model")
    for rel, digest in manifest["files"].items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"{root}: missing file {rel}")
        if _sha(f) != digest:
            raise ArtifactError(f"{root}: checksum mismatch for {rel} (file corrupt or modified)")
    prog_json = manifest["program"]
    for name, k in prog_json["kernels"].items():
        k["source"] = (root / f"kernels/{name}.py").read_text()
    try:
        program = Program.from_json(prog_json)
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{root}: malformed program in manifest ({e})") from None
    dev = device or program.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"{root}: compiled for {program.device} but CUDA is not available here")
    constants = load_file(str(root / "weights.safetensors"), device=dev)
    missing = set(program.constants) - set(constants)
    if missing:
        raise ArtifactError(f"{root}: weights missing from weights.safetensors: {sorted(missing)[:5]}")
    if device is not None:
        program.device = device
        for i in program.inputs:
            if i["sig"] is not None:
                i["sig"].device = device
    cfg = config or Config()
    return LoadedModel(program, constants, CompileReport(**manifest["report"]), cfg.cache_dir)
