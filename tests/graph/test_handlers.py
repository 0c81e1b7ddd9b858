"""A user's own layer type, taught to the rewriter through the public handler API."""

import pytest
import torch
from torch import nn

from cetopt.graph import (
    LayerHandler,
    RemoveUnits,
    channel_groups,
    find_group,
    register_layer_handler,
    rewrite,
    trace_model,
    unregister_layer_handler,
)


class ScaledLinear(nn.Module):
    """y = (x @ W.T) * scale + bias — a custom layer fx would otherwise trace into."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.scale = nn.Parameter(torch.rand(n_out) + 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight.T * self.scale + self.bias


class ScaledLinearHandler(LayerHandler):
    channel_dim_in = -1
    channel_dim_out = -1

    def in_channels(self, m):
        return m.weight.shape[1]

    def out_channels(self, m):
        return m.weight.shape[0]

    def prune_out(self, m, keep):
        new = ScaledLinear(m.weight.shape[1], len(keep))
        new.weight.data, new.scale.data, new.bias.data = (
            m.weight[keep].clone(),
            m.scale[keep].clone(),
            m.bias[keep].clone(),
        )
        return new

    def prune_in(self, m, keep):
        new = ScaledLinear(len(keep), m.weight.shape[0])
        new.weight.data, new.scale.data, new.bias.data = (
            m.weight[:, keep].clone(),
            m.scale.clone(),
            m.bias.clone(),
        )
        return new


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ScaledLinear(6, 8)
        self.b = ScaledLinear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def handler_registered():
    register_layer_handler(ScaledLinear, ScaledLinearHandler())
    yield
    unregister_layer_handler(ScaledLinear)


def test_registered_custom_layer_is_a_leaf_and_in_a_group(handler_registered):
    torch.manual_seed(0)
    mg = trace_model(Net(), torch.randn(2, 6))
    assert mg.layers() == ["a", "b"]
    assert set(find_group(channel_groups(mg), "a").ports) == {("a", "out"), ("b", "in")}


def test_custom_layer_dead_units_are_removed_exactly(handler_registered):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.a.weight[[2, 6]] = 0.0
        net.a.bias[[2, 6]] = -1.0
    x = torch.randn(10, 6)
    new = rewrite(net, [RemoveUnits("a", [2, 6])], x)
    assert isinstance(new.a, ScaledLinear) and new.a.weight.shape == (6, 6) and new.b.weight.shape == (3, 6)
    with torch.no_grad():
        torch.testing.assert_close(new(x), net(x), rtol=1e-5, atol=1e-5)


def test_duplicate_registration_needs_replace(handler_registered):
    with pytest.raises(ValueError, match="replace=True"):
        register_layer_handler(ScaledLinear, ScaledLinearHandler())
    register_layer_handler(ScaledLinear, ScaledLinearHandler(), replace=True)


def test_without_a_handler_the_layer_is_opaque():
    mg = trace_model(Net(), torch.randn(2, 6))
    assert mg.layers() == []  # fx traced into it: only matmuls, no known layers
