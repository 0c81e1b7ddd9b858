"""Small quantized models shared by the deployment tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cetopt.graph import Quantize, rewrite
from cetopt.zoo import load_dataset, load_model

ZOO = {"digits-cnn": "digits", "digits-resnet": "digits", "mnist1d-cnn": "mnist1d"}
EVERY_ZOO_MODEL = {
    **ZOO,
    "digits-mlp-2x100": "digits",
    "mnist1d-mlp-2x100": "mnist1d",
    "pydoc-char-lm": "pydoc-text",
}


def quantize_all(model: nn.Module, bits=4) -> nn.Module:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    return rewrite(model, [Quantize(n, bits) for n in names])


def _case(name: str):
    model = load_model(name).eval()
    return name, model, quantize_all(model), load_dataset(EVERY_ZOO_MODEL[name])


@pytest.fixture(scope="session", params=sorted(ZOO))
def zoo_case(request):
    """(name, float model, quantized model (4-bit weights), dataset) of the zoo's conv nets."""
    return _case(request.param)


@pytest.fixture(scope="session", params=sorted(EVERY_ZOO_MODEL))
def any_zoo_case(request):
    """The same for every zoo model (MLPs and the char LM too)."""
    return _case(request.param)


class TinyNet(nn.Module):
    """Conv → BN → ReLU → Linear, with a Linear whose in_features (48) the int4 kernel rejects."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 48)
        self.out = nn.Linear(48, 16)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.out(torch.relu(self.fc(torch.flatten(x, 1))))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, quantize_all(model, 4), torch.randn(16, 3, 4, 4)
