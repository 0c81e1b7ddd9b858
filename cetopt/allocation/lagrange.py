"""Lagrangian dual of a multiple-choice knapsack with a few budget rows.

Pricing every budget row ``j`` at a multiplier ``λ_j ≥ 0`` splits the problem into one choice per
group: ``L(λ) = Σ_g min_k (c_gk + Σ_j λ_j r_jgk) − Σ_j λ_j b_j`` is a lower bound on the integer
optimum for every ``λ ≥ 0``, and its maximum equals the LP relaxation's optimum (the one-hot rows
have integral vertices). ``L`` is concave and piecewise linear in a handful of variables; it is
maximised by a cutting-plane method kept in a box around the best point (Marsten's boxstep), each
master being a tiny LP solved by HiGHS through :func:`cetopt.solve`.

Every evaluated ``λ`` also yields a plan; plans are repaired to feasibility and filled with the
remaining slack by vectorised greedy rounds. The best plan and the best bound certify each other.
Reduced costs at the best ``λ`` then fix every option that no plan as good as the incumbent can
use (:func:`reduced_cost_core`), which leaves a small core for an exact MILP.

Resources are scaled by their limits (so ``b_j = 1``) and costs by their largest magnitude; the
multipliers returned are in the caller's units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cetopt.problem import MILP, Status

__all__ = ["LagrangianResult", "dual_value", "lagrangian_mck", "reduced_cost_core"]

_FEAS_TOL = 1e-12


@dataclass(frozen=True)
class LagrangianResult:
    """Outcome of :func:`lagrangian_mck`.

    Attributes
    ----------
    choice : ndarray of int or None
        The best feasible plan found (one option per group), or ``None`` if no heuristic found one.
    cost : float
        Its cost (``inf`` without a plan).
    bound : float
        The best dual bound ``L(λ)``: no feasible plan costs less.
    multipliers : ndarray
        The ``λ`` that gave ``bound``, one per budget row, in cost per unit of that resource.
    evaluations : int
        Dual evaluations (each is one pass over all groups).
    """

    choice: np.ndarray | None
    cost: float
    bound: float
    multipliers: np.ndarray
    evaluations: int

    @property
    def gap(self) -> float:
        """Certified relative gap of ``choice`` against ``bound``."""
        if self.choice is None:
            return np.inf
        if self.cost == self.bound:
            return 0.0
        return abs(self.cost - self.bound) / abs(self.cost) if self.cost != 0 else np.inf


class _Scaled:
    """Costs with disallowed options at +inf, resources divided by their limits."""

    def __init__(self, cost, resources, limits, allowed):
        self.scale = float(np.abs(np.where(allowed, cost, 0)).max()) or 1.0
        self.c = np.where(allowed, cost / self.scale, np.inf)
        self.r = [np.asarray(r, dtype=np.float64) / float(b) for r, b in zip(resources, limits)]
        self.limits = np.asarray(limits, dtype=np.float64)
        self.rows = np.arange(self.c.shape[0])
        self._buffers: list[np.ndarray] = []

    def usage(self, choice: np.ndarray) -> np.ndarray:
        return np.array([float(r[self.rows, choice].sum()) for r in self.r])

    def cost(self, choice: np.ndarray) -> float:
        return float(self.c[self.rows, choice].sum())

    def buffer(self, i: int) -> np.ndarray:
        """Scratch array ``i`` of the cost's shape, kept between calls (page faults once, not per use).

        ``priced`` uses buffers 0 and 1, ``_moves`` 0 to 2: a result in one is valid until the next
        call of either.
        """
        while len(self._buffers) <= i:
            self._buffers.append(np.empty_like(self.c))
        return self._buffers[i]

    def priced(self, lam: np.ndarray) -> np.ndarray:
        """``c + Σ_j λ_j r_j``, in buffer 0."""
        z = self.buffer(0)
        np.copyto(z, self.c)
        for lj, r in zip(lam, self.r):
            if lj:
                z += np.multiply(lj, r, out=self.buffer(1))
        return z

    def evaluate(self, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``L(λ)``, the minimising choice and its subgradient (usage − 1)."""
        z = self.priced(lam)
        choice = np.argmin(z, axis=1)
        value = float(z[self.rows, choice].sum()) - float(lam.sum())
        return value, choice, self.usage(choice) - 1.0

    def feasible(self, choice: np.ndarray) -> bool:
        return bool((self.usage(choice) <= 1.0 + _FEAS_TOL).all())


def dual_value(cost, resources, limits, allowed, multipliers) -> float:
    """``L(λ)`` in the caller's units: a lower bound on the cost of every feasible plan.

    Parameters
    ----------
    cost : ndarray, shape (groups, options)
    resources : list of ndarray, each (groups, options)
    limits : sequence of float
    allowed : ndarray of bool, shape (groups, options)
    multipliers : sequence of float, one ``λ_j ≥ 0`` per resource (cost per unit of it)
    """
    lam = np.asarray(multipliers, dtype=np.float64)
    z = np.where(allowed, cost, np.inf)
    for lj, r in zip(lam, resources):
        if lj:
            z = z + lj * r
    return float(z.min(axis=1).sum() - float(lam @ np.asarray(limits, dtype=np.float64)))


def _moves(s: _Scaled, choice: np.ndarray, slack: np.ndarray, repair: bool, subset: np.ndarray | None = None):
    """Per group, its best single move: (rows, option, score, Δusage per resource) of those that help.

    Filling: a move must save cost and fit every slack; its score is the cost saved per unit of
    slack used (higher first). Repairing: a move must not worsen any violated row nor overrun any
    slack; its score is the cost added per unit of violation removed (lower first).

    Each group's moves depend on its own row alone, so the work is arranged for speed without
    changing a value: the admissibility tests come first and the scores are computed only for the
    groups with an admissible move; a set of groups covering most rows is handled in place (the
    others masked out) rather than copied out.
    """
    n = s.rows.size
    work = _Rows(s, choice, None if subset is None or 2 * subset.size > n else subset)
    dc = work.delta(s.c, s.buffer(0))
    ok = np.isfinite(dc)
    if not repair:
        ok &= dc < 0
    if subset is not None and work.index is None:
        outside = np.ones(n, dtype=bool)
        outside[subset] = False
        ok[outside] = False
    over = slack < 0
    test = np.empty_like(ok)
    for j, r in enumerate(s.r):
        dr = work.delta(r, s.buffer(1))
        np.less_equal(dr, 0 if repair and over[j] else max(slack[j], 0.0), out=test)
        ok &= test
    del test
    live = np.flatnonzero(ok.any(axis=1))
    if 2 * live.size <= ok.shape[0]:  # few groups can move: copy their rows out
        dc, ok, work = dc[live], ok[live], work.narrow(live)
    use = s.buffer(2)[: dc.shape[0]]
    use.fill(0.0)
    for j, r in enumerate(s.r):
        if repair and over[j]:
            dr = work.delta(r, s.buffer(1))
            dr /= -slack[j]
            use -= dr
        elif not repair and slack[j] > 0:
            dr = work.delta(r, s.buffer(1))
            np.maximum(dr, 0.0, out=dr)
            dr /= slack[j]
            use += dr
    if repair:
        ok &= use > 0
        np.maximum(dc, 0.0, out=dc)
        np.copyto(use, 1.0, where=~ok)
        dc /= use
        np.copyto(dc, np.inf, where=~ok)
        k = np.argmin(dc, axis=1)
    else:
        np.maximum(use, 1e-300, out=use)
        np.negative(dc, out=dc)
        dc /= use
        np.copyto(dc, -np.inf, where=~ok)
        k = np.argmax(dc, axis=1)
    best = dc[np.arange(dc.shape[0]), k]
    found = np.flatnonzero(np.isfinite(best))
    rows, k = work.rows(found), k[found]
    moved = np.stack([r[rows, k] - r[rows, choice[rows]] for r in s.r], axis=1)
    return rows, k, best[found], moved


class _Rows:
    """The groups ``_moves`` works on: all of them in place (``index`` None) or a copied-out subset."""

    def __init__(self, s: _Scaled, choice: np.ndarray, index: np.ndarray | None):
        self.index = index
        self.choice = choice if index is None else choice[index]
        self.at = s.rows if index is None else np.arange(index.size)

    def narrow(self, live: np.ndarray) -> _Rows:
        out = _Rows.__new__(_Rows)
        out.index = live if self.index is None else self.index[live]
        out.choice, out.at = self.choice[live], np.arange(live.size)
        return out

    def delta(self, arr: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """``arr[g, k] − arr[g, choice[g]]`` for the groups worked on, written into ``buf``."""
        part = arr if self.index is None else arr[self.index]
        out = buf[: part.shape[0]]
        return np.subtract(part, part[self.at, self.choice][:, None], out=out)

    def rows(self, found: np.ndarray) -> np.ndarray:
        return found if self.index is None else self.index[found]


def _fill(s: _Scaled, choice: np.ndarray, rounds: int = 6) -> np.ndarray:
    """Spend the slack of a feasible plan on the moves that save most cost per unit of slack."""
    choice = choice.copy()
    subset = None  # slack only shrinks: a group with no move that fits never gets one later
    for _ in range(rounds):
        slack = 1.0 - s.usage(choice)
        rows, k, score, delta = _moves(s, choice, slack, repair=False, subset=subset)
        if rows.size == 0:
            break
        subset = rows
        order = np.argsort(-score, kind="stable")
        over = (np.cumsum(delta[order], axis=0) > slack[None, :] + _FEAS_TOL).any(axis=1)
        n = int(np.argmax(over)) if over.any() else order.size
        take = order[: max(n, 1)]
        choice[rows[take]] = k[take]
    return choice


def _repair(s: _Scaled, choice: np.ndarray, rounds: int = 30) -> np.ndarray | None:
    """Move groups to cheaper-in-resource options until every budget holds; ``None`` if stuck."""
    choice = choice.copy()
    for _ in range(rounds):
        slack = 1.0 - s.usage(choice)
        if (slack >= -_FEAS_TOL).all():
            return choice
        rows, k, score, delta = _moves(s, choice, slack, repair=True)
        if rows.size == 0:
            return None
        order = np.argsort(score, kind="stable")
        need = np.where(slack < 0, slack, -np.inf)  # cumulative Δusage must fall to ≤ slack
        covered = (np.cumsum(delta[order], axis=0) <= need[None, :]).all(axis=1)
        n = int(np.argmax(covered)) + 1 if covered.any() else order.size
        take = order[:n]
        choice[rows[take]] = k[take]
    return choice if s.feasible(choice) else None


def _master(cuts, lo, hi) -> np.ndarray:
    """Maximise the cutting-plane model ``min_t v_t + g_t·(λ − λ_t)`` over the box ``[lo, hi]``."""
    from cetopt.solving import solve

    lam_t = np.array([c[0] for c in cuts])
    v = np.array([c[1] for c in cuts])
    g = np.array([c[2] for c in cuts])
    m = lam_t.shape[1]
    # variables (θ, λ): θ − g_t·λ ≤ v_t − g_t·λ_t
    a = np.hstack([np.ones((len(cuts), 1)), -g])
    problem = MILP(
        c=np.concatenate([[-1.0], np.zeros(m)]),
        A=a,
        row_lower=np.full(len(cuts), -np.inf),
        row_upper=v - np.einsum("tj,tj->t", g, lam_t),
        col_lower=np.concatenate([[-np.inf], lo]),
        col_upper=np.concatenate([[np.inf], hi]),
    )
    solution = solve(problem, "highs")
    if solution.status != Status.OPTIMAL or solution.x is None:
        return lam_t[int(np.argmax(v))]
    return np.clip(solution.x[1:], lo, hi)


def lagrangian_mck(
    cost: np.ndarray,
    resources: list[np.ndarray],
    limits,
    allowed: np.ndarray,
    *,
    multipliers=None,
    target_gap: float = 1e-4,
    max_evaluations: int = 60,
) -> LagrangianResult:
    """Maximise the Lagrangian dual of a multiple-choice knapsack and find a feasible plan near it.

    Parameters
    ----------
    cost : ndarray, shape (groups, options)
        Cost to minimise.
    resources : list of ndarray, each (groups, options)
        Resource use of every option, one array per budget row.
    limits : sequence of float
        The budgets (positive).
    allowed : ndarray of bool, shape (groups, options)
    multipliers : sequence of float, optional
        A starting ``λ`` (e.g. from a neighbouring budget), in cost per unit of resource.
    target_gap : float
        Stop once the plan is certified within this relative gap.
    max_evaluations : int
        Passes over the groups at most.

    Returns
    -------
    LagrangianResult
    """
    s = _Scaled(cost, resources, limits, allowed)
    m = len(s.r)
    lam = np.zeros(m) if multipliers is None else np.asarray(multipliers, float) * s.limits / s.scale
    lam = np.maximum(np.nan_to_num(lam, nan=0.0, posinf=0.0), 0.0)
    spread = float((np.where(allowed, s.c, -np.inf).max(axis=1) - s.c.min(axis=1)).sum())
    # No λ_j beyond this can pay: the whole cost spread bought with the least slack any row has.
    u_min = np.array([float(np.where(allowed, r, np.inf).min(axis=1).sum()) for r in s.r])
    hi_cap = 10 * spread / np.maximum(1.0 - u_min, 1e-9) + 1.0
    box = max(float(lam.max()), spread / max(s.c.shape[0], 1), 1e-9)
    best = (-np.inf, lam)
    incumbent, inc_cost = None, np.inf
    cuts = []
    infeasible_seen = None
    for _ in range(max_evaluations):
        value, choice, grad = s.evaluate(lam)
        cuts.append((lam.copy(), value, grad))
        if value > best[0]:
            # a serious step out to the edge of the box: the optimum may lie beyond, widen it
            if best[0] > -np.inf and np.abs(lam - best[1]).max() >= 0.999 * box:
                box *= 2
            best = (value, lam.copy())
        if (grad <= _FEAS_TOL).all() and s.cost(choice) < inc_cost:
            plan = _fill(s, choice)
            plan_cost = s.cost(plan)
            if plan_cost < inc_cost:
                incumbent, inc_cost = plan, plan_cost
        else:
            infeasible_seen = choice
        if incumbent is not None and _gap(inc_cost, best[0]) <= target_gap:
            break
        center = best[1]
        lo = np.maximum(center - box, 0.0)
        hi = np.minimum(center + box, hi_cap)
        new = _master(cuts, lo, hi)
        predicted = min(v + g @ (new - lt) for lt, v, g in cuts)
        if predicted - best[0] <= 1e-12 * max(1.0, abs(best[0])):
            break  # the model cannot rise above the best point: λ is optimal within the box
        lam = new
    if infeasible_seen is not None:
        z_best = s.evaluate(best[1])[1]
        for start in (z_best, infeasible_seen):
            repaired = _repair(s, start) if not s.feasible(start) else start
            if repaired is not None:
                plan = _fill(s, repaired)
                plan_cost = s.cost(plan)
                if plan_cost < inc_cost:
                    incumbent, inc_cost = plan, plan_cost
    lam_out = best[1] * s.scale / s.limits
    return LagrangianResult(incumbent, inc_cost * s.scale, best[0] * s.scale, lam_out, len(cuts))


def _gap(cost: float, bound: float) -> float:
    if cost == bound:
        return 0.0
    return abs(cost - bound) / abs(cost) if cost != 0 else np.inf


def reduced_cost_core(
    cost, resources, allowed, multipliers, bound: float, incumbent_cost: float
) -> np.ndarray:
    """Options that a plan costing at most ``incumbent_cost`` may still use.

    For every feasible plan, ``cost ≥ L(λ) + Σ_g δ_g`` where ``δ_g ≥ 0`` is its option's reduced
    cost ``c + λ·r − min_k (c + λ·r)`` in group ``g``. An option whose ``δ`` alone exceeds
    ``incumbent_cost − bound`` therefore appears in no plan at least as good as the incumbent.

    Returns
    -------
    ndarray of bool, shape (groups, options)
        ``allowed`` minus the options so excluded; the incumbent's own options always stay.
    """
    z = np.where(allowed, cost, np.inf)
    for lj, r in zip(multipliers, resources):
        if lj:
            z = z + lj * r
    delta = z - z.min(axis=1, keepdims=True)
    slack = incumbent_cost - bound
    margin = 1e-9 * max(abs(incumbent_cost), abs(bound), 1e-300)
    return allowed & (delta <= slack + margin)
