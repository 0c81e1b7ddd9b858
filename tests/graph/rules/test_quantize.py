import pytest
import torch
from torch import nn

from cetopt.errors import RewriteError
from cetopt.graph import Quantize, rewrite
from cetopt.nn import QuantizedConv, QuantizedLinear
from tests.graph.models import KINDS, example


def quantizable(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("bits", [16, 24, 32])
@pytest.mark.parametrize("kind", KINDS)
def test_quantizing_at_16_bits_or_more_is_close_to_identity(kind, bits):
    model, x = example(kind)
    layers = quantizable(model)  # includes attention's out_proj, which MHA reads by attribute
    new = rewrite(model, [Quantize(name, bits) for name in layers])
    assert all(isinstance(new.get_submodule(n), (QuantizedLinear, QuantizedConv)) for n in layers)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)


def test_codes_are_stored_as_small_integers_and_state_dict_round_trips():
    model, x = example("cnn")
    new = rewrite(model, [Quantize("conv1", 4), Quantize("fc", [3] * 8 + [8] * 8)])
    codes = new.conv1.weight_q
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert new.fc.weight_bits.tolist() == [3] * 8 + [8] * 8
    clone = rewrite(model, [Quantize("conv1", 4), Quantize("fc", [3] * 8 + [8] * 8)])
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    clone.load_state_dict(new.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(x), new(x))


def test_leaf_swaps_keep_the_users_class_and_need_no_trace():
    model, _x = example("resnet")
    new = rewrite(model, [Quantize("layer1.conv1", 8)])
    assert type(new) is type(model) and isinstance(new.layer1.conv1, QuantizedConv)


def test_only_linear_and_conv():
    model, _x = example("cnn")
    with pytest.raises(RewriteError, match="has no quantization handler"):
        rewrite(model, [Quantize("bn1", 8)])
    with pytest.raises(RewriteError, match="no layer named 'nope'"):
        rewrite(model, [Quantize("nope", 8)])
