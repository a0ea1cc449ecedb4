"""Save → load → run, guards on the AOT path, and the documented errors for bad artifacts."""
import json

import fxforge  # noqa: F401
import pytest
import torch
from fxforge import ArtifactError, SignatureMismatch
from fxforge.models import get_builtin


@pytest.fixture(scope="module")
def compiled_vit_block():
    b = get_builtin("vit_block")
    model, x = b.factory(0), b.example_inputs(2, "cpu", torch.float32)
    return fxforge.compile(model, x), x


def test_save_load_identical_outputs(tmp_path, compiled_vit_block):
    compiled, x = compiled_vit_block
    fxforge.save(compiled, tmp_path / "a")
    loaded = fxforge.load(tmp_path / "a")
    assert torch.equal(loaded(*x), compiled(*x))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["program"]["kernels"] and all(f.endswith((".py", ".safetensors")) for f in manifest["files"])
    assert not any(p.suffix in (".pt", ".pkl", ".pickle") for p in (tmp_path / "a").rglob("*"))


def test_loaded_artifact_needs_no_export_or_passes(tmp_path, compiled_vit_block, monkeypatch):
    compiled, x = compiled_vit_block
    fxforge.save(compiled, tmp_path / "a")

    def boom(*a, **k):
        raise AssertionError("load must not re-capture or re-run passes")
    monkeypatch.setattr(torch.export, "export", boom)
    monkeypatch.setattr(fxforge.pipeline.Pipeline, "run", boom)
    assert torch.equal(fxforge.load(tmp_path / "a")(*x), compiled(*x))


def test_wrong_shape_call_raises_signature_mismatch(compiled_vit_block):
    compiled, x = compiled_vit_block
    with pytest.raises(SignatureMismatch, match=r"has shape \[2, 9, 64\], expected \[2, 17, 64\].*Compiled for"):
        compiled(torch.randn(2, 9, 64))
    with pytest.raises(SignatureMismatch, match="dtype"):
        compiled(x[0].double())
    with pytest.raises(SignatureMismatch, match="expected 1 inputs, got 2"):
        compiled(x[0], x[0])  # an extra argument is an error, never silently dropped


def test_corrupt_kernel_file_is_a_checksum_error(tmp_path, compiled_vit_block):
    compiled, _ = compiled_vit_block
    root = fxforge.save(compiled, tmp_path / "a")
    k = next((root / "kernels").glob("*.py"))
    k.write_text(k.read_text() + "\n# tampered\n")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        fxforge.load(root)


def test_corrupt_weights_and_manifest(tmp_path, compiled_vit_block):
    compiled, _ = compiled_vit_block
    root = fxforge.save(compiled, tmp_path / "a")
    w = root / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for weights.safetensors"):
        fxforge.load(root)
    (root / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        fxforge.load(root)


def test_missing_file_and_version_mismatch(tmp_path, compiled_vit_block):
    compiled, _ = compiled_vit_block
    root = fxforge.save(compiled, tmp_path / "a")
    next((root / "kernels").glob("*.py")).unlink()
    with pytest.raises(ArtifactError, match="missing file kernels/"):
        fxforge.load(root)
    root = fxforge.save(compiled, tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    m["versions"]["triton"] = "0.1.0"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="built with triton 0.1.0"):
        fxforge.load(root)
    with pytest.raises(ArtifactError, match="not an fxforge artifact"):
        fxforge.load(tmp_path / "nothing-here")


def test_builtin_llama_roundtrip_with_int_inputs(tmp_path):
    b = get_builtin("llama")
    model, ids = b.factory(0), b.example_inputs(1, "cpu", torch.float32)
    compiled = fxforge.compile(model, ids)
    loaded = fxforge.load(fxforge.save(compiled, tmp_path / "llama"))
    assert torch.equal(loaded(*ids), compiled(*ids))
    with pytest.raises(SignatureMismatch, match="dtype"):
        loaded(ids[0].to(torch.int32))
