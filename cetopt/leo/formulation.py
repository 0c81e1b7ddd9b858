"""Interval bounds and the big-M MILP (or its LP relaxation) of a ReLU network over a box.

Neuron states are coded as ``INACTIVE = -1`` (ReLU output is 0 on the whole box), ``ACTIVE = 1``
(the ReLU is the identity there), ``UNSTABLE = 0`` (seen on both sides) and ``UNDECIDED = 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cetopt.leo.linear_bounds import gamma
from cetopt.leo.network import Expr, ReluNetwork
from cetopt.problem import MILP

__all__ = [
    "ACTIVE",
    "INACTIVE",
    "UNDECIDED",
    "UNSTABLE",
    "BoxState",
    "cone",
    "gid_base",
    "interval_bounds",
    "layer_problem",
]

INACTIVE, UNSTABLE, ACTIVE, UNDECIDED = -1, 0, 1, 2

# HiGHS drops matrix entries at or below 1e-9 (small_matrix_value); we drop them ourselves, below
# this, so that the problem we reason about is the problem the solver sees.
SMALL = 1e-9


@dataclass
class BoxState:
    """What is known about every neuron over one input box: bounds on its pre-activation and its state."""

    lo: list[np.ndarray]  # lo[0] / hi[0]: the input box; lo[i] / hi[i]: pre-activation bounds of layer i
    hi: list[np.ndarray]
    state: list[np.ndarray]  # state[i - 1]: neuron states of ReLU layer i (int8 codes)

    def var_bounds(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of basis variable ``k`` (the input, or a ReLU layer's output)."""
        if k == 0:
            return self.lo[0], self.hi[0]
        lo, hi = np.maximum(self.lo[k], 0.0), np.maximum(self.hi[k], 0.0)
        st = self.state[k - 1]
        lo = np.where(st == INACTIVE, 0.0, lo)
        hi = np.where(st == INACTIVE, 0.0, hi)
        return lo, hi


def expr_interval(expr: Expr, box: BoxState) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds of ``expr`` given the bounds of its basis variables.

    Computed in float64 and widened by the a-priori rounding bound of the dot products
    (``2 γ_N Σ |m| |v|``, see :mod:`cetopt.leo.linear_bounds`).
    """
    lo, hi = expr.const.copy(), expr.const.copy()
    scale = np.abs(expr.const)
    longest = 1
    for k, m in expr.terms.items():
        vlo, vhi = box.var_bounds(k)
        pos, neg = np.maximum(m, 0.0), np.minimum(m, 0.0)
        lo += pos @ vlo + neg @ vhi
        hi += pos @ vhi + neg @ vlo
        scale = scale + np.abs(m) @ np.maximum(np.abs(vlo), np.abs(vhi))
        longest += m.shape[1]
    err = 2.0 * gamma(longest + 2) * scale
    return lo - err, hi + err


def interval_bounds(net: ReluNetwork, index: int, box: BoxState) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds of ReLU layer ``index``'s pre-activations (layers before it already bounded)."""
    return expr_interval(net.layers[index - 1].pre, box)


def _clean(m: np.ndarray) -> np.ndarray:
    return np.where(np.abs(m) <= SMALL, 0.0, m)


@dataclass
class LayerProblem:
    """The constraint part of the MILP for one layer; :meth:`problem` makes a problem per neuron.

    ``col_gid`` / ``row_gid`` name the neuron each column and row belongs to, as a *global id*:
    input feature ``j`` is ``j``, neuron ``n`` of ReLU layer ``k`` is ``base[k] + n``.
    """

    A: sp.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    integrality: np.ndarray
    objective_rows: sp.csr_matrix  # one row per neuron of the target layer: its pre-activation
    objective_const: np.ndarray
    input_cols: int
    col_gid: np.ndarray | None = None
    row_gid: np.ndarray | None = None

    def problem(self, neuron: int, sense: str, relax: bool = False, keep: np.ndarray | None = None) -> MILP:
        """``max``/``min`` the pre-activation of ``neuron`` (relaxed: its LP relaxation).

        ``keep`` (a boolean mask over global ids, see :func:`cone`) restricts the problem to the
        neurons the target depends on; the others cannot change its value.
        """
        c = np.asarray(self.objective_rows[neuron].todense()).ravel()
        cols, rows = self.restriction(keep)
        A = self.A if rows is None else self.A[rows][:, cols]
        pick = (lambda v: v) if cols is None else (lambda v: v[cols])
        return MILP(
            c=pick(c),
            A=A,
            row_lower=self.row_lower if rows is None else self.row_lower[rows],
            row_upper=self.row_upper if rows is None else self.row_upper[rows],
            col_lower=pick(self.col_lower),
            col_upper=pick(self.col_upper),
            integrality=None if relax else pick(self.integrality),
            sense=sense,
            offset=float(self.objective_const[neuron]),
        )

    def restriction(self, keep: np.ndarray | None):
        """Column and row index arrays of the restricted problem (``None, None``: the full one)."""
        if keep is None or self.col_gid is None:
            return None, None
        cols, rows = keep[self.col_gid], keep[self.row_gid]
        if cols.all():
            return None, None
        return np.flatnonzero(cols), np.flatnonzero(rows)

    def input_point(
        self, x: np.ndarray, keep: np.ndarray | None, lo: np.ndarray, hi: np.ndarray
    ) -> np.ndarray:
        """The full input point of a (restricted) problem's solution ``x``; free inputs at the box centre."""
        cols, _ = self.restriction(keep)
        if cols is None:
            return np.clip(x[: self.input_cols], lo, hi)
        point = (lo + hi) / 2
        inputs = cols[cols < self.input_cols]
        point[inputs] = x[: inputs.size]
        return np.clip(point, lo, hi)


def gid_base(net: ReluNetwork) -> list[int]:
    """Global id of the first neuron of each basis variable (input first), and the total."""
    base = [0]
    for size in net.sizes():
        base.append(base[-1] + size)
    return base


def _dependencies(net: ReluNetwork) -> dict:
    """``deps[(k, j)]``: boolean pattern of layer ``k``'s pre-activation in basis variable ``j`` (cached)."""
    cache = net.__dict__.setdefault("_deps", {})
    if not cache:
        for k, layer in enumerate(net.layers, start=1):
            for j, m in layer.pre.terms.items():
                cache[(k, j)] = np.abs(m) > SMALL
    return cache


def cone(net: ReluNetwork, index: int, neurons: np.ndarray, box: BoxState) -> np.ndarray:
    """Boolean mask over global ids: inputs and neurons the given neurons of layer ``index`` depend on.

    Stably inactive neurons are left out (their output is the constant 0).
    """
    deps, base = _dependencies(net), gid_base(net)
    need = {index: np.zeros(net.layers[index - 1].size, dtype=bool)}
    need[index][np.asarray(neurons, dtype=np.int64)] = True
    for k in range(index, 0, -1):
        mine = need.get(k)
        if mine is None or not mine.any():
            continue
        if k < index:
            mine &= box.state[k - 1] != INACTIVE
        for j in net.layers[k - 1].pre.terms:
            reach = deps[(k, j)][mine].any(axis=0)
            need[j] = need[j] | reach if j in need else reach
    keep = np.zeros(base[-1], dtype=bool)
    for k, mask in need.items():
        if k < index:
            keep[base[k] : base[k + 1]] = mask
    return keep


def _offsets(net: ReluNetwork, upto: int) -> list[int]:
    """Column offset of each basis variable: x, then (h_k, z_k) for each ReLU layer k < upto."""
    offsets, pos = [0], net.features
    for k in range(1, upto):
        offsets.append(pos)
        pos += 2 * net.layers[k - 1].size
    offsets.append(pos)  # total
    return offsets


def _expr_block(expr: Expr, offsets: list[int], rows: np.ndarray) -> sp.csr_matrix:
    """Sparse rows ``Σ_k M_k[rows] v_k`` over all columns."""
    total = offsets[-1]
    out = sp.csr_matrix((len(rows), total))
    for k, m in expr.terms.items():
        block = sp.csr_matrix(_clean(m[rows]))
        width = m.shape[1]
        pad = sp.csr_matrix((block.data, block.indices + offsets[k], block.indptr), shape=(len(rows), total))
        assert width + offsets[k] <= total
        out = out + pad
    return out.tocsr()


def layer_problem(net: ReluNetwork, index: int, box: BoxState) -> LayerProblem:
    """The big-M MILP whose objective rows are the pre-activations of ReLU layer ``index``.

    Columns: ``x`` (the input box), then for every earlier layer ``k`` its outputs ``h_k`` and
    indicators ``z_k``. For a neuron with bounds ``l < 0 < u`` (not yet proven stable):
    ``h ≥ g``, ``h ≥ 0``, ``h ≤ g − l (1 − z)``, ``h ≤ u z``, ``z ∈ {0, 1}``. A stably active neuron
    gets ``h = g`` and a fixed ``z = 1``; a stably inactive one ``h = 0``, ``z = 0``. ``M`` is taken
    from the tightest bounds known so far.
    """
    offsets = _offsets(net, index)
    total = offsets[-1]
    col_lower = np.zeros(total)
    col_upper = np.zeros(total)
    integrality = np.zeros(total, dtype=bool)
    col_lower[: net.features], col_upper[: net.features] = box.lo[0], box.hi[0]
    base = gid_base(net)
    col_gid = np.zeros(total, dtype=np.int64)
    col_gid[: net.features] = np.arange(net.features)
    blocks, rlo, rhi, owners = [], [], [], []
    for k in range(1, index):
        layer, n, off = net.layers[k - 1], net.layers[k - 1].size, offsets[k]
        l, u, st = box.lo[k], box.hi[k], box.state[k - 1]
        h, z = off + np.arange(n), off + n + np.arange(n)
        col_gid[h] = col_gid[z] = base[k] + np.arange(n)
        active, free = st == ACTIVE, (st == UNSTABLE) | (st == UNDECIDED)
        col_upper[h] = np.where(st == INACTIVE, 0.0, np.maximum(u, 0.0))
        col_lower[h] = np.where(active, np.maximum(l, 0.0), 0.0)
        col_lower[z] = np.where(active, 1.0, 0.0)
        col_upper[z] = np.where(active | free, 1.0, 0.0)
        integrality[z] = free
        g = _expr_block(layer.pre, offsets, np.arange(n))
        const = layer.pre.const
        eye_h = sp.csr_matrix((np.ones(n), (np.arange(n), h)), shape=(n, total))
        idx = np.flatnonzero(active | free)
        # h - g >= c  (equality for active neurons)
        blocks.append((eye_h - g)[idx])
        rlo.append(const[idx])
        rhi.append(np.where(active[idx], const[idx], np.inf))
        owners.append(base[k] + idx)
        idx = np.flatnonzero(free)
        if idx.size:
            z_l = sp.csr_matrix((-l[idx], (np.arange(idx.size), z[idx])), shape=(idx.size, total))
            blocks.append((eye_h - g)[idx] + z_l)  # h - g - l z <= c - l
            rlo.append(np.full(idx.size, -np.inf))
            rhi.append(const[idx] - l[idx])
            z_u = sp.csr_matrix((-u[idx], (np.arange(idx.size), z[idx])), shape=(idx.size, total))
            blocks.append(eye_h[idx] + z_u)  # h - u z <= 0
            rlo.append(np.full(idx.size, -np.inf))
            rhi.append(np.zeros(idx.size))
            owners += [base[k] + idx, base[k] + idx]
    A = sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, total))
    A.data = _clean(A.data)
    A.eliminate_zeros()
    target = net.layers[index - 1]
    objective = _expr_block(target.pre, offsets, np.arange(target.size))
    return LayerProblem(
        A=A,
        row_lower=np.concatenate(rlo) if rlo else np.zeros(0),
        row_upper=np.concatenate(rhi) if rhi else np.zeros(0),
        col_lower=col_lower,
        col_upper=col_upper,
        integrality=integrality,
        objective_rows=objective,
        objective_const=target.pre.const.copy(),
        input_cols=net.features,
        col_gid=col_gid,
        row_gid=np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64),
    )
