"""Small untrained models and inputs for the low-rank tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv → BN → ReLU, a residual conv (identity after its BN), a Conv1d-free head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12 * 16, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.fc1(torch.flatten(nn.functional.max_pool2d(x, 2), 1)))
        return self.fc2(x)


class Tiny1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 5, stride=2, padding=2)
        self.fc = nn.Linear(8 * 10, 4)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class TinyDepthwise(nn.Module):
    """A conformer-like 1-d stack: pointwise conv, depthwise conv → BN → ReLU, a "same" conv, a head."""

    def __init__(self):
        super().__init__()
        self.pointwise = nn.Conv1d(3, 12, 1)
        self.depthwise = nn.Conv1d(12, 12, 5, padding=2, groups=12)
        self.bn = nn.BatchNorm1d(12)
        self.same = nn.Conv1d(12, 8, 3, padding="same")
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        x = torch.relu(self.pointwise(x))
        x = torch.relu(self.bn(self.depthwise(x)))
        return self.fc(torch.flatten(torch.tanh(self.same(x)), 1))


def tiny_depthwise(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """:class:`TinyDepthwise` with non-trivial BatchNorm statistics, and inputs ``(64, 3, 16)``."""
    torch.manual_seed(seed)
    model = TinyDepthwise()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(64, 3, 16)


def tiny_cnn(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval(), torch.randn(64, 2, 8, 8)


def tiny_1d(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return Tiny1d().eval(), torch.randn(64, 1, 20)


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
