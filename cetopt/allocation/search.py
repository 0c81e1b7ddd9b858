"""Choosing one option per group under one or more budget rows, with a certified gap.

1. A feasible plan and a lower bound without any MILP: the convex-hull greedy for a single budget
   row (:mod:`cetopt.allocation.mck`), the Lagrangian dual for several
   (:mod:`cetopt.allocation.lagrange`).
2. If their certified gap misses ``mip_gap``, reduced costs at the dual multipliers fix every
   option no plan as good as the incumbent can use; the MILP (through :func:`cetopt.solve`,
   warm-started from the incumbent) sees only the groups left with a choice.
3. Whatever answered, the plan is checked against every budget and the allowed options, and its
   status follows the certified gap: ``optimal`` only when it is within ``mip_gap``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cetopt.allocation.lagrange import dual_value, lagrangian_mck, reduced_cost_core
from cetopt.allocation.mck import MCKHull
from cetopt.errors import InfeasibleBudgetError, SolverFailedError
from cetopt.problem import MILP, Status
from cetopt.solving import solve

__all__ = ["Answer", "Incumbent", "MultiChoice"]

_BUDGET_TOL = 1e-12
#: Float rounding allowed when comparing a certified gap with ``mip_gap`` (sums of 10^6 terms).
GAP_TOL = 1e-9


def relative_gap(cost: float, bound: float | None) -> float | None:
    """``(cost − bound) / |cost|`` (0 when equal), the gap every status is judged by."""
    if bound is None:
        return None
    if cost == bound or cost <= bound:
        return 0.0
    return (cost - bound) / abs(cost) if cost != 0 else np.inf


@dataclass(frozen=True)
class Incumbent:
    """What step 1 found: a plan (or none), a proven bound, and the multipliers behind it."""

    choice: np.ndarray | None
    cost: float
    bound: float
    multipliers: np.ndarray
    solver: str


@dataclass(frozen=True)
class Answer:
    """The final choice, its status, proven bound, and who answered."""

    choice: np.ndarray
    status: str
    bound: float | None
    solver: str
    multipliers: np.ndarray


class MultiChoice:
    """A multiple-choice knapsack: ``cost`` and one array per budget row, all ``(groups, options)``.

    Only the limits change along a budget sweep, so the hull of the first row is kept between calls.
    """

    def __init__(self, cost, resources, allowed, names):
        self.cost = np.asarray(cost, dtype=np.float64)
        self.resources = [np.asarray(r, dtype=np.float64) for r in resources]
        self.allowed = np.asarray(allowed, dtype=bool)
        self.names = list(names)
        self.rows = np.arange(self.cost.shape[0])
        self.all_allowed = bool(self.allowed.all())
        self._hull = None

    @property
    def hull(self) -> MCKHull:
        if self._hull is None:
            self._hull = MCKHull(self.cost, self.resources[0], self.allowed)
        return self._hull

    def minimum(self, j: int) -> float:
        r = self.resources[j]
        if self.all_allowed:
            return float(r.min(axis=1).sum())
        return float(np.where(self.allowed, r, np.inf).min(axis=1).sum())

    def totals(self, choice: np.ndarray) -> np.ndarray:
        return np.array([float(r[self.rows, choice].sum()) for r in self.resources])

    def over_budget(self, choice: np.ndarray, limits) -> list[str]:
        """Names of the budgets ``choice`` breaks (none for a valid plan)."""
        totals = self.totals(choice)
        return [n for n, t, b in zip(self.names, totals, limits) if not t <= b * (1 + _BUDGET_TOL)]

    def incumbent(self, limits, multipliers=None, mip_gap: float = 1e-4) -> Incumbent:
        """Step 1: a feasible plan and a bound, without a MILP."""
        greedy = self.hull.greedy(float(limits[0]))
        if len(self.resources) == 1:
            return Incumbent(
                greedy.choice, greedy.cost, greedy.lp_bound, np.array([greedy.multiplier]), "mck-greedy"
            )
        if multipliers is None:
            multipliers = np.zeros(len(self.resources))
            multipliers[0] = greedy.multiplier
        result = lagrangian_mck(
            self.cost, self.resources, limits, self.allowed, multipliers=multipliers, target_gap=mip_gap / 2
        )
        return Incumbent(result.choice, result.cost, result.bound, result.multipliers, "lagrangian")

    def solve(
        self, limits, incumbent: Incumbent, solver, time_limit, mip_gap, *, use_heuristics=True, t0=None
    ) -> Answer:
        """Steps 2–3: certify the incumbent or improve it with a MILP over the undecided core."""
        t0 = time.perf_counter() if t0 is None else t0
        have = incumbent.choice is not None and not self.over_budget(incumbent.choice, limits)
        if have and use_heuristics and relative_gap(incumbent.cost, incumbent.bound) <= mip_gap + GAP_TOL:
            return Answer(
                incumbent.choice, "optimal", incumbent.bound, incumbent.solver, incumbent.multipliers
            )
        remaining = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if have and remaining is not None and remaining <= 0:
            return self._answer(incumbent.choice, incumbent.bound, "time_limit", incumbent, mip_gap)
        keep, bound = self.allowed, incumbent.bound if have else -np.inf
        if have and use_heuristics:
            lam = incumbent.multipliers
            bound = max(bound, dual_value(self.cost, self.resources, limits, self.allowed, lam))
            keep = reduced_cost_core(self.cost, self.resources, self.allowed, lam, bound, incumbent.cost)
        keep = keep & ~_dominated(self.cost, self.resources, keep)
        if have:
            keep[self.rows, incumbent.choice] = True  # its own options survive any tie-breaking
        free = np.flatnonzero(keep.sum(axis=1) > 1)
        fixed = np.argmax(keep, axis=1)
        if have:
            fixed = incumbent.choice.copy()
        if free.size == 0:  # one plan left at most as costly as the incumbent: it
            if have:
                return Answer(
                    incumbent.choice, "optimal", incumbent.cost, incumbent.solver, incumbent.multipliers
                )
            if self.over_budget(fixed, limits):
                raise _infeasible(self.names)
            cost = float(self.cost[self.rows, fixed].sum())
            return Answer(fixed, "optimal", cost, "presolve", incumbent.multipliers)
        return self._core_milp(
            limits, incumbent if have else None, keep, free, fixed, bound, solver, remaining, mip_gap
        )

    def _core_milp(self, limits, incumbent, keep, free, fixed, bound, solver, time_limit, mip_gap) -> Answer:
        rest = np.ones(self.rows.size, dtype=bool)
        rest[free] = False
        fixed_cost = float(self.cost[self.rows[rest], fixed[rest]].sum())
        used = [float(r[self.rows[rest], fixed[rest]].sum()) for r in self.resources]
        cost = self.cost[free]
        scale = float(np.abs(cost[keep[free]]).max()) or 1.0
        # Loss increases are often ~1e-6, far below the solvers' absolute tolerances: scale them to 1.
        problem = _milp(
            cost / scale, [r[free] for r in self.resources], np.subtract(limits, used), keep[free]
        )
        start, gap = None, mip_gap
        if incumbent is not None:
            start = np.zeros(problem.num_cols)
            start[np.arange(free.size) * cost.shape[1] + incumbent.choice[free]] = 1.0
            start = start if problem.violation(start) <= 1e-9 else None
            core_cost = incumbent.cost - fixed_cost
            if core_cost != 0:  # the same absolute gap on the core alone
                gap = min(1.0, mip_gap * abs(incumbent.cost) / abs(core_cost))
        solution = solve(problem, solver, time_limit, gap, start=start)
        return self._take(
            solution, limits, incumbent, keep, free, fixed, fixed_cost, scale, bound, mip_gap, gap
        )

    def _take(
        self, solution, limits, incumbent, keep, free, fixed, fixed_cost, scale, bound, mip_gap, claimed
    ) -> Answer:
        if solution.status == Status.ERROR:
            raise SolverFailedError(f"solver {solution.solver!r} failed: {solution.message}", solution)
        if solution.status == Status.INFEASIBLE:
            if incumbent is None:
                raise _infeasible(self.names)
            raise SolverFailedError(
                f"solver {solution.solver!r} called a problem infeasible that has a known plan", solution
            )
        ended = "time_limit" if solution.status == Status.TIME_LIMIT else "stopped"
        if solution.x is None:
            if incumbent is None:
                raise SolverFailedError(
                    f"solver {solution.solver!r} ended with status {solution.status.value} and no plan: "
                    f"{solution.message}",
                    solution,
                )
            if solution.bound is not None and solution.status != Status.OPTIMAL:
                bound = max(bound, fixed_cost + solution.bound * scale)
            return self._answer(incumbent.choice, bound, ended, incumbent, mip_gap)
        choice = fixed.copy()
        choice[free] = _one_hot(solution, keep[free])
        core_cost = float(self.cost[free, choice[free]].sum())
        if solution.bound is not None and np.isfinite(solution.bound):
            bound = max(bound, fixed_cost + solution.bound * scale)
        elif solution.status == Status.OPTIMAL:
            # a solver that proves optimality without reporting its bound is taken at its word
            bound = max(bound, fixed_cost + core_cost - claimed * abs(core_cost))
        broken = self.over_budget(choice, limits)
        if broken:
            if incumbent is None:
                raise SolverFailedError(
                    f"solver {solution.solver!r} returned a plan over the {', '.join(broken)} budget",
                    solution,
                )
            choice = incumbent.choice
        elif incumbent is not None and incumbent.cost < float(self.cost[self.rows, choice].sum()):
            choice = incumbent.choice
        status = "optimal" if solution.status == Status.OPTIMAL else ended
        answer = self._answer(choice, bound, status, incumbent, mip_gap)
        return Answer(answer.choice, answer.status, answer.bound, solution.solver, answer.multipliers)

    def _answer(self, choice, bound, status, incumbent, mip_gap) -> Answer:
        cost = float(self.cost[self.rows, choice].sum())
        bound = None if bound is None or not np.isfinite(bound) else min(float(bound), cost)
        gap = relative_gap(cost, bound)
        if gap is None or gap > mip_gap + GAP_TOL:
            status = "stopped" if status == "optimal" else status
        else:
            status = "optimal"  # proven within mip_gap, whoever stopped
        lam = np.zeros(len(self.resources)) if incumbent is None else incumbent.multipliers
        solver = "mck-greedy" if incumbent is None else incumbent.solver
        return Answer(choice, status, bound, solver, lam)


def _infeasible(names) -> InfeasibleBudgetError:
    return InfeasibleBudgetError(
        f"no plan meets the {', '.join(names)} budgets together (each alone is reachable)",
        minimum=float("nan"),
    )


def _one_hot(solution, allowed: np.ndarray) -> np.ndarray:
    """The chosen option per group from a solver's ``x``, after checking it is a valid one-hot choice."""
    groups, options = allowed.shape
    x = np.asarray(solution.x, dtype=np.float64)
    if x.shape != (groups * options,) or not np.isfinite(x).all():
        raise SolverFailedError(
            f"solver {solution.solver!r} returned x of shape {x.shape} (expected ({groups * options},)) "
            "or with non-finite entries",
            solution,
        )
    x = x.reshape(groups, options)
    choice = np.argmax(x, axis=1)
    picked = x[np.arange(groups), choice]
    bad = (
        (np.abs(picked - 1) > 1e-5) | (np.abs(x.sum(axis=1) - 1) > 1e-5) | ~allowed[np.arange(groups), choice]
    )
    if bad.any():
        g = int(np.flatnonzero(bad)[0])
        raise SolverFailedError(
            f"solver {solution.solver!r} returned no valid one-hot choice for group {g}: {x[g].tolist()}",
            solution,
        )
    return choice


def _dominated(cost: np.ndarray, resources: list[np.ndarray], allowed: np.ndarray) -> np.ndarray:
    """Options no plan needs: another allowed option of the group is no worse in cost and every resource."""
    out = np.zeros_like(allowed)
    k = cost.shape[1]
    for a in range(k):  # a handful of options: pairwise, whole columns at a time
        for b in range(k):
            if a == b:
                continue
            no_worse = allowed[:, b] & (cost[:, b] <= cost[:, a])
            better = cost[:, b] < cost[:, a]
            for r in resources:
                no_worse &= r[:, b] <= r[:, a]
                better |= r[:, b] < r[:, a]
            out[:, a] |= no_worse & (better | (b < a))
    return out & allowed


def _milp(cost, resources, limits, allowed) -> MILP:
    groups, options = cost.shape
    n = groups * options
    one_hot = sp.csr_matrix(
        (np.ones(n), (np.repeat(np.arange(groups), options), np.arange(n))), shape=(groups, n)
    )
    rows = [one_hot] + [sp.csr_matrix(r.reshape(1, n)) for r in resources]
    return MILP(
        c=cost.ravel(),
        A=sp.vstack(rows).tocsr(),
        row_lower=np.concatenate([np.ones(groups), np.full(len(resources), -np.inf)]),
        row_upper=np.concatenate([np.ones(groups), limits]),
        col_upper=allowed.ravel().astype(np.float64),
        integrality=np.ones(n, dtype=bool),
    )
