"""Projected-gradient search for inputs at which a unit (a channel, at any position) changes sign.

Only ever a source of *candidate* witnesses: the points it returns are re-run through the network
(:meth:`ReluNetwork.preactivations`, float64) by the caller, and only what that shows counts.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse as sp

from cetopt.leo.network import ReluNetwork

__all__ = ["NetworkTorch", "search_sign_change"]


_CROSSED = 1e-9  # a run whose target reached this far past zero stops (the caller re-checks its point)
_SPARSE_DENSITY = 0.1  # a term with fewer nonzeros than this (a convolution's) is multiplied sparse


class _SparseRows(torch.autograd.Function):
    """``x @ mᵀ`` for a SciPy CSR matrix ``m`` (float64), differentiable in ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m, mt) -> torch.Tensor:
        ctx.mt = mt
        return torch.from_numpy(np.ascontiguousarray((m @ x.detach().numpy().T).T))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray((ctx.mt @ grad.numpy().T).T)), None, None


def _term(m: np.ndarray):
    """``m`` (outputs × inputs) as an operand: dense ``mᵀ``, or sparse CSR ``(m, mᵀ)`` where it pays."""
    if m.size and np.count_nonzero(m) < _SPARSE_DENSITY * m.size:
        csr = sp.csr_matrix(m)
        return True, (csr, csr.T.tocsr())
    return False, torch.from_numpy(np.ascontiguousarray(m.T))


class NetworkTorch:
    """The expressions of a :class:`ReluNetwork` as float64 torch tensors, for gradients.

    Convolutions are held as sparse matrices (their dense maps are mostly zeros), so a forward and
    backward pass costs about what the convolution itself does.
    """

    def __init__(self, net: ReluNetwork):
        self.net = net
        self.terms = [{k: _term(m) for k, m in layer.pre.terms.items()} for layer in net.layers]
        self.consts = [torch.from_numpy(layer.pre.const) for layer in net.layers]

    def preactivation(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Pre-activations of ReLU layer ``index`` at the rows of ``x`` (flattened inputs)."""
        values = [x]
        for k in range(index):
            g = self.consts[k].expand(x.shape[0], -1)
            for j, (is_sparse, m) in self.terms[k].items():
                g = g + (_SparseRows.apply(values[j], *m) if is_sparse else values[j] @ m)
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
    init: np.ndarray | None = None,
    step: float = 0.25,
) -> np.ndarray:
    """Points of the box ``[lo, hi]`` pushing each channel of layer ``index`` to one side of zero.

    For target ``t``, signed ascent on ``signs[t] · max_p signs[t] · g[channels[t], p]``: the most
    positive (``+1``) or most negative (``-1``) position of the channel. ``starts`` starting points
    per target (the box centre, then seeded random points), or the given ``init`` (shape
    ``(targets, k, features)``: ``k`` starts per target, e.g. the data points nearest to crossing);
    ``steps`` sign-gradient steps of a shrinking size (``step`` times the box width at first), each
    projected onto the box. Returns the best iterate of each run, shape (targets · starts,
    features).
    """
    layer = model.net.layers[index - 1]
    positions = layer.positions
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        starts = init.shape[1]
        x0 = np.clip(init.reshape(-1, lo.size), lo, hi)
        targets = np.repeat(np.arange(len(channels)), starts)
    else:
        rng = np.random.default_rng(seed)
        targets = np.repeat(np.arange(len(channels)), starts)
        x0 = lo + rng.random((targets.size, lo.size)) * (hi - lo)
        x0[::starts] = (lo + hi) / 2
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    width = hi_t - lo_t
    cols = torch.from_numpy(channels[targets, None] * positions + np.arange(positions)[None])
    sign = torch.from_numpy(signs[targets].astype(np.float64))[:, None]
    best, best_value = x0.copy(), np.full(targets.size, -np.inf)
    rows = np.arange(targets.size)  # the runs still going: their target has not crossed yet
    x = torch.from_numpy(x0)
    for k in range(steps + 1):
        x.requires_grad_(True)
        value = (sign[rows] * model.preactivation(x, index).gather(1, cols[rows])).max(dim=1).values
        v = value.detach().numpy()
        better = v > best_value[rows]
        best[rows[better]] = x.detach().numpy()[better]
        best_value[rows] = np.maximum(best_value[rows], v)
        if k == steps:
            break
        crossed = np.zeros(len(channels), dtype=bool)  # a run of each of these reached the other side
        np.logical_or.at(crossed, targets, best_value > _CROSSED)
        going = ~crossed[targets[rows]]
        if not going.any():
            break
        (grad,) = torch.autograd.grad(value.sum(), x)
        with torch.no_grad():
            size = step * (1.0 - k / steps) + 0.04 * step
            keep = torch.from_numpy(going)
            x = torch.minimum(torch.maximum(x[keep] + size * width * grad[keep].sign(), lo_t), hi_t)
        rows = rows[going]
    return best
