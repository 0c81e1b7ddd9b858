import json

import pytest

from cetopt.cli import main

pytest.importorskip("onnxruntime")


def test_compress_with_activations_and_onnx_then_bench_latency(tmp_path, capsys):
    args = ["compress", "--model", "digits-mlp-2x25", "--budget", "10x", "--out", str(tmp_path)]
    assert main([*args, "--probes", "4", "--activations", "8", "--export", "onnx"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["activation_bits"] == 8
    assert abs(report["accuracy_activations"] - report["accuracy_compressed"]) < 0.02
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "activations.json").exists()
    saved = json.loads((tmp_path / "activations.json").read_text())  # resolved: the range choice too
    assert saved["shared_grids"] is True
    assert set(saved["activation_range"]) == {"layers.1", "layers.3", "layers.5"}
    assert set(saved["activation_range"].values()) <= {"reduced", "full"}
    capsys.readouterr()
    assert main(["bench-latency", str(tmp_path / "model.safetensors"), "--runs", "3", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    for mode in ("fp32", "dequant-cached", "int8", "weight-only"):
        assert mode in out
