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
    equals) stays. Option ``b`` is a hull vertex iff the steepest slope into it from a lighter
    option is below the shallowest slope out of it to a heavier one. With a handful of options per
    group these are a few dozen whole-column operations, with no loop over groups.
    """
    options = cost.shape[1]
    order, ws = _sorted_by_weight(weight, allowed)
    cs = cost if order is None else _take(cost, order)
    w_col, c_col = np.ascontiguousarray(ws.T), np.ascontiguousarray(cs.T)  # one vector per position
    on = np.isfinite(w_col)
    if (w_col[1:] == w_col[:-1]).any():  # equal weights sit side by side once sorted
        for a in range(options - 1):
            for b in range(a + 1, options):
                same = w_col[a] == w_col[b]
                on[b] &= ~(same & (c_col[b] >= c_col[a]))
                on[a] &= ~(same & (c_col[b] < c_col[a]))
    slope = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for a in range(options - 1):
            for b in range(a + 1, options):
                dw = w_col[b] - w_col[a]
                slope[a, b] = np.where((dw > 0) & (dw < np.inf), (c_col[b] - c_col[a]) / dw, np.nan)
    for b in range(1, options - 1):
        into = np.fmax.reduce([slope[a, b] for a in range(b)])
        out = np.fmin.reduce([slope[b, c] for c in range(b + 1, options)])
        on[b] &= ~(into >= out)
    # Past its cheapest point a hull climbs again: those points are dominated.
    on &= np.arange(options)[:, None] <= np.argmin(np.where(on, c_col, np.inf), axis=0)[None, :]
    points, count = _compact(on)
    points, count = _strictly_convex(points, count, ws, cs)
    return (points if order is None else _take(order, points)), count


def _compact(on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group (columns of ``on``), the positions that are on, first ones first."""
    options, groups = on.shape
    cum = np.cumsum(on, axis=0, dtype=np.int8)
    points = np.zeros((groups, options), dtype=np.int64)
    for r in range(options):
        # the (r+1)-th set position is the number of positions with fewer than r+1 set up to them
        points[:, r] = np.minimum((cum <= r).sum(axis=0), options - 1)
    return points, cum[-1].astype(np.int64)


def _strictly_convex(points, count, ws, cs) -> tuple[np.ndarray, np.ndarray]:
    """Drop vertices whose segment efficiencies do not strictly fall (float rounding near collinear).

    The greedy relies on it: a group's segments must come out of the sort in hull order.
    """
    options = points.shape[1]
    for _ in range(options):
        hw, hc = _take(ws, points), _take(cs, points)
        with np.errstate(invalid="ignore", divide="ignore"):
            eff = (hc[:, :-1] - hc[:, 1:]) / (hw[:, 1:] - hw[:, :-1])
        real = np.arange(1, options)[None, :] < count[:, None]
        bad = real[:, 1:] & (eff[:, 1:] >= eff[:, :-1])  # vertex k+1 between segments k and k+1
        if not bad.any():
            break
        g, k = np.nonzero(bad)
        first = np.unique(g, return_index=True)[1]
        g, k = g[first], k[first] + 1  # one vertex per group per pass
        for r in range(options - 1):
            move = k <= r
            points[g[move], r] = points[g[move], r + 1]
        count[g] -= 1
    return points, count


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
        self.points, self.count = _hull_points(cost, weight, allowed)
        hull_w, hull_c = _take(weight, self.points), _take(cost, self.points)
        self.lightest = self.points[:, 0].copy()
        self.min_weight = float(hull_w[:, 0].sum())
        self.base_cost = float(hull_c[:, 0].sum())
        # Segment k of a group goes from hull point k to k + 1; the mask keeps the real ones.
        real = np.arange(1, cost.shape[1])[None, :] < self.count[:, None]
        self.d_w = (hull_w[:, 1:] - hull_w[:, :-1])[real]
        self.d_c = (hull_c[:, 1:] - hull_c[:, :-1])[real]  # negative: an upgrade saves cost
        self.seg_group = np.repeat(np.arange(cost.shape[0], dtype=np.int32), self.count - 1)
        self.efficiency = -self.d_c / self.d_w

    def _cut(self, room: float) -> tuple[np.ndarray, int | None]:
        """Segments taken whole (most efficient first) within ``room``, and the first that does not fit.

        An exact sort of the few segments near the cut only: a sample of efficiencies places the
        cut, ``argpartition`` splits off the segments surely above and below it, and the bracket is
        widened until the cut provably lies inside.
        """
        n = self.efficiency.size
        if n == 0 or float(self.d_w.sum()) <= room:
            return np.arange(n), None
        neg = -self.efficiency
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
        groups = self.points.shape[0]
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
            multiplier = float(self.efficiency[frac])
        # The segments of a group are taken in hull order: its choice is the point after its last.
        rank = np.bincount(self.seg_group[taken], minlength=groups)
        rank = self._fill(rank, budget)
        choice = self.points[rows, rank]
        cost = float(self.cost[rows, choice].sum())
        weight = float(self.weight[rows, choice].sum())
        return MCKGreedyResult(choice, cost, weight, min(lp, cost), True, self.min_weight, multiplier)

    def _fill(self, rank: np.ndarray, budget: float, rounds: int = 8) -> np.ndarray:
        """After the LP cut, keep taking next hull segments that still fit, best efficiency first."""
        rows = np.arange(rank.size)
        room = budget * (1 + _REL_TOL) - float(self.weight[rows, self.points[rows, rank]].sum())
        open_ = np.flatnonzero(rank + 1 < self.count)
        for _ in range(rounds):
            cur = self.points[open_, rank[open_]]
            nxt = self.points[open_, rank[open_] + 1]
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
