"""Conv fold and merge rules: outputs unchanged where the maths allows, refused with a reason elsewhere."""

import numpy as np
import pytest
import torch
from torch import nn

import cetopt
from cetopt.errors import RewriteError
from cetopt.graph import FoldLinearUnits, MergeAffine, rewrite
from cetopt.leo import Domain


class ConvConv(nn.Module):
    def __init__(self, pad2: int = 0, stride1: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=stride1)
        self.conv2 = nn.Conv2d(4, 3, 2, padding=pad2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def _active(model: nn.Module, seed: int = 0) -> nn.Module:
    """Positive first-layer weights and biases: on inputs in [0, 1] every ReLU is the identity."""
    torch.manual_seed(seed)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        first.weight.abs_()
        first.bias.fill_(0.5)
    return model.eval()


def _combine(conv: nn.Conv2d, k: int, combo: dict[int, float], offset: float = 0.3) -> None:
    with torch.no_grad():
        conv.weight[k] = sum(a * conv.weight[j] for j, a in combo.items())
        conv.bias[k] = sum(a * conv.bias[j] for j, a in combo.items()) + offset


def _same(a: nn.Module, b: nn.Module, shape) -> float:
    x = torch.rand(64, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        return (a.double()(x) - b.double()(x)).abs().max().item()


def test_fold_conv_channel_into_unpadded_conv():
    model = _active(ConvConv())
    _combine(model.conv1, 3, {0: 0.5, 1: 2.0})
    out = rewrite(model, [FoldLinearUnits("conv1", {3: {0: 0.5, 1: 2.0}})], torch.rand(1, 2, 6, 6))
    assert out.conv1.out_channels == 3 and out.conv2.in_channels == 3
    assert _same(model, out, (2, 6, 6)) < 1e-6


def test_fold_conv_channel_into_linear_through_flatten():
    model = _active(ConvLinear())
    _combine(model.conv, 2, {0: -0.7, 3: 1.5})
    out = rewrite(model, [FoldLinearUnits("conv", {2: {0: -0.7, 3: 1.5}})], torch.rand(1, 1, 6, 6))
    assert out.fc.in_features == 27
    assert _same(model, out, (1, 6, 6)) < 1e-6


def test_fold_into_zero_padded_conv_needs_zero_offsets():
    model = _active(ConvConv(pad2=1))
    _combine(model.conv1, 3, {0: 1.0}, offset=0.3)
    with pytest.raises(RewriteError, match="zero-pads"):
        rewrite(model, [FoldLinearUnits("conv1", {3: {0: 1.0}})], torch.rand(1, 2, 6, 6))
    _combine(model.conv1, 3, {0: 1.0}, offset=0.0)
    out = rewrite(model, [FoldLinearUnits("conv1", {3: {0: 1.0}})], torch.rand(1, 2, 6, 6))
    assert _same(model, out, (2, 6, 6)) < 1e-6


@pytest.mark.parametrize("stride1", [1, 2])
def test_merge_conv_into_conv(stride1):
    model = _active(ConvConv(stride1=stride1))
    out = rewrite(model, [MergeAffine("conv1", "conv2", drop_activation=True)], torch.rand(1, 2, 9, 9))
    convs = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3 + stride1, 3 + stride1)
    assert _same(model, out, (2, 9, 9)) < 1e-6


def test_merge_conv_into_linear():
    model = _active(ConvLinear())
    out = rewrite(model, [MergeAffine("conv", "fc", drop_activation=True)], torch.rand(1, 1, 6, 6))
    assert not any(isinstance(m, nn.Conv2d) for m in out.modules())
    assert out.fc.in_features == 36
    assert _same(model, out, (1, 6, 6)) < 1e-6


def test_merge_refuses_padding_between_convs():
    model = _active(ConvConv(pad2=1))
    with pytest.raises(RewriteError, match="zero-pads"):
        rewrite(model, [MergeAffine("conv1", "conv2", drop_activation=True)], torch.rand(1, 2, 6, 6))


def test_leo_folds_and_merges_active_conv_channels():
    model = _active(ConvConv())
    _combine(model.conv1, 3, {0: 0.5, 1: 2.0})
    domain = Domain.box(np.zeros((2, 6, 6)), 1.0)
    report = cetopt.find_stable_units(model, domain, workers=1)
    assert len(report.layers[0].active) == 4
    small = cetopt.remove_stable_units(model, report)
    assert small.leo_removal["layers"]["conv1"]["merged_into"] == "conv2"
    assert small.leo_removal["params_after"] < small.leo_removal["params_before"]
    assert _same(model, small, (2, 6, 6)) < 1e-6
