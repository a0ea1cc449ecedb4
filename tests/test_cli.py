"""The command line: run / compile / explain / search-winograd, called through ``fxforge.cli.main``."""
import json

import fxforge
import pytest
import torch
from fxforge.cli import main


def test_run_compile_explain(tmp_path, capsys):
    assert main(["run", "--model", "mlp", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "fxforge run" in out and "mlp" in out
    assert main(["compile", "vit_block", "-o", str(tmp_path / "vb")]) == 0
    loaded = fxforge.load(tmp_path / "vb")
    x = fxforge.models.get_builtin("vit_block").example_inputs(2, "cpu", torch.float32)
    assert loaded(*x).shape == x[0].shape
    capsys.readouterr()
    assert main(["explain", "llama_block", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{\n"):])
    assert report["kernels"] and all("reason" in f for f in report["fallbacks"])


def test_compile_module_attr_and_bad_specs(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval(), (torch.randn(3, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["compile", "user_models:tiny", "-o", str(tmp_path / "tiny")]) == 0
    assert fxforge.load(tmp_path / "tiny")(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(SystemExit, match="must be \\(module, example_inputs\\)"):
        main(["compile", "fxforge.models:MLP", "-o", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="unknown model"):
        main(["explain", "no_such_model"])


def test_search_winograd_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["search-winograd", "--m", "4", "--r", "3", "--dtype", "fp16"]) == 0
    assert any(p.suffix == ".json" for p in tmp_path.iterdir())


def test_quantize_prints_and_writes_the_model_report(tmp_path, capsys):
    path = tmp_path / "q.json"
    assert main(["quantize", "mlp", "--format", "w8a16", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "output rel err vs the float model" in out
    doc = json.loads(path.read_text())
    assert doc["format"] == "w8a16" and doc["layers"] and doc["output_rel_err"] < 0.02
    assert doc["weight_bytes_after"] < doc["weight_bytes_before"]
    assert all(layer["sqnr_db"] > 35 for layer in doc["layers"])  # int8 per-channel
    assert "speed on cpu" in out and doc["speed"]["ms_float"] > 0 and doc["speed"]["ms_quantized"] > 0
    assert main(["quantize", "mlp", "--format", "w8a16", "--reps", "0", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["speed"] is None
