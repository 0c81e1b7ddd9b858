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
    before = {k: v.clone() for k, v in q.state_dict().items()}
    result = export_onnx(q, path, x[:2], calibration=[x])
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # model untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert result.max_abs_diff <= result.tolerance
    dq = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "axis" for n in dq for a in n.attribute)  # per-channel weight scales
    assert np.isfinite(result.max_abs_diff)


def test_llama_style_model_exports_and_matches(tmp_path):
    """An HF Llama (its mask calls aten::diff and a bool cumsum) exports, fp32 and QDQ, batch dynamic."""
    transformers = pytest.importorskip("transformers")
    from cetopt.deploy.onnx_export import export_float_onnx, onnx_session
    from tests.deploy.conftest import quantize_all

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    q = quantize_all(Logits().eval(), 8)
    ids = torch.randint(0, 128, (2, 12))
    result = export_onnx(q, tmp_path / "qdq.onnx", ids)
    assert result.float_layers == [] and result.max_abs_diff <= result.tolerance
    fp32 = onnx_session(export_float_onnx(q, tmp_path / "fp32.onnx", ids))
    other = torch.randint(0, 128, (5, 12))  # another batch size
    with torch.no_grad():
        expected = q(other).numpy()
    got = fp32.run(None, {"input0": other.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    qdq = onnx_session(result.path).run(None, {"input0": other.numpy()})[0]
    assert np.abs(qdq - expected).max() <= 0.2 * np.abs(expected).max()


def test_missing_onnx_is_a_named_error(tiny, tmp_path, monkeypatch):
    import sys

    from cetopt.errors import MissingDependencyError

    _, q, x = tiny
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"'onnx'.*cetopt\[onnx\]"):
        export_onnx(q, tmp_path / "m.onnx", x[:2], calibration=[x])
    assert not (tmp_path / "m.onnx").exists()
