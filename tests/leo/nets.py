"""Small networks for the LEO tests, with biases shifted so that some ReLUs are stable."""

from __future__ import annotations

import torch
from torch import nn


def shifted(model: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is not None:
                m.bias.add_(torch.randn(m.bias.shape, generator=gen) * scale)
    return model.eval()


def tiny_mlp(seed: int, inputs: int = 2, widths=(8, 8, 6)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    prev = inputs
    for w in widths:
        layers += [nn.Linear(prev, w), nn.ReLU()]
        prev = w
    layers.append(nn.Linear(prev, 2))
    return shifted(nn.Sequential(*layers), seed)


class TinyConv(nn.Module):
    """1×4 input, a width-2 Conv1d with 4 channels, a Linear: small enough for the exhaustive check."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 2, stride=2)
        self.fc1 = nn.Linear(8, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class ConvBN(nn.Module):
    """Conv–BN–ReLU twice, then a Linear (8×8 input)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def conv_bn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 1.5)
    return model.eval()


class Residual(nn.Module):
    """x → fc1 → ReLU → (fc2 → ReLU) + skip → fc3: a residual add of two ReLU outputs."""

    def __init__(self, d: int = 3, w: int = 6):
        super().__init__()
        self.fc1 = nn.Linear(d, w)
        self.fc2 = nn.Linear(w, w)
        self.fc3 = nn.Linear(w, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(h)) + h)


def seeded(cls, seed: int, scale: float = 1.0, **kwargs) -> nn.Module:
    """``cls(**kwargs)`` initialised from ``seed``, biases shifted."""
    torch.manual_seed(seed)
    return shifted(cls(**kwargs), seed, scale)
