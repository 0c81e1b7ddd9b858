"""Symbolic linear bounds (CROWN/DeepPoly-style back-substitution) of ReLU pre-activations.

For the rows of one layer, the pre-activation ``g = Σ_k M_k v_k + c`` is pushed backwards through
every earlier ReLU layer: each ReLU ``v = relu(g')`` is replaced by a linear upper relaxation
(``v ≤ u (g' − l) / (u − l)`` for an unstable neuron) where its coefficient is positive and a linear
lower relaxation (``v ≥ α g'``, ``α ∈ {0, 1}``, whichever of the two has the smaller area) where
it is negative, then ``g'`` is replaced by its own expression. What is left is linear in the input
and is maximised over the box in closed form. One backward pass bounds every row of the layer, in
both directions at once. It is usually far tighter than interval arithmetic but not always (the
lower relaxation ``α g`` can lose against the interval's); the detector keeps the tighter of the two
per neuron.

Rounding. Every product is computed in float64. The error of a computed coefficient matrix
``fl(D M)`` is at most ``γ_N |D| |M|`` (``γ_N = N u / (1 − N u)``, ``u = 2⁻⁵³``, ``N`` the longest
inner product); a coefficient error ``E`` on ``v_j`` moves the bound by at most ``|E| max|v_j|``,
so each step adds ``γ_N |D| (|M| max|v_j|)`` (matrix-vector products only). The bound is widened
by twice the sum over all steps, the concretisation and the offsets.
"""

from __future__ import annotations

import numpy as np
import torch

from cetopt.leo.network import ReluNetwork

__all__ = ["gamma", "linear_bounds", "optimise_slopes", "relaxation"]

_U = 2.0**-53


def gamma(n: int) -> float:
    """``γ_n = n u / (1 − n u)``: the relative error bound of an n-term float64 dot product."""
    nu = n * _U
    return nu / (1.0 - nu)


def relaxation(lo: np.ndarray, hi: np.ndarray, state: np.ndarray | None = None):
    """Slopes and offsets of ReLU relaxations: ``α g ≤ relu(g) ≤ s g + t`` on ``[lo, hi]``.

    Returns ``(s, t, alpha)``. A neuron proven inactive (``state == -1``) or with ``hi ≤ 0`` has all
    three zero; one proven active (``state == 1``) or with ``lo ≥ 0`` has ``s = α = 1``, ``t = 0``.
    """
    inactive = hi <= 0
    active = (lo >= 0) & ~inactive
    if state is not None:
        inactive = inactive | (state == -1)
        active = (active | (state == 1)) & ~inactive
    unstable = ~(inactive | active)
    width = np.where(unstable, hi - lo, 1.0)
    s = np.where(active, 1.0, np.where(unstable, hi / width, 0.0))
    t = np.where(unstable, -lo * hi / width, 0.0)
    alpha = np.where(active, 1.0, np.where(unstable & (hi > -lo), 1.0, 0.0))
    return s, t, alpha


def linear_bounds(
    net: ReluNetwork,
    index: int,
    box,
    rows: np.ndarray | None = None,
    slopes: dict[int, np.ndarray] | None = None,
):
    """Sound lower and upper bounds of the pre-activations of ReLU layer ``index`` over ``box``.

    Parameters
    ----------
    net : ReluNetwork
    index : int
        The ReLU layer (1-based); every earlier layer must already have finite bounds in ``box``.
    box : BoxState
        Input box (``box.lo[0]``, ``box.hi[0]``) and the pre-activation bounds and states of the
        earlier layers.
    rows : ndarray of int, optional
        Neurons of the layer to bound (default: all).
    slopes : dict, optional
        ``{k: α}`` lower-relaxation slopes of the unstable neurons of layer ``k``, one row per
        bound (upper bounds of the rows, then of their negations: shape ``(2 · rows, size_k)``),
        e.g. from :func:`optimise_slopes`. Clipped to [0, 1]; any value there is sound.

    Returns
    -------
    lo, hi : ndarray
        One value per row, already widened by the rounding bound.
    """
    pre = net.layers[index - 1].pre
    rows = np.arange(pre.const.size) if rows is None else np.asarray(rows, dtype=np.int64)
    n = rows.size
    vmax = _magnitudes(net, index, box)
    coef = {k: np.concatenate([m[rows], -m[rows]]) for k, m in pre.terms.items()}
    const = np.concatenate([pre.const[rows], -pre.const[rows]])
    # each product's rounding error, bounded by γ · |left| @ (|right| @ |v|max): matrix-vector only
    err = np.zeros(2 * n)
    longest = max([pre.const.size, *(m.shape[1] for m in pre.terms.values())])
    for k in range(index - 1, 0, -1):
        if k not in coef:
            continue
        a = coef.pop(k)
        layer = net.layers[k - 1]
        s, t, alpha = relaxation(box.lo[k], box.hi[k], box.state[k - 1])
        if slopes is not None and k in slopes:
            alpha = np.where(t > 0, np.clip(slopes[k], 0.0, 1.0), alpha)
        pos, neg = np.maximum(a, 0.0), np.minimum(a, 0.0)
        d = pos * s + neg * alpha  # coefficient on g_k after relaxing v_k
        const = const + pos @ t + d @ layer.pre.const
        gmax = np.maximum(np.abs(box.lo[k]), np.abs(box.hi[k]))
        err = err + np.abs(a) @ (gmax + np.abs(t)) + np.abs(d) @ np.abs(layer.pre.const)
        for j, m in layer.pre.terms.items():
            coef[j] = coef[j] + d @ m if j in coef else d @ m
            err = err + np.abs(d) @ (np.abs(m) @ vmax[j])
            longest = max(longest, m.shape[0], m.shape[1])
    x_lo, x_hi = box.lo[0], box.hi[0]
    a0 = coef.get(0, np.zeros((2 * n, x_lo.size)))
    upper = const + np.maximum(a0, 0.0) @ x_hi + np.minimum(a0, 0.0) @ x_lo
    err = err + np.abs(a0) @ vmax[0] + np.abs(const)
    upper = upper + 2.0 * (index + 2) * gamma(longest + 2) * err
    return -upper[n:], upper[:n]


def _magnitudes(net: ReluNetwork, index: int, box) -> dict[int, np.ndarray]:
    """``max |v_k|`` of every basis variable before layer ``index``: the input, then the ReLU outputs."""
    out = {0: np.maximum(np.abs(box.lo[0]), np.abs(box.hi[0]))}
    for k in range(1, index):
        out[k] = np.where(box.state[k - 1] == -1, 0.0, np.maximum(box.hi[k], 0.0))
    return out


def optimise_slopes(
    net: ReluNetwork, index: int, box, rows: np.ndarray, steps: int = 40, lr: float = 0.1
) -> dict[int, np.ndarray]:
    """Lower-relaxation slopes that tighten :func:`linear_bounds` for ``rows`` (α-CROWN).

    Projected Adam (without bias correction) on the sum of the rows' upper and negated lower
    bounds, from the default slopes, in float64. Only a heuristic: the bounds that count are
    recomputed from the returned slopes by :func:`linear_bounds` (valid for any slopes in [0, 1]).
    """
    rows = np.asarray(rows, dtype=np.int64)
    t64 = {}
    for k in range(1, index):
        s, t, alpha = relaxation(box.lo[k], box.hi[k], box.state[k - 1])
        t64[k] = tuple(torch.from_numpy(v) for v in (s, t, alpha, t > 0))
    params = {
        k: t64[k][2].expand(2 * rows.size, -1).clone().requires_grad_(True)
        for k in t64
        if bool(t64[k][3].any())
    }
    if not params:
        return {}
    moments = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
    x_lo, x_hi = torch.from_numpy(box.lo[0]), torch.from_numpy(box.hi[0])
    terms = {
        k: {j: torch.from_numpy(m) for j, m in layer.pre.terms.items()}
        for k, layer in enumerate(net.layers[:index], start=1)
    }
    consts = {k: torch.from_numpy(layer.pre.const) for k, layer in enumerate(net.layers[:index], start=1)}
    sel = torch.from_numpy(rows)
    for _ in range(steps):
        coef = {j: torch.cat([m[sel], -m[sel]]) for j, m in terms[index].items()}
        const = torch.cat([consts[index][sel], -consts[index][sel]])
        for k in range(index - 1, 0, -1):
            if k not in coef:
                continue
            a = coef.pop(k)
            s, t, alpha, unstable = t64[k]
            if k in params:
                alpha = torch.where(unstable, params[k], alpha)
            d = a.clamp(min=0) * s + a.clamp(max=0) * alpha
            const = const + a.clamp(min=0) @ t + d @ consts[k]
            for j, m in terms[k].items():
                coef[j] = coef[j] + d @ m if j in coef else d @ m
        a0 = coef.get(0)
        upper = const if a0 is None else const + a0.clamp(min=0) @ x_hi + a0.clamp(max=0) @ x_lo
        grads = torch.autograd.grad(upper.sum(), list(params.values()))
        with torch.no_grad():  # Adam by hand: torch.optim's first import costs seconds
            for (k, p), g in zip(params.items(), grads):
                m1, m2 = moments[k]
                m1.mul_(0.9).add_(g, alpha=0.1)
                m2.mul_(0.999).addcmul_(g, g, value=0.001)
                p.sub_(lr * m1 / (m2.sqrt() + 1e-12)).clamp_(0.0, 1.0)
    return {k: p.detach().numpy().copy() for k, p in params.items()}
