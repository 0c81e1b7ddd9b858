import numpy as np
import pytest
import torch

from cetopt.leo.network import extract
from tests.leo.nets import Residual, TinyConv, conv_bn, seeded, tiny_mlp


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: tiny_mlp(1), (2,)),
        (lambda: seeded(TinyConv, 2), (1, 4)),
        (lambda: conv_bn(3), (1, 8, 8)),
        (lambda: seeded(Residual, 4), (3,)),
    ],
)
def test_extracted_network_reproduces_the_model(build, shape):
    torch.manual_seed(0)
    model = build()
    net = extract(model, shape)
    x = torch.randn(64, *shape)
    with torch.no_grad():
        want = model(x).double().numpy()
    assert np.abs(net.forward(x.numpy()) - want).max() < 1e-5


def test_layers_know_their_producers():
    net = extract(conv_bn(0), (1, 8, 8))
    assert [(layer.producer, layer.batchnorm, layer.shape) for layer in net.layers] == [
        ("conv1", "bn1", (4, 6, 6)),
        ("conv2", "bn2", (6, 4, 4)),
    ]
    res = extract(Residual(), (3,))
    assert [layer.producer for layer in res.layers] == ["fc1", "fc2"]
