"""Architectures of the demo models. Each is small enough to train on 2 CPU cores in under a minute."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "BasicBlock", "CharTransformer", "DigitsCNN", "DigitsResNet", "Mnist1dCNN", "StdlibGPT"]


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` ReLU units over the flattened input."""

    def __init__(self, in_features: int, width: int, depth: int, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions, a max-pool and two linear layers, for 1×8×8 digits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet for 1×8×8 digits: a stem, three basic blocks (one strided), global pooling."""

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Mnist1dCNN(nn.Module):
    """Three strided 1-D convolutions and a linear classifier, for 1×40 MNIST-1D signals."""

    def __init__(self, classes: int = 10, channels: int = 64):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate query, key, value and output Linear layers.

    Written out (softmax of masked scores) rather than with ``scaled_dot_product_attention``, so
    that forward-mode autodiff (used by the sensitivity estimators) works on it.
    """

    def __init__(self, dim: int, heads: int, context: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.register_buffer(
            "mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False
        )
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        t = x.size(1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(x.size(0), x.size(1), -1))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, context: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, context)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """A tiny GPT-style character language model: logits ``(N, T, vocab)`` for tokens ``(N, T)``."""

    def __init__(
        self,
        vocab: int = 96,
        context: int = 64,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        hidden: int = 128,
    ):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, hidden, context) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position[: tokens.size(1)]
        return self.head(self.ln(self.blocks(x)))


class GPTAttention(CausalSelfAttention):
    """:class:`CausalSelfAttention` with the causal mask built from the scores themselves
    (``triu`` of a ``-inf`` matrix), so the sequence length may be symbolic and ``torch.fx``
    traces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        mask = torch.triu(torch.full_like(scores[0, 0], float("-inf")), diagonal=1)
        out = torch.softmax(scores + mask, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(x.size(0), x.size(1), -1))


class StdlibGPT(nn.Module):
    """A small byte-level GPT for the standard-library corpus (``stdlib-bytes``): logits ``(N, T, 256)``.

    Plain modules only: a token embedding, learned positions, pre-norm blocks whose attention is
    written out with separate query/key/value/output ``nn.Linear`` layers (matmul, mask, softmax; no
    fused kernel, so ``torch.fx`` traces it and forward-mode AD runs through it), and an untied
    ``nn.Linear`` LM head. Every weight matrix but the token embedding is an ``nn.Linear``.
    """

    def __init__(
        self,
        vocab: int = 256,
        context: int = 128,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        hidden: int = 512,
    ):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        blocks = []
        for _ in range(layers):
            block = TransformerBlock(dim, heads, hidden, context)
            block.attn = GPTAttention(dim, heads, context)
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position[: tokens.size(1)]
        return self.head(self.ln(self.blocks(x)))
