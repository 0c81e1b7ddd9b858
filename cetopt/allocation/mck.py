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


def _sorted_by_weight(weight: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Column order of each group by weight (``None`` when the columns are already in order)."""
    key = np.where(allowed, weight, np.inf)
    if bool((key[:, 1:] >= key[:, :-1]).all()):
        return None, key
    order = np.argsort(key, axis=1, kind="stable")
    return order, _take(key, order)


def _take(arr: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``arr[g, cols[g, j]]`` through flat indices (faster than ``take_along_axis``)."""
    flat = cols + (np.arange(arr.shape[0]) * arr.shape[1])[:, None]
    return arr.ravel()[flat]


def _hull_points(cost: np.ndarray, weight: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's lower-hull options, lightest first, up to its cheapest one.

    Returns ``(points, count)``: ``points[g, :count[g]]`` are option indices of group ``g``.
    Options are first sorted by weight. Of equal-weight options only the cheapest (the first among
    equals) stays; an option ``b`` is off the hull iff some pair ``a``, ``c`` with
    ``w_a < w_b < w_c`` has ``b`` on or above the segment ``a → c``. With a handful of options per
    group that is a few dozen whole-column comparisons, with no loop over groups.
    """
    groups, options = cost.shape
    order, ws = _sorted_by_weight(weight, allowed)
    cs = cost if order is None else _take(cost, order)
    # one contiguous vector per sorted position
    w_col, c_col = np.ascontiguousarray(ws.T), np.ascontiguousarray(cs.T)
    on = np.isfinite(w_col)
    for a in range(options):
        for b in range(a + 1, options):
            same = w_col[a] == w_col[b]
            on[b] &= ~(same & (c_col[b] >= c_col[a]))
            on[a] &= ~(same & (c_col[b] < c_col[a]))
    for b in range(1, options - 1):
        for a in range(b):
            for c in range(b + 1, options):
                wa, ca = w_col[a], c_col[a]
                with np.errstate(invalid="ignore"):
                    above = (c_col[b] - ca) * (w_col[c] - wa) >= (c_col[c] - ca) * (w_col[b] - wa)
                on[b] &= ~(above & (wa < w_col[b]) & (w_col[b] < w_col[c]))
    # Past its cheapest point a hull climbs again: those points are dominated.
    hull_cost = np.where(on, c_col, np.inf)
    on &= np.arange(options)[:, None] <= np.argmin(hull_cost, axis=0)[None, :]
    count = on.sum(axis=0)
    rank = np.cumsum(on, axis=0) - 1
    g, pos = np.nonzero(on.T)  # row-major: each group's points in sorted order
    points = np.zeros((groups, options), dtype=np.int64)
    points[g, rank.T[g, pos]] = pos if order is None else order[g, pos]
    return points, count


class MCKHull:
    """The budget-independent part of the greedy: hulls and the segments sorted by efficiency.

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
        groups = cost.shape[0]
        points, count = _hull_points(cost, weight, allowed)
        self.points, self.count = points, count
        rows = np.arange(groups)
        self.lightest = points[:, 0].astype(np.int64)
        self.min_weight = float(weight[rows, self.lightest].sum())
        self.base_cost = float(cost[rows, self.lightest].sum())
        seg_group = [np.flatnonzero(count > k) for k in range(1, cost.shape[1])]
        seg_rank = np.repeat(np.arange(1, cost.shape[1]), [s.size for s in seg_group])
        seg_group = np.concatenate(seg_group) if seg_group else np.zeros(0, np.int64)
        to = points[seg_group, seg_rank]
        frm = points[seg_group, seg_rank - 1]
        d_w = weight[seg_group, to] - weight[seg_group, frm]
        d_c = cost[seg_group, to] - cost[seg_group, frm]  # negative: an upgrade saves cost
        by_eff = np.argsort(d_c / d_w)  # most cost saved per unit weight first
        self.seg_group = seg_group[by_eff]
        self.d_w, self.d_c = d_w[by_eff], d_c[by_eff]
        self.cum_w = self.min_weight + np.cumsum(self.d_w)
        self.cum_c = self.base_cost + np.cumsum(self.d_c)

    def greedy(self, budget: float) -> MCKGreedyResult:
        """The LP optimum and a rounded integral choice for ``budget``."""
        groups = self.points.shape[0]
        rows = np.arange(groups)
        if self.min_weight > budget * (1 + _REL_TOL):
            cost = self.base_cost
            return MCKGreedyResult(self.lightest, cost, self.min_weight, np.inf, False, self.min_weight)
        n_full = int(np.searchsorted(self.cum_w, budget * (1 + _REL_TOL), side="right"))
        lp = float(self.cum_c[n_full - 1]) if n_full else self.base_cost
        multiplier = 0.0
        if n_full < self.d_w.size:
            room = budget - (self.cum_w[n_full - 1] if n_full else self.min_weight)
            lp += float(self.d_c[n_full]) * max(0.0, room) / float(self.d_w[n_full])
            multiplier = float(-self.d_c[n_full] / self.d_w[n_full])
        # The segments of a group are taken in hull order: its choice is the point after its last.
        rank = np.bincount(self.seg_group[:n_full], minlength=groups)
        rank = self._fill(rank, budget)
        choice = self.points[rows, rank].astype(np.int64)
        cost = float(self.cost[rows, choice].sum())
        weight = float(self.weight[rows, choice].sum())
        return MCKGreedyResult(choice, cost, weight, min(lp, cost), True, self.min_weight, multiplier)

    def _fill(self, rank: np.ndarray, budget: float, rounds: int = 8) -> np.ndarray:
        """After the LP cut, keep taking next hull segments that still fit, best efficiency first."""
        rows = np.arange(rank.size)
        for _ in range(rounds):
            choice = self.points[rows, rank]
            room = budget * (1 + _REL_TOL) - float(self.weight[rows, choice].sum())
            open_ = np.flatnonzero(rank + 1 < self.count)
            nxt = self.points[open_, rank[open_] + 1]
            cur = choice[open_]
            d_w = self.weight[open_, nxt] - self.weight[open_, cur]
            fits = d_w <= room
            if not fits.any():
                break
            open_, d_w = open_[fits], d_w[fits]
            d_c = self.cost[open_, nxt[fits]] - self.cost[open_, cur[fits]]
            order = np.argsort(d_c / d_w, kind="stable")
            take = order[: int(np.searchsorted(np.cumsum(d_w[order]), room, side="right"))]
            if take.size == 0:
                take = order[:1]
            rank[open_[take]] += 1
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
