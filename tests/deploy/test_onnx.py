import numpy as np
import pytest
import torch

import cetopt
from cetopt.deploy import calibrate_activations, export_onnx, runtime

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
    codes = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # convolutions U8S8, Linear layers U8U8
    weights = [t for t in graph.graph.initializer if t.data_type in codes and len(t.dims) >= 2]
    assert len(weights) == len(result.quantized_layers)  # one 8-bit initializer per quantized weight
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
    qdq = onnx_session(result.path)
    fake = runtime(q, "fake-int8", activations=result.activation_ranges)
    for shape in [(5, 12), (3, 7), (1, 20)]:  # other batch sizes and sequence lengths
        other = torch.randint(0, 128, shape)
        with torch.no_grad():
            expected, expected_fake = q(other).numpy(), fake(other).numpy()
        got = fp32.run(None, {"input0": other.numpy()})[0]
        assert got.shape == (*shape, 128)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        got = qdq.run(None, {"input0": other.numpy()})[0]
        assert np.abs(got - expected_fake).max() <= result.tolerance


def _saturating_layer():
    """Every code ±127/−128 and large uint8 inputs: full-range U8S8 int16 pair sums would saturate."""
    from cetopt.deploy.runtime import deployment_model
    from tests.deploy.conftest import quantize_all

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.where(torch.rand(32, 64) < 0.5, 1.0, -1.0))
    q = quantize_all(model, 8)
    codes = deployment_model(q).get_submodule("0").codes
    assert int(codes.abs().min()) >= 127  # every code at the end of the int8 range
    x = torch.rand(4, 16, 64) * 4  # a positive range: uint8 codes up to 255 on a full grid
    return q, x


def test_saturating_layer_is_exact_in_u8s8_with_the_reduced_input_range(tmp_path):
    q, x = _saturating_layer()
    result = export_onnx(q, tmp_path / "m.onnx", x, calibration=[x])
    assert result.activation_range == {"0": "reduced"}
    assert result.weight_format == {"0": "u8s8"}
    step = float(result.activation_ranges.outputs["0"].scale)
    # the int32 accumulator is exact; the requantization can differ at a rounding tie (1 step)
    assert result.max_abs_diff <= step * 1.001
    graph = onnx.load(result.path)
    weight = next(t for t in graph.graph.initializer if len(t.dims) == 2)
    assert weight.data_type == onnx.TensorProto.INT8
    assert any(n.op_type == "Clip" for n in graph.graph.node)  # the inputs' top code is 127
    # inputs beyond the calibrated range are clamped to code 127 by onnxruntime as by fake-int8
    from cetopt.deploy.onnx_export import onnx_session

    fake = cetopt.runtime(q, "fake-int8", activations=result.activation_ranges)
    big = x * 3
    got = onnx_session(result.path).run(None, {"input0": big.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - fake(big).numpy()).max() <= step * 1.001
    # the full 8-bit input range falls back to U8U8, which is exact too
    full = export_onnx(q, tmp_path / "f.onnx", x, calibration=[x], activation_range="full")
    assert full.weight_format == {"0": "u8u8"} and full.activation_range == {"0": "full"}
    assert full.max_abs_diff <= step * 1.001
    with pytest.raises(ValueError, match="weight_format"):
        export_onnx(q, tmp_path / "n.onnx", x, calibration=[x], weight_format="s8s8")
    with pytest.raises(ValueError, match="activation_range"):
        export_onnx(q, tmp_path / "n.onnx", x, calibration=[x], activation_range="half")


@torch.no_grad()
def test_saturating_layer_is_exact_in_torch_int8_mode():
    q, x = _saturating_layer()
    ranges = calibrate_activations(q, [x])
    fake = cetopt.runtime(q, "fake-int8", activations=ranges)
    kernel = cetopt.runtime(q, "int8", activations=ranges)
    assert kernel.activation_range == {"0": "reduced"} == fake.activation_range
    assert kernel.get_submodule("0").act_in.reduced_range and kernel.get_submodule("0").act_in.qmax == 127
    step = float(ranges.outputs["0"].scale)
    for inputs in (x, x * 3):  # also beyond the calibrated range: clamped to code 127
        assert (kernel(inputs) - fake(inputs)).abs().max() <= step * 1.001
    # dynamic: linear_dynamic(reduce_range=True) against its fake-quant definition
    dyn, dyn_fake = cetopt.runtime(q, "int8"), cetopt.runtime(q, "fake-int8")
    ref = dyn_fake(x)
    assert (dyn(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_u8u8_convolutions_match_exactly(tiny, tmp_path):
    _, q, x = tiny
    ranges = calibrate_activations(q, [x])
    result = export_onnx(q, tmp_path / "m.onnx", x[:4], activations=ranges, weight_format="u8u8")
    types = {t.data_type for t in onnx.load(result.path).graph.initializer if len(t.dims) >= 2}
    assert types == {onnx.TensorProto.UINT8}
    assert result.max_abs_diff <= float(ranges.outputs["out"].scale) * 1.001


def test_missing_onnx_is_a_named_error(tiny, tmp_path, monkeypatch):
    import sys

    from cetopt.errors import MissingDependencyError

    _, q, x = tiny
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"'onnx'.*cetopt\[onnx\]"):
        export_onnx(q, tmp_path / "m.onnx", x[:2], calibration=[x])
    assert not (tmp_path / "m.onnx").exists()


def test_auto_range_reduces_only_the_inputs_of_layers_that_could_saturate(tiny, tmp_path):
    from cetopt.deploy.onnx_export import u8s8_is_exact
    from cetopt.deploy.runtime import deployment_model
    from tests.deploy.conftest import quantize_all

    model, q4, x = tiny
    assert all(u8s8_is_exact(m) for m in deployment_model(q4).modules() if hasattr(m, "codes"))
    q8 = quantize_all(model, 8)
    assert not any(u8s8_is_exact(m) for m in deployment_model(q8).modules() if hasattr(m, "codes"))
    cases = (
        (q4, "auto", onnx.TensorProto.INT8, "full"),
        (q8, "auto", onnx.TensorProto.INT8, "reduced"),
        (q8, "full", onnx.TensorProto.UINT8, "full"),
    )
    for q, activation_range, kind, applied in cases:
        result = export_onnx(
            q, tmp_path / "m.onnx", x[:4], calibration=[x], activation_range=activation_range
        )
        types = {t.data_type for t in onnx.load(result.path).graph.initializer if len(t.dims) >= 2}
        assert types == {kind}
        assert set(result.activation_range.values()) == {applied}
        assert result.max_abs_diff <= result.tolerance
        ranges = result.activation_ranges
        fake = cetopt.runtime(q, "fake-int8", activations=ranges, activation_range=activation_range)
        assert set(fake.activation_range.values()) == {applied}
