import numpy as np
import pytest
import torch

from cetopt.deploy import calibrate_activations, export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def test_zoo_models_export_and_match_in_onnxruntime(any_zoo_case, tmp_path):
    name, _, q, data = any_zoo_case
    ranges = calibrate_activations(q, data.loader("val", batch_size=512))
    result = export_onnx(q, tmp_path / f"{name}.onnx", data.x_val[:8], activations=ranges)
    assert result.float_layers == [] and result.max_abs_diff <= result.tolerance
    graph = onnx.load(result.path)
    ops = [n.op_type for n in graph.graph.node]
    # an input and an output pair per layer; layers reading the same tensor share one (CSE)
    assert ops.count("QuantizeLinear") >= len(result.quantized_layers) + 1
    weights = {t.name: t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert len(weights) == len(result.quantized_layers)  # one int8 initializer per quantized weight
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    x = data.x_test[:512]
    logits = session.run(None, {"input0": x.numpy()})[0]
    with torch.no_grad():
        agree = (logits.argmax(-1) == q(x).argmax(-1).numpy()).mean()
    assert agree > 0.9


def test_export_is_atomic_and_leaves_no_temporary_files(tiny, tmp_path):
    _, q, x = tiny
    path = tmp_path / "m.onnx"
    result = export_onnx(q, path, x[:2], calibration=[x])
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert result.max_abs_diff <= result.tolerance
    dq = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "axis" for n in dq for a in n.attribute)  # per-channel weight scales
    assert np.isfinite(result.max_abs_diff)
