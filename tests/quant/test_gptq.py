"""GPTQ rounding keeps each layer's output closer than round-to-nearest, at the same scales and bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cetopt
from cetopt.quant import gptq_round
from cetopt.serialization import save


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 12, 6),
    ).eval()


def _conv2d_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.Flatten(),
        nn.Linear(32, 3),
    ).eval()


def _batches(shape, n=4):
    g = torch.Generator().manual_seed(1)
    # correlated inputs: what makes error compensation pay off
    return [(torch.randn(32, *shape, generator=g).cumsum(-1) * 0.3, torch.zeros(32)) for _ in range(n)]


def _layer_error(original, quantized, name, data):
    layer, qlayer = dict(original.named_modules())[name], dict(quantized.named_modules())[name]
    inputs = []
    handle = layer.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for x, _ in data:
            original(x)
        handle.remove()
        x = torch.cat(inputs)
        return float(((qlayer(x) - layer(x)) ** 2).sum())


def test_gptq_lowers_every_layers_output_error_and_keeps_scales_and_bits():
    model, data = _net(), _batches((2, 12))
    plain = cetopt.quantize(model, {"0": 3, "3": 2})
    rounded = gptq_round(model, plain, data)
    for name in ("0", "3"):
        assert _layer_error(model, rounded, name, data) < 0.9 * _layer_error(model, plain, name, data)
        a, b = dict(plain.named_modules())[name], dict(rounded.named_modules())[name]
        assert torch.equal(a.weight_scale, b.weight_scale)
        assert torch.equal(a.weight_bits, b.weight_bits)
        qmax = (2 ** (b.weight_bits.long() - 1) - 1)[:, None]
        codes = b.weight_q.reshape(len(qmax), -1)
        assert bool(((-qmax - 1 <= codes) & (codes <= qmax)).all())


def test_gptq_keeps_the_saved_size(tmp_path):
    model, data = _net(), _batches((2, 12))
    plain = cetopt.quantize(model, {"0": 3, "3": 2})
    rounded = cetopt.quantize(model, {"0": 3, "3": 2}, gptq=data)
    a = save(plain, tmp_path / "a.safetensors").quantized_bytes
    b = save(rounded, tmp_path / "b.safetensors").quantized_bytes
    assert a == b


def test_conv2d_and_a_grouped_conv_are_rounded_group_by_group():
    model, data = _conv2d_net(), _batches((3, 7, 7))
    plain = cetopt.quantize(model, {"0": 2, "2": 2, "4": 2})
    rounded = gptq_round(model, plain, data)
    assert _layer_error(model, rounded, "0", data) < _layer_error(model, plain, "0", data)
    # the grouped convolution: each group of output channels against its own inputs' Gram
    assert _layer_error(model, rounded, "2", data) < _layer_error(model, plain, "2", data)


def test_inputs_are_not_modified_and_bad_data_is_named():
    model, data = _net(), _batches((2, 12))
    plain = cetopt.quantize(model, {"0": 3})
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_plain = {k: v.clone() for k, v in plain.state_dict().items()}
    gptq_round(model, plain, data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_model.items())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before_plain.items())
    with pytest.raises(cetopt.errors.DataShapeError, match="cannot run"):
        gptq_round(model, plain, [(torch.randn(4, 5, 12), None)])
    with pytest.raises(cetopt.errors.DataShapeError, match="no batches"):
        gptq_round(model, plain, [])


def test_inverse_upper_cholesky_is_the_upper_factor_of_the_inverse():
    from cetopt.quant.gptq import inverse_upper_cholesky

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, dtype=torch.float64, generator=g)
    h = x.T @ x + 0.1 * torch.eye(12, dtype=torch.float64)
    upper = inverse_upper_cholesky(h)
    assert torch.equal(upper, torch.triu(upper)) and bool((torch.diagonal(upper) > 0).all())
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(upper, expected, rtol=1e-10, atol=1e-12)
