"""Exact pre-activation ranges of a small ReLU network by enumerating its activation regions.

Independent of the big-M MILP: a depth-first search over the neurons in topological order fixes
each ReLU's side; on each region the network is affine, so the range of the next neuron over the
region is an LP (``scipy.optimize.linprog``), and branches with an empty side are cut. The range
of a neuron over the box is the union of its ranges over the regions its predecessors define.
Exponential in the worst case: for tests and demos on networks with a handful of inputs.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

from cetopt.leo.network import ReluNetwork

__all__ = ["exhaustive_ranges", "exhaustive_states"]


def _affine_layer(net: ReluNetwork, k: int, maps: list[tuple[np.ndarray, np.ndarray]]):
    """Affine map (A, c) in x of layer ``k``'s pre-activations, given the maps of earlier basis variables."""
    expr = net.layers[k - 1].pre
    A = np.zeros((net.layers[k - 1].size, net.features))
    c = expr.const.copy()
    for j, m in expr.terms.items():
        P, q = maps[j]
        A += m @ P
        c += m @ q
    return A, c


class _Search:
    def __init__(self, net: ReluNetwork, lo: np.ndarray, hi: np.ndarray, tol: float):
        self.net, self.bounds, self.tol = net, list(zip(lo, hi)), tol
        self.order = [(k, n) for k in range(1, len(net.layers) + 1) for n in range(net.layers[k - 1].size)]
        self.gmax = [np.full(layer.size, -np.inf) for layer in net.layers]
        self.gmin = [np.full(layer.size, np.inf) for layer in net.layers]
        self.lps = 0

    def extreme(self, a: np.ndarray, rows: list[np.ndarray], rhs: list[float], sign: float) -> float | None:
        self.lps += 1
        A_ub = np.array(rows) if rows else None
        b_ub = np.array(rhs) if rows else None
        res = linprog(-sign * a, A_ub=A_ub, b_ub=b_ub, bounds=self.bounds, method="highs")
        return None if res.status != 0 else float(a @ res.x)

    def run(self) -> None:
        self.visit(0, [(np.eye(self.net.features), np.zeros(self.net.features))], None, [], [], [])

    def visit(self, pos, maps, layer_map, pattern, rows, rhs) -> None:
        if pos == len(self.order):
            return
        k, n = self.order[pos]
        if n == 0:
            layer_map = _affine_layer(self.net, k, maps)
            pattern = []
        A, c = layer_map
        hi = self.extreme(A[n], rows, rhs, 1.0)
        if hi is None:  # empty region (numerically): nothing to learn here
            return
        lo = self.extreme(A[n], rows, rhs, -1.0)
        hi, lo = hi + c[n], lo + c[n]
        self.gmax[k - 1][n] = max(self.gmax[k - 1][n], hi)
        self.gmin[k - 1][n] = min(self.gmin[k - 1][n], lo)
        sides = [s for s in (1, 0) if not ((s == 1 and hi <= self.tol) or (s == 0 and lo >= -self.tol))]
        for side in sides or [0]:  # g ≡ 0 on the region: either side is the same
            # side 1: A x + c >= 0  ->  -A x <= c ; side 0: A x + c <= 0  ->  A x <= -c
            row, r = (-A[n], c[n]) if side else (A[n], -c[n])
            new_pattern = [*pattern, side]
            new_maps = maps
            if n == self.net.layers[k - 1].size - 1:
                d = np.asarray(new_pattern, dtype=float)
                new_maps = [*maps, (d[:, None] * A, d * c)]
            self.visit(pos + 1, new_maps, layer_map, new_pattern, [*rows, row], [*rhs, r])


def exhaustive_ranges(
    net: ReluNetwork, lo, hi, tol: float = 1e-9
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact ``(min, max)`` of every neuron's pre-activation over the box ``[lo, hi]`` (flattened input).

    Returns two lists (one array per ReLU layer). Sides within ``tol`` of zero are not branched.
    """
    search = _Search(net, np.asarray(lo, float).ravel(), np.asarray(hi, float).ravel(), tol)
    search.run()
    return search.gmin, search.gmax


def exhaustive_states(net: ReluNetwork, lo, hi, tol: float = 1e-9) -> list[np.ndarray]:
    """Per ReLU layer and unit (channel): ``-1`` stably inactive, ``1`` stably active, ``0`` unstable."""
    gmin, gmax = exhaustive_ranges(net, lo, hi, tol)
    out = []
    for layer, mn, mx in zip(net.layers, gmin, gmax):
        inactive = (mx <= tol).reshape(layer.channels, -1).all(axis=1)
        active = (mn >= -tol).reshape(layer.channels, -1).all(axis=1)
        out.append(np.where(inactive, -1, np.where(active, 1, 0)).astype(np.int8))
    return out
