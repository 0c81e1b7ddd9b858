"""Sequential calibration: each layer is calibrated on the inputs the quantized model gives it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cetopt
from cetopt.graph.decisions import Quantize
from cetopt.graph.rewriter import rewrite
from cetopt.quant import calibrate_sequentially, correct_bias, gptq_round
from cetopt.quant.gptq import input_gram, reround
from cetopt.serialization import load, save


class _ReversedNet(nn.Module):
    """Registers its classifier before the convolution that feeds it: execution order ≠ registration order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8 * 12, 6)
        self.conv = nn.Conv1d(2, 8, 5, padding=2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 2, 12, generator=g).cumsum(-1) * 0.3, torch.zeros(32)) for _ in range(n)]


def _mean_logits(model, data):
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in data]).double().mean(0)


def _quantized(model, bits=2):
    """Round to nearest, with biases (what ``quantize(..., bias_correction=data)`` starts from)."""
    return rewrite(model, [Quantize(name, bits, True, True) for name in ("conv", "head")])


def test_the_last_layers_mean_output_matches_the_float_models_only_when_sequential():
    model, data = _ReversedNet().eval(), _data()
    quantized = _quantized(model)
    sequential = calibrate_sequentially(model, quantized, data, gptq=False)
    at_once = correct_bias(model, quantized, data)
    target = _mean_logits(model, data)
    assert torch.allclose(_mean_logits(sequential, data), target, atol=1e-5)
    # the one-pass correction leaves the shift the 2-bit convolution causes downstream
    assert (_mean_logits(at_once, data) - target).abs().max() > 1e-3


def test_each_layer_is_rounded_with_the_gram_of_its_quantized_inputs():
    model, data = _ReversedNet().eval(), _data()
    quantized = _quantized(model, bits=3)
    result = calibrate_sequentially(model, quantized, data, bias_correction=False)
    layers = dict(result.named_modules())
    # the first layer to run sees the float inputs: plain GPTQ
    first = dict(gptq_round(model, quantized, data).named_modules())["conv"]
    assert torch.equal(layers["conv"].weight_q, first.weight_q)
    # the next one: GPTQ with the Gram of the inputs the re-rounded convolution gives it
    expected = dict(quantized.named_modules())["head"]
    gram = input_gram(result, ["head"], data, None, {"head": model.head})["head"]
    reround(expected, model.head.weight, gram, 0.01)
    assert torch.equal(layers["head"].weight_q, expected.weight_q)
    assert not torch.equal(
        layers["head"].weight_q, dict(gptq_round(model, quantized, data).named_modules())["head"].weight_q
    )
    for name in ("conv", "head"):
        before = dict(quantized.named_modules())[name]
        assert torch.equal(layers[name].weight_scale, before.weight_scale)
        assert torch.equal(layers[name].weight_bits, before.weight_bits)


def test_inputs_are_not_modified_and_the_result_round_trips(tmp_path):
    model, data = _ReversedNet().eval(), _data()
    quantized = _quantized(model)
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_quant = {k: v.clone() for k, v in quantized.state_dict().items()}
    result = calibrate_sequentially(model, quantized, data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_model.items())
    assert all(torch.equal(v, quantized.state_dict()[k]) for k, v in before_quant.items())
    save(result, tmp_path / "m.safetensors")
    x = data[0][0]
    assert torch.equal(load(tmp_path / "m.safetensors", model=_ReversedNet())(x), result(x))


def test_quantize_sequential_equals_calibrate_sequentially_and_checks_its_data():
    model, data = _ReversedNet().eval(), _data()
    bits = {"conv": 3, "head": 2}
    direct = cetopt.quantize(model, bits, gptq=data, bias_correction=data, sequential=True)
    plain = rewrite(model, [Quantize(name, b, True, True) for name, b in bits.items()])
    manual = calibrate_sequentially(model, plain, data)
    x = data[0][0]
    assert torch.equal(direct(x), manual(x))
    with pytest.raises(ValueError, match="needs calibration data"):
        cetopt.quantize(model, bits, sequential=True)
    with pytest.raises(TypeError, match="one-shot generator"):
        cetopt.quantize(model, bits, gptq=(b for b in data), sequential=True)
    with pytest.raises(ValueError, match="one data set"):
        cetopt.quantize(model, bits, gptq=data, bias_correction=_data(2), sequential=True)


def test_a_layer_without_bias_is_named_when_bias_correction_is_asked():
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    plain = cetopt.quantize(model, {"0": 2})
    with pytest.raises(cetopt.errors.CetoptError, match="without a bias"):
        calibrate_sequentially(model, plain, [(torch.randn(5, 4), None)])


def test_compress_calibrates_sequentially_unless_told_otherwise():
    model = _ReversedNet().eval()
    g = torch.Generator().manual_seed(2)
    data = [(x, torch.randint(0, 6, (32,), generator=g)) for x, _ in _data()]
    options = {"bits": (2, 3, 4), "probes": 4, "progress": False}
    default = cetopt.compress(model, data, "8x", **options)
    one_pass = cetopt.compress(model, data, "8x", sequential=False, **options)
    assert default.plan.bits == one_pass.plan.bits
    bits = default.plan.bits
    sequential = cetopt.quantize(model, bits, gptq=data, bias_correction=data, sequential=True)
    at_once = cetopt.quantize(model, bits, gptq=data, bias_correction=data)
    x = data[0][0]
    assert torch.equal(default.model(x), sequential(x))
    assert torch.equal(one_pass.model(x), at_once(x))
    assert not torch.equal(default.model(x), one_pass.model(x))
