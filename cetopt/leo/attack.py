"""Projected-gradient search for inputs at which a unit (a channel, at any position) changes sign.

Only ever a source of *candidate* witnesses: the points it returns are re-run through the network
(:meth:`ReluNetwork.preactivations`, float64) by the caller, and only what that shows counts.
"""

from __future__ import annotations

import numpy as np
import torch

from cetopt.leo.network import ReluNetwork

__all__ = ["NetworkTorch", "search_sign_change"]


class NetworkTorch:
    """The expressions of a :class:`ReluNetwork` as float64 torch tensors, for gradients."""

    def __init__(self, net: ReluNetwork):
        self.net = net
        self.terms = [
            {k: torch.from_numpy(np.ascontiguousarray(m.T)) for k, m in layer.pre.terms.items()}
            for layer in net.layers
        ]
        self.consts = [torch.from_numpy(layer.pre.const) for layer in net.layers]

    def preactivation(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Pre-activations of ReLU layer ``index`` at the rows of ``x`` (flattened inputs)."""
        values = [x]
        for k in range(index):
            g = self.consts[k].expand(x.shape[0], -1)
            for j, m in self.terms[k].items():
                g = g + values[j] @ m
            if k + 1 == index:
                return g
            values.append(torch.relu(g))
        raise IndexError(index)


def search_sign_change(
    model: NetworkTorch,
    index: int,
    channels: np.ndarray,
    signs: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    starts: int = 3,
    steps: int = 40,
    seed: int = 0,
) -> np.ndarray:
    """Points of the box ``[lo, hi]`` pushing each channel of layer ``index`` to one side of zero.

    For target ``t``, signed ascent on ``signs[t] · max_p signs[t] · g[channels[t], p]``: the most
    positive (``+1``) or most negative (``-1``) position of the channel. ``starts`` starting points
    per target (the box centre, then seeded random points); ``steps`` sign-gradient steps of a
    shrinking size, each projected onto the box. Returns the best iterate of each run, shape
    (targets · starts, features).
    """
    layer = model.net.layers[index - 1]
    positions = layer.positions
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(len(channels)), starts)
    x0 = lo + rng.random((targets.size, lo.size)) * (hi - lo)
    x0[::starts] = (lo + hi) / 2
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    width = hi_t - lo_t
    cols = torch.from_numpy(channels[targets, None] * positions + np.arange(positions)[None])
    sign = torch.from_numpy(signs[targets].astype(np.float64))[:, None]
    x = torch.from_numpy(x0).requires_grad_(True)
    best, best_value = x0.copy(), np.full(targets.size, -np.inf)
    for step in range(steps + 1):
        value = (sign * model.preactivation(x, index).gather(1, cols)).max(dim=1).values
        better = value.detach().numpy() > best_value
        best[better] = x.detach().numpy()[better]
        best_value = np.maximum(best_value, value.detach().numpy())
        if step == steps:
            break
        (grad,) = torch.autograd.grad(value.sum(), x)
        with torch.no_grad():
            size = 0.25 * (1.0 - step / steps) + 0.01
            x = torch.minimum(torch.maximum(x + size * width * grad.sign(), lo_t), hi_t)
        x.requires_grad_(True)
    return best
