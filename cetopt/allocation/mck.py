"""The multiple-choice knapsack (MCK): pick one option per group, minimise total cost under one weight budget.

Its LP relaxation is solved exactly by a greedy walk along each group's lower convex hull
(Sinha & Zoltners, 1979):

1. Drop dominated options (no lighter-or-equal option with lower-or-equal cost).
2. Keep the lower convex hull of (weight, cost) per group; options above it are never LP-optimal.
3. Start every group at its lightest option. The hull segments of all groups, sorted by
   efficiency (cost saved per unit of weight), are taken in that order while the budget lasts.
   Convexity makes efficiencies decrease along each group's hull, so the global order respects
   the order inside every group.
4. The first segment that does not fit is taken fractionally: that value is the LP optimum,
   hence a proven lower bound on the integer optimum. Without the fraction (and continuing
   with later segments that still fit) the choice is integral and feasible.

Everything is vectorized over groups; the only loop is over the hull-pruning passes (at most the
number of options per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MCKGreedyResult", "mck_greedy", "pareto_options"]


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


def _lower_hull(cost: np.ndarray, weight: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Mask of options on each group's lower convex hull, among ``alive`` (already Pareto) options."""
    groups, options = cost.shape
    big = np.finfo(np.float64).max
    w = np.where(alive, weight, big)
    order = np.argsort(w, axis=1, kind="stable")
    ws = np.take_along_axis(weight, order, axis=1)
    cs = np.take_along_axis(cost, order, axis=1)
    on = np.take_along_axis(alive, order, axis=1).copy()
    rows = np.arange(groups)[:, None]
    cols = np.arange(options)[None, :]
    for _ in range(options):
        # previous and next alive neighbours of every option, by position in the sorted row
        idx = np.where(on, cols, -1)
        prev = np.maximum.accumulate(np.concatenate([np.full((groups, 1), -1), idx[:, :-1]], axis=1), axis=1)
        idx_next = np.where(on, cols, options)
        nxt = np.minimum.accumulate(
            np.concatenate([idx_next[:, 1:], np.full((groups, 1), options)], axis=1)[:, ::-1], axis=1
        )[:, ::-1]
        interior = on & (prev >= 0) & (nxt < options)
        p = np.clip(prev, 0, options - 1)
        q = np.clip(nxt, 0, options - 1)
        # Point b lies on or above the segment a→c iff (c_b − c_a)(w_c − w_a) ≥ (c_c − c_a)(w_b − w_a).
        # (Entries of dead options hold sentinels and may overflow; `interior` masks them out.)
        with np.errstate(over="ignore", invalid="ignore"):
            lhs = (cs - cs[rows, p]) * (ws[rows, q] - ws[rows, p])
            rhs = (cs[rows, q] - cs[rows, p]) * (ws - ws[rows, p])
        drop = interior & (lhs >= rhs)
        if not drop.any():
            break
        # Never drop two hull-neighbours in one pass: each test assumed its neighbours stay.
        on &= ~(drop & ~(drop[rows, p] & (prev >= 0)))
    hull = np.zeros_like(on)
    np.put_along_axis(hull, order, on, axis=1)
    return hull


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
    """

    choice: np.ndarray
    cost: float
    weight: float
    lp_bound: float
    feasible: bool
    min_weight: float

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
    cost = np.asarray(cost, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    groups, options = cost.shape
    allowed = np.ones_like(cost, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if not allowed.any(axis=1).all():
        raise ValueError(f"group {int(np.flatnonzero(~allowed.any(axis=1))[0])} has no allowed option")
    big = np.finfo(np.float64).max / 4
    c = np.where(allowed, cost, big)
    w = np.where(allowed, weight, big)
    alive = pareto_options(c, w) & allowed
    hull = _lower_hull(c, w, alive)
    rows = np.arange(groups)
    # hull points per group, sorted by weight: consecutive pairs are the upgrade segments
    order = np.argsort(np.where(hull, w, np.inf), axis=1, kind="stable")
    lightest = order[:, 0]  # the cheapest among the lightest options
    min_weight = float(w[rows, lightest].sum())
    base_cost = float(c[rows, lightest].sum())
    if min_weight > budget * (1 + 1e-12):
        return MCKGreedyResult(lightest, base_cost, min_weight, np.inf, False, min_weight)
    n_hull = hull.sum(axis=1)
    seg_group, seg_from, seg_to = [np.zeros(0, int)], [np.zeros(0, int)], [np.zeros(0, int)]
    for k in range(1, options):
        has = n_hull > k
        seg_group.append(rows[has])
        seg_from.append(order[has, k - 1])
        seg_to.append(order[has, k])
    seg_group = np.concatenate(seg_group)
    seg_from = np.concatenate(seg_from)
    seg_to = np.concatenate(seg_to)
    d_w = w[seg_group, seg_to] - w[seg_group, seg_from]
    d_c = c[seg_group, seg_to] - c[seg_group, seg_from]  # negative: an upgrade saves cost
    efficiency = -d_c / d_w
    by_eff = np.argsort(-efficiency, kind="stable")
    cum_w = min_weight + np.cumsum(d_w[by_eff])
    n_full = int(np.searchsorted(cum_w, budget * (1 + 1e-12), side="right"))
    taken = by_eff[:n_full]
    lp = base_cost + float(d_c[taken].sum())
    if n_full < by_eff.size:
        frac_seg = by_eff[n_full]
        room = budget - (cum_w[n_full - 1] if n_full else min_weight)
        lp += d_c[frac_seg] * max(0.0, room) / d_w[frac_seg]
    choice = lightest.copy()
    # Segments of one group appear in hull order, so the last one taken is the group's choice.
    choice[seg_group[taken]] = seg_to[taken]
    used = cum_w[n_full - 1] if n_full else min_weight
    choice, used = _fill_remaining(choice, used, budget, by_eff[n_full:], seg_group, seg_from, seg_to, d_w)
    total_cost = float(c[rows, choice].sum())
    return MCKGreedyResult(choice, total_cost, float(used), min(lp, total_cost), True, min_weight)


def _fill_remaining(choice, used, budget, rest, seg_group, seg_from, seg_to, d_w):
    """After the LP cut, keep taking later segments that still fit and continue their group's hull."""
    for s in rest.tolist():
        g = seg_group[s]
        if choice[g] == seg_from[s] and used + d_w[s] <= budget * (1 + 1e-12):
            choice[g] = seg_to[s]
            used += d_w[s]
    return choice, used
