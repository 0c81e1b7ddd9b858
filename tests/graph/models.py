"""Small models of the four kinds the rewriter must handle: MLP, CNN, ResNet-style, transformer-style."""

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Flatten, fc1 (+ BatchNorm1d) + ReLU, fc2 + ReLU, fc3."""

    def __init__(self, sizes=(64, 32, 24, 10)):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.bn1 = nn.BatchNorm1d(sizes[1])
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.bn1(self.fc1(self.flatten(x)))))))


class CNN(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU with a functional relu, max-pool, view-flatten into Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12 * 4 * 4, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.head(self.fc(x.view(-1, 12 * 4 * 4)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.head(self.fc(torch.flatten(self.pool(x), 1)))


class EncoderBlock(nn.Module):
    def __init__(self, dim=16, heads=4, hidden=32):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm1(x + a)
        return self.norm2(x + self.ff2(self.act(self.ff1(x))))


class Transformer(nn.Module):
    def __init__(self, vocab=20, dim=16, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = EncoderBlock(dim)
        self.pre_head = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.pre_head(self.block(self.embed(tokens)).mean(dim=1)))


def randomize_batchnorm(model, seed=0):
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


KINDS = ("mlp", "cnn", "resnet", "transformer")

#: For each kind, a Linear pair with nothing between them (MergeAffine applies exactly).
MERGEABLE = {
    "mlp": None,
    "cnn": ("fc", "head"),
    "resnet": ("fc", "head"),
    "transformer": ("pre_head", "head"),
}


def example(kind, batch=5, seed=0):
    """A model of the given kind (eval mode) and a matching input batch."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return randomize_batchnorm(MLP()).eval(), torch.randn(batch, 1, 8, 8)
    if kind == "cnn":
        return randomize_batchnorm(CNN()).eval(), torch.randn(batch, 1, 8, 8)
    if kind == "resnet":
        return randomize_batchnorm(ResNet()).eval(), torch.randn(batch, 1, 8, 8)
    if kind == "transformer":
        return Transformer().eval(), torch.randint(0, 20, (batch, 7))
    raise ValueError(kind)


@torch.no_grad()
def make_dead_units(kind, model):
    """Make some units of ``model`` provably dead (their consumers always see a constant).

    Returns ``(layer, units, constants, parameters_removed)``: the removal decision that is exact
    for these units, and how many parameters it removes, counted by hand.
    """
    if kind == "mlp":  # fc1 units die through bn1 (gamma 0, beta < 0), then ReLU gives 0
        model.bn1.weight[[0, 5]] = 0.0
        model.bn1.bias[[0, 5]] = -1.0
        return "fc1", [0, 5], None, 2 * 64 + 2 + 2 + 2 + 2 * 24  # fc1 rows+bias, bn1 w+b, fc2 columns
    if kind == "cnn":
        model.bn1.weight[[1, 3]] = 0.0
        model.bn1.bias[[1, 3]] = -1.0
        return "conv1", [1, 3], None, 2 * 9 + 2 + 2 + 2 + 12 * 2 * 9  # conv1, bn1, conv2 inputs
    if kind == "resnet":
        model.layer1.bn1.weight[2] = 0.0
        model.layer1.bn1.bias[2] = -1.0
        return "layer1.conv1", [2], None, 8 * 9 + 2 + 8 * 9
    if kind == "transformer":  # zero weights and bias -3: GELU sends the constant GELU(-3) onward
        units = [0, 7, 9]
        model.block.ff1.weight[units] = 0.0
        model.block.ff1.bias[units] = -3.0
        constant = float(F.gelu(torch.tensor(-3.0)))
        return "block.ff1", units, [constant] * 3, 3 * 16 + 3 + 16 * 3
    raise ValueError(kind)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
