"""Bias correction cancels each quantized layer's mean output shift on the calibration data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cetopt
from cetopt.errors import CetoptError
from cetopt.quant import correct_bias


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 4),
    ).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(16, 3, 5, 5, generator=g) + 0.5, torch.zeros(16, dtype=torch.long)) for _ in range(3)]


def _mean_shift(original, quantized, name, data):
    """Per-channel mean of (quantized layer − float layer) on the float model's inputs."""
    inputs = []
    layer = dict(original.named_modules())[name]
    handle = layer.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for x, _ in data:
            original(x)
    handle.remove()
    x = torch.cat(inputs)
    with torch.no_grad():
        diff = dict(quantized.named_modules())[name](x) - layer(x)
    return diff.mean(dim=[0, *range(2, diff.dim())])


def test_the_mean_output_shift_of_every_quantized_layer_is_cancelled():
    model, data = _net(), _batches()
    plain = cetopt.quantize(model, {"0": 2, "4": 2})
    corrected = cetopt.quantize(model, {"0": 2, "4": 2}, bias_correction=data)
    for name in ("0", "4"):
        before = _mean_shift(model, plain, name, data)
        after = _mean_shift(model, corrected, name, data)
        assert before.abs().max() > 1e-3  # rounding did shift the mean: the check can fail
        torch.testing.assert_close(after, torch.zeros_like(after), atol=1e-5, rtol=0)


def test_biases_are_added_only_when_correcting_and_the_original_is_untouched():
    model, data = _net(), _batches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert cetopt.quantize(model, {"0": 4})[0].bias is None
    assert cetopt.quantize(model, {"0": 4}, bias_correction=data)[0].bias is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_a_corrected_model_round_trips_exactly(tmp_path):
    model, data = _net(), _batches()
    corrected = cetopt.quantize(model, {"0": 3, "4": 3}, bias_correction=data)
    cetopt.save(corrected, tmp_path / "m.safetensors", source="x:y")
    restored = cetopt.load(tmp_path / "m.safetensors", model=_net())
    x = data[0][0]
    assert torch.equal(restored(x), corrected(x))


def test_layers_without_bias_are_refused():
    model = _net()
    with pytest.raises(CetoptError, match="bias_correction"):
        correct_bias(model, cetopt.quantize(model, {"0": 4}), _batches())


def test_a_linear_layer_on_sequences_is_corrected_per_output_feature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    g = torch.Generator().manual_seed(2)
    data = [(torch.rand(4, 7, 6, generator=g) + 0.5, None) for _ in range(3)]
    x = torch.cat([b[0] for b in data])

    def shift(quantized):
        with torch.no_grad():
            return (dict(quantized.named_modules())["0"](x) - model[0](x)).reshape(-1, 5).mean(dim=0)

    assert float(shift(cetopt.quantize(model, {"0": 2})).abs().max()) > 1e-3
    assert float(shift(cetopt.quantize(model, {"0": 2}, bias_correction=data)).abs().max()) < 1e-5
