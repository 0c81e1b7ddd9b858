"""The multiple-choice knapsack (MCK): pick one option per group, minimise total cost under one weight budget.

Its LP relaxation is solved exactly by a greedy walk along each group's lower convex hull
(Sinha & Zoltners, 1979):

1. Keep, per group, the lower convex hull of its (weight, cost) points up to its cheapest point:
   dominated options and options above the hull are never LP-optimal.
2. Start every group at its lightest hull point. The hull segments of all groups, sorted by
   efficiency (cost saved per unit of weight), are taken in that order while the budget lasts.
   Convexity makes efficiencies decrease along each group's hull, so the global order respects
   the order inside every group.
3. The first segment that does not fit is taken fractionally: that value is the LP optimum,
   hence a proven lower bound on the integer optimum, and that segment's efficiency is the
   optimal multiplier of the budget row. Without the fraction (and continuing with later
   segments that still fit) the choice is integral and feasible.

Everything is vectorised over groups: the loops run over the options of a group (a handful) and
over a few filling rounds, never over groups. The hull and the sorted segments do not depend on
the budget, so :class:`MCKHull` serves a whole budget sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MCKGreedyResult", "MCKHull", "mck_greedy", "pareto_options"]

_REL_TOL = 1e-12


def pareto_options(cost: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Mask of options that are not dominated within their group (rows).

    Option j is dominated if another option of its group weighs no more and costs no more, one of
    them strictly. Among exact duplicates the first is kept.
    """
    order = np.lexsort((cost, weight), axis=-1)
    c_sorted = np.take_along_axis(cost, order, axis=1)
    # Sorted by weight then cost: an option survives iff its cost is strictly below every lighter one's.
    prev_min = np.minimum.accumulate(c_sorted, axis=1)
    keep_sorted = np.ones_like(c_sorted, dtype=bool)
    keep_sorted[:, 1:] = c_sorted[:, 1:] < prev_min[:, :-1]
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep


def _take(arr: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``arr[g, cols[g, j]]`` through flat indices (faster than ``take_along_axis``)."""
    flat = cols + (np.arange(arr.shape[0]) * arr.shape[1])[:, None]
    return arr.ravel()[flat]


def _column_layout(cost, weight, allowed):
    """Options sorted by weight per group, as one contiguous vector per position (``(options, groups)``).

    Returns ``(order, w_col, c_col)``: ``order`` is ``None`` when every group's columns are already
    in weight order (the usual case: bytes grow with bits), else each group's column order. Weights
    of options not allowed are +inf, so they sort last.
    """
    w_col = np.empty(weight.shape[::-1])
    np.copyto(w_col, weight.T)
    np.copyto(w_col, np.inf, where=~allowed.T)
    if bool((w_col[1:] >= w_col[:-1]).all()):
        return None, w_col, np.ascontiguousarray(cost.T)
    del w_col
    key = np.where(allowed, weight, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    w_col = np.ascontiguousarray(_take(key, order).T)
    del key
    return order, w_col, np.ascontiguousarray(_take(cost, order).T)


def _index_dtype(options: int):
    return np.int8 if options <= 127 else np.int32


def _hull_points(cost: np.ndarray, weight: np.ndarray, allowed: np.ndarray):
    """Each group's lower-hull options, lightest first, up to its cheapest one.

    Returns ``(points, count, hw, hc)``, all in column layout (one row per hull position):
    ``points[:count[g], g]`` are option indices of group ``g``, ``hw`` and ``hc`` their weights and
    costs (positions past ``count[g]`` hold filler). Options are first sorted by weight. Of
    equal-weight options only the cheapest (the first among equals) stays. Option ``b`` is a hull
    vertex iff the steepest slope into it from a lighter option is below the shallowest slope out
    of it to a heavier one. With a handful of options per group these are a few dozen whole-column
    operations, with no loop over groups; the slopes are folded into running maxima and minima as
    they are computed, so at most one slope vector is alive at a time.
    """
    options = cost.shape[1]
    order, w_col, c_col = _column_layout(cost, weight, allowed)
    on = np.isfinite(w_col)
    if (w_col[1:] == w_col[:-1]).any():  # equal weights sit side by side once sorted
        for a in range(options - 1):
            for b in range(a + 1, options):
                same = w_col[a] == w_col[b]
                on[b] &= ~(same & (c_col[b] >= c_col[a]))
                on[a] &= ~(same & (c_col[b] < c_col[a]))
    inner = range(1, options - 1)  # the first and the last position need no slope test
    into = {b: None for b in inner}
    out = {b: None for b in inner}
    with np.errstate(invalid="ignore", divide="ignore"):
        for a in range(options - 1):
            for b in range(a + 1, options):
                if a not in out and b not in into:
                    continue
                dw = w_col[b] - w_col[a]
                ok = dw > 0
                ok &= dw < np.inf
                slope = c_col[b] - c_col[a]
                slope /= dw
                del dw
                np.copyto(slope, np.nan, where=~ok)
                if b in into:
                    into[b] = slope if into[b] is None else np.fmax(into[b], slope, out=into[b])
                if a in out:
                    out[a] = slope.copy() if out[a] is None else np.fmin(out[a], slope, out=out[a])
                del slope
    for b in inner:
        on[b] &= ~(into[b] >= out[b])
        into[b] = out[b] = None
    # Past its cheapest point a hull climbs again: those points are dominated.
    on &= np.arange(options)[:, None] <= _first_argmin(on, c_col)[None, :]
    points, count = _compact(on)
    del on
    hw, hc = _gather(w_col, points), _gather(c_col, points)
    del w_col, c_col
    points, count, hw, hc = _strictly_convex(points, count, hw, hc)
    if order is not None:
        points = np.take_along_axis(order.T, points.astype(np.intp), axis=0).astype(points.dtype)
    return points, count, hw, hc


def _first_argmin(on: np.ndarray, c_col: np.ndarray) -> np.ndarray:
    """``argmin(where(on, c_col, inf), axis=0)`` without the full-size temporary."""
    if np.isnan(c_col).any():  # argmin's NaN rule (the first NaN wins): leave it to numpy
        return np.argmin(np.where(on, c_col, np.inf), axis=0)
    best = np.where(on[0], c_col[0], np.inf)
    index = np.zeros(c_col.shape[1], dtype=np.intp)
    for r in range(1, c_col.shape[0]):
        cand = np.where(on[r], c_col[r], np.inf)
        better = cand < best
        index[better] = r
        np.copyto(best, cand, where=better)
    return index


def _gather(col: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``col[points[r, g], g]`` for column-layout arrays."""
    groups = col.shape[1]
    out = np.empty(points.shape)
    at = np.arange(groups)
    for r in range(points.shape[0]):
        out[r] = col.ravel()[points[r].astype(np.intp) * groups + at]
    return out


def _compact(on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group (columns of ``on``), the positions that are on, first ones first (column layout)."""
    options, groups = on.shape
    cum = np.cumsum(on, axis=0, dtype=np.int8 if options <= 127 else np.int32)
    points = np.empty((options, groups), dtype=_index_dtype(options))
    for r in range(options):
        # the (r+1)-th set position is the number of positions with fewer than r+1 set up to them
        points[r] = np.minimum((cum <= r).sum(axis=0), options - 1)
    return points, cum[-1].astype(np.int64)


def _strictly_convex(points, count, hw, hc):
    """Drop vertices whose segment efficiencies do not strictly fall (float rounding near collinear).

    The greedy relies on it: a group's segments must come out of the sort in hull order. A pass
    drops one vertex per offending group; only the groups changed by a pass are looked at again.
    """
    options = points.shape[0]
    todo = None  # all groups
    for _ in range(options):
        w, c = (hw, hc) if todo is None else (hw[:, todo], hc[:, todo])
        n = count if todo is None else count[todo]
        with np.errstate(invalid="ignore", divide="ignore"):
            eff = (c[:-1] - c[1:]) / (w[1:] - w[:-1])
        real = np.arange(1, options)[:, None] < n[None, :]
        bad = real[1:] & (eff[1:] >= eff[:-1])  # vertex k+1 between segments k and k+1
        del eff, real
        if not bad.any():
            break
        # one vertex per group per pass: the first offending one
        g = np.flatnonzero(bad.any(axis=0))
        k = np.argmax(bad[:, g], axis=0) + 1
        if todo is not None:
            g = todo[g]
        for r in range(options - 1):
            move = g[k <= r]
            for arr in (points, hw, hc):
                arr[r, move] = arr[r + 1, move]
        count[g] -= 1
        todo = g
    return points, count, hw, hc


class MCKHull:
    """The budget-independent part of the greedy: each group's hull and its upgrade segments.

    Parameters
    ----------
    cost, weight : ndarray, shape (groups, options)
        Cost (to minimise) and weight of every option.
    allowed : ndarray of bool, optional
        Options that may be chosen; default all. Every group needs at least one.
    """

    def __init__(self, cost: np.ndarray, weight: np.ndarray, allowed: np.ndarray | None = None):
        cost = np.asarray(cost, dtype=np.float64)
        weight = np.asarray(weight, dtype=np.float64)
        allowed = np.ones(cost.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
        if not allowed.any(axis=1).all():
            raise ValueError(f"group {int(np.flatnonzero(~allowed.any(axis=1))[0])} has no allowed option")
        self.cost, self.weight = cost, weight
        # points: (positions, groups), the hull's option indices; hw/hc their weights and costs
        self.points, self.count, hw, hc = _hull_points(cost, weight, allowed)
        self.lightest = self.points[0].astype(np.int64)
        self.min_weight = float(hw[0].sum())
        self.base_cost = float(hc[0].sum())
        # Segment k of a group goes from hull point k to k + 1; the mask keeps the real ones, and
        # the transposed views keep the segments in group order (a group's segments side by side).
        real = (np.arange(1, cost.shape[1])[:, None] < self.count[None, :]).T
        with np.errstate(invalid="ignore"):  # padding past a group's hull (inf - inf): masked out
            hw = np.subtract(hw[1:], hw[:-1], out=hw[1:])
        self.d_w = hw.T[real]
        del hw
        hc = np.subtract(hc[1:], hc[:-1], out=hc[1:])
        self.d_c = hc.T[real]  # negative: an upgrade saves cost
        del hc, real
        self.seg_group = np.repeat(np.arange(cost.shape[0], dtype=np.int32), self.count - 1)
        # minus the efficiency (cost saved per unit of weight): the sort key, smallest first
        self._neg_efficiency = self.d_c / self.d_w

    @property
    def efficiency(self) -> np.ndarray:
        """Cost saved per unit of weight of every segment."""
        return -self._neg_efficiency

    def _cut(self, room: float) -> tuple[np.ndarray, int | None]:
        """Segments taken whole (most efficient first) within ``room``, and the first that does not fit.

        An exact sort of the few segments near the cut only: a sample of efficiencies places the
        cut, ``argpartition`` splits off the segments surely above and below it, and the bracket is
        widened until the cut provably lies inside.
        """
        neg = self._neg_efficiency
        n = neg.size
        if n == 0 or float(self.d_w.sum()) <= room:
            return np.arange(n), None
        pick = np.random.default_rng(0).integers(0, n, min(n, 20_000))
        pick = pick[np.argsort(neg[pick], kind="stable")]
        # cumulative weight of the sample, scaled up: where the cut falls in the full order
        est = np.cumsum(self.d_w[pick]) * (n / pick.size)
        guess = int(np.searchsorted(est, room) * n / pick.size)
        margin = max(2_000, n // 100)
        while True:
            lo, hi = max(guess - margin, 0), min(guess + margin, n)
            if hi - lo >= n // 2 or (lo == 0 and hi == n):
                order = np.argsort(neg, kind="stable")
                lo, hi = 0, n
            else:
                order = np.argpartition(neg, [lo, hi - 1]) if hi < n else np.argpartition(neg, lo)
            top = float(self.d_w[order[:lo]].sum())
            mid = order[lo:hi][np.argsort(neg[order[lo:hi]], kind="stable")]
            cum = top + np.cumsum(self.d_w[mid])
            if top <= room and (hi == n or cum[-1] > room):
                k = int(np.searchsorted(cum, room, side="right"))
                taken = np.concatenate([order[:lo], mid[:k]])
                return taken, (int(mid[k]) if k < mid.size else None)
            guess = lo if top > room else hi
            margin *= 4

    def greedy(self, budget: float) -> MCKGreedyResult:
        """The LP optimum and a rounded integral choice for ``budget``."""
        groups = self.points.shape[1]
        rows = np.arange(groups)
        if self.min_weight > budget * (1 + _REL_TOL):
            return MCKGreedyResult(
                self.lightest, self.base_cost, self.min_weight, np.inf, False, self.min_weight
            )
        room = budget * (1 + _REL_TOL) - self.min_weight
        taken, frac = self._cut(room)
        lp = self.base_cost + float(self.d_c[taken].sum())
        multiplier = 0.0
        if frac is not None:
            left = budget - self.min_weight - float(self.d_w[taken].sum())
            lp += float(self.d_c[frac]) * max(0.0, left) / float(self.d_w[frac])
            multiplier = -float(self._neg_efficiency[frac])
        # The segments of a group are taken in hull order: its choice is the point after its last.
        rank = np.bincount(self.seg_group[taken], minlength=groups)
        rank = self._fill(rank, budget)
        choice = self.points[rank, rows].astype(np.int64)
        cost = float(self.cost[rows, choice].sum())
        weight = float(self.weight[rows, choice].sum())
        return MCKGreedyResult(choice, cost, weight, min(lp, cost), True, self.min_weight, multiplier)

    def _fill(self, rank: np.ndarray, budget: float, rounds: int = 8) -> np.ndarray:
        """After the LP cut, keep taking next hull segments that still fit, best efficiency first."""
        rows = np.arange(rank.size)
        room = budget * (1 + _REL_TOL) - float(self.weight[rows, self.points[rank, rows]].sum())
        open_ = np.flatnonzero(rank + 1 < self.count)
        for _ in range(rounds):
            cur = self.points[rank[open_], open_]
            nxt = self.points[rank[open_] + 1, open_]
            d_w = self.weight[open_, nxt] - self.weight[open_, cur]
            fits = d_w <= room
            if not fits.any():
                break
            open_, d_w = open_[fits], d_w[fits]
            d_c = self.cost[open_, nxt[fits]] - self.cost[open_, cur[fits]]
            order = np.argsort(d_c / d_w, kind="stable")
            take = order[: max(1, int(np.searchsorted(np.cumsum(d_w[order]), room, side="right")))]
            rank[open_[take]] += 1
            room -= float(d_w[take].sum())
            open_ = open_[rank[open_] + 1 < self.count[open_]]
        return rank


@dataclass(frozen=True)
class MCKGreedyResult:
    """Outcome of :func:`mck_greedy`.

    Attributes
    ----------
    choice : ndarray of int, shape (groups,)
        Chosen option per group (integral, feasible).
    cost : float
        Total cost of ``choice``.
    weight : float
        Total weight of ``choice``.
    lp_bound : float
        Optimum of the LP relaxation: no choice within the budget costs less.
    feasible : bool
        False when even the lightest option of every group exceeds the budget.
    min_weight : float
        Total weight with the lightest option in every group.
    multiplier : float
        Optimal LP multiplier of the budget row (cost saved per unit of weight at the cut):
        ``lp_bound`` equals ``Σ_g min_k (cost + multiplier · weight) − multiplier · budget``.
    """

    choice: np.ndarray
    cost: float
    weight: float
    lp_bound: float
    feasible: bool
    min_weight: float
    multiplier: float = 0.0

    @property
    def gap(self) -> float:
        """Certified relative gap ``(cost − lp_bound) / |cost|`` of the greedy choice."""
        if self.cost == self.lp_bound:
            return 0.0
        return abs(self.cost - self.lp_bound) / abs(self.cost) if self.cost != 0 else np.inf


def mck_greedy(
    cost: np.ndarray, weight: np.ndarray, budget: float, allowed: np.ndarray | None = None
) -> MCKGreedyResult:
    """Solve the LP relaxation of a min-cost multiple-choice knapsack and round it.

    Parameters
    ----------
    cost, weight : ndarray, shape (groups, options)
        Cost (to minimise) and weight of every option.
    budget : float
        Upper limit on total weight.
    allowed : ndarray of bool, optional
        Options that may be chosen; default all. Every group needs at least one.

    Returns
    -------
    MCKGreedyResult
    """
    return MCKHull(cost, weight, allowed).greedy(budget)
