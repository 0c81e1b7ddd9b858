"""Deterministic CPU training for the demo models, with an L1 option (the LEO recipe)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from cetopt._modes import eval_mode
from cetopt.zoo.data import Dataset

__all__ = ["TRAINING_THREADS", "Recipe", "accuracy", "mean_loss", "task_loss", "train"]

# Training runs on one thread: a multi-threaded reduction sums in an order that depends on the
# thread count, and training amplifies those last-bit differences into different models (seen here:
# 0.8 pp apart in test accuracy on MNIST-1D). With one thread the weights are bit-identical from
# run to run and from machine to machine of the same kind, so cached results can be reproduced.
TRAINING_THREADS = 1


@dataclass(frozen=True)
class Recipe:
    """How a demo model is trained: Adam with cosine decay, full determinism from ``seed``.

    Attributes
    ----------
    epochs, batch_size, lr, weight_decay : training schedule.
    l1 : float
        Weight of the L1 penalty on all weights (not biases). LEO (Serra et al. 2020) uses it to
        make more ReLUs stable.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    l1: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _l1_penalty(model: nn.Module) -> torch.Tensor:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    return sum(w.abs().sum() for w in weights)


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension: classes ``(N, C)`` or per-token logits ``(N, T, V)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``(x, y)`` as a fraction (per token for an LM)."""
    correct = 0
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            out = model(x[start : start + batch_size])
            correct += (out.argmax(-1) == y[start : start + batch_size]).sum().item()
    return correct / max(y.numel(), 1)


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Mean cross-entropy (nats per example, or per token for a language model) of ``model`` in eval mode."""
    total = 0.0
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            yb = y[start : start + batch_size]
            total += task_loss(model(x[start : start + batch_size]), yb).item() * yb.numel()
    return total / max(y.numel(), 1)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(model: nn.Module, data: Dataset, recipe: Recipe, *, seed: int = 0, progress: bool = True) -> dict:
    """Train ``model`` in place on ``data``'s train split; return a summary dict.

    Seeds torch and the batch order from ``seed`` and trains on :data:`TRAINING_THREADS` threads
    (the caller's thread count is restored afterwards), so a run gives the same weights every time.
    """
    with _threads(TRAINING_THREADS):
        return _train(model, data, recipe, seed, progress)


def _train(model: nn.Module, data: Dataset, recipe: Recipe, seed: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loader = data.loader("train", batch_size=recipe.batch_size, shuffle=True, seed=seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * len(loader), pct_start=0.15
    )
    start = time.perf_counter()
    model.train()
    bar = tqdm(
        range(recipe.epochs), desc=f"training {type(model).__name__}", disable=not progress, leave=False
    )
    for _ in bar:
        for xb, yb in loader:
            loss = task_loss(model(xb), yb)
            if recipe.l1:
                loss = loss + recipe.l1 * _l1_penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return {
        "train_seconds": time.perf_counter() - start,
        "val_accuracy": accuracy(model, data.x_val, data.y_val),
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "test_loss": mean_loss(model, data.x_test, data.y_test),
    }
