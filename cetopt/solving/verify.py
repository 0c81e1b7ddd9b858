"""The one check every solver answer passes before cetopt uses it (built-in backends and plugins alike).

A backend's point, objective and bound are facts cetopt can check against the problem itself:
the point's shape, finiteness, integrality, rows and column bounds; the objective recomputed from
the point; the dual bound on the right side of the objective; the final MIP gap against the one
requested. An answer that fails becomes status ``error`` (reason in ``message``, the backend's own
answer in ``raw``); an ``optimal`` MIP whose gap is too wide becomes ``stopped``.

Tolerances are relative to the scale of what they compare, so a row ``3x ≤ 1e12`` gets a tolerance
that fits 1e12 and a row ``x ≤ 1`` one that fits 1:

* rows: ``|violation| ≤ FEASIBILITY · max(1, |bound|, Σ_j |a_ij x_j|)``;
* columns: ``|violation| ≤ FEASIBILITY · max(1, |bound|)``;
* integrality: ``|x − round(x)| ≤ INTEGRALITY`` (plus 4 ulp of ``x``);
* objective: ``|reported − (c·x + offset)| ≤ OBJECTIVE · max(1, Σ_j |c_j x_j| + |offset|)``;
* bound side: a bound past the objective by more than ``BOUND_SIDE · max(1, |objective|)`` is an
  error; one past it by less is clamped to the objective (still a valid bound).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cetopt.problem import MILP, Solution, Status
from cetopt.problem.solution import relative_gap

__all__ = [
    "BOUND_SIDE",
    "DEFAULT_MIP_ABS_GAP",
    "DEFAULT_MIP_GAP",
    "FEASIBILITY",
    "INTEGRALITY",
    "OBJECTIVE",
    "allowed_gap",
    "verify_solution",
]

FEASIBILITY = 1e-6
INTEGRALITY = 1e-5
OBJECTIVE = 1e-9
BOUND_SIDE = 1e-6
#: Gaps accepted for ``optimal`` when the caller gave no ``mip_gap`` (HiGHS's own defaults).
DEFAULT_MIP_GAP = 1e-4
DEFAULT_MIP_ABS_GAP = 1e-6
_GAP_SLACK = 1e-6  # relative slack on the requested gap, for the rounding of the gap itself

_WITH_POINT = (Status.OPTIMAL, Status.TIME_LIMIT, Status.STOPPED)


def verify_solution(problem: MILP, solution: Solution, mip_gap: float | None = None) -> Solution:
    """Check a backend's answer against ``problem``; return it verified, downgraded, or as an error.

    Parameters
    ----------
    problem : MILP
        The problem that was solved.
    solution : Solution
        The backend's answer.
    mip_gap : float, optional
        The relative gap the caller asked for (``None``: :data:`DEFAULT_MIP_GAP` or
        :data:`DEFAULT_MIP_ABS_GAP`).

    Returns
    -------
    Solution
        ``verified=True`` with the objective recomputed from ``x``; or status ``error`` naming the
        failed check; or ``stopped`` for an ``optimal`` MIP whose gap is wider than allowed. In the
        last two cases ``raw`` holds the backend's answer.
    """
    if solution.status == Status.ERROR:
        return solution
    if solution.status in (Status.INFEASIBLE, Status.UNBOUNDED):
        return _check_no_point(problem, solution)
    try:
        fields = _check_point(problem, solution)
    except _Rejected as why:
        return _error(solution, str(why))
    checked = dataclasses.replace(solution, **fields, verified=True)
    return _check_gap(problem, checked, solution, mip_gap)


class _Rejected(Exception):
    pass


def _error(solution: Solution, reason: str) -> Solution:
    return Solution(
        status=Status.ERROR,
        time=solution.time,
        solver=solution.solver,
        message=f"cetopt rejected the {solution.status.value} answer of {solution.solver!r}: {reason}",
        stats=dict(solution.stats),
        raw=solution,
    )


def _check_no_point(problem: MILP, solution: Solution) -> Solution:
    """``infeasible``/``unbounded`` carry no point; one attached must not contradict the status."""
    if solution.status == Status.INFEASIBLE and solution.x is not None:
        x = solution.x
        if x.shape == (problem.num_cols,) and np.isfinite(x).all() and _worst_violation(problem, x) is None:
            return _error(solution, "x is feasible, so the problem is not infeasible")
    if solution.status == Status.UNBOUNDED and _finite(solution.bound):
        return _error(solution, f"a finite dual bound {float(solution.bound):.10g} contradicts 'unbounded'")
    out = dataclasses.replace(solution, x=None, objective=None, bound=None, gap=None, verified=True)
    return out if solution.x is None and solution.bound is None else dataclasses.replace(out, raw=solution)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _check_point(problem: MILP, solution: Solution) -> dict:
    """Fields of the verified answer: objective from ``x``, bound checked and clamped, gap."""
    bound = _check_bound_value(problem, solution.bound)
    x = solution.x
    if x is None:
        if solution.status == Status.OPTIMAL:
            raise _Rejected("status optimal without a point x")
        return {"objective": None, "bound": bound, "gap": None}
    if x.shape != (problem.num_cols,):
        raise _Rejected(f"x has shape {x.shape}, expected ({problem.num_cols},)")
    if not np.isfinite(x).all():
        j = int(np.flatnonzero(~np.isfinite(x))[0])
        raise _Rejected(f"x[{j}] is {float(x[j]):.10g}")
    where = _worst_violation(problem, x)
    if where is not None:
        raise _Rejected(where)
    objective = _check_objective(problem, x, solution.objective)
    bound = _check_bound_side(problem, objective, bound)
    return {"objective": objective, "bound": bound, "gap": relative_gap(objective, bound)}


def _worst_violation(problem: MILP, x: np.ndarray) -> str | None:
    """Text naming the first row, bound or integrality that ``x`` violates beyond tolerance."""
    lo, up = problem.col_lower, problem.col_upper
    col_tol = FEASIBILITY * np.maximum(1.0, np.maximum(_abs_finite(lo), _abs_finite(up)))
    bad = np.flatnonzero((lo - x > col_tol) | (x - up > col_tol))
    if bad.size:
        j = int(bad[0])
        return f"x[{j}] = {float(x[j]):.10g} is outside its bounds [{float(lo[j]):.10g}, {float(up[j]):.10g}]"
    if problem.is_mip:
        xi = x[problem.integrality]
        frac = np.abs(xi - np.round(xi))
        bad = np.flatnonzero(frac > INTEGRALITY + 4 * np.spacing(np.abs(xi)))
        if bad.size:
            j = int(np.flatnonzero(problem.integrality)[bad[0]])
            return f"x[{j}] = {float(x[j]):.10g} is not integer (column {j} is an integer column)"
    if problem.num_rows:
        act = problem.A @ x
        size = abs(problem.A) @ np.abs(x)
        rlo, rup = problem.row_lower, problem.row_upper
        tol = FEASIBILITY * np.maximum.reduce([np.ones_like(act), size, _abs_finite(rlo), _abs_finite(rup)])
        bad = np.flatnonzero((rlo - act > tol) | (act - rup > tol))
        if bad.size:
            i = int(bad[0])
            return (
                f"row {i}: A x = {float(act[i]):.10g} is outside [{float(rlo[i]):.10g}, {float(rup[i]):.10g}]"
            )
    return None


def _abs_finite(v: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(v), np.abs(v), 0.0)


def _check_objective(problem: MILP, x: np.ndarray, reported: float | None) -> float:
    objective = problem.objective_value(x)
    if reported is None:
        return objective
    scale = max(1.0, float(np.abs(problem.c) @ np.abs(x)) + abs(problem.offset))
    if not (math.isfinite(reported) and abs(reported - objective) <= OBJECTIVE * scale):
        raise _Rejected(
            f"reported objective {float(reported):.10g} but c·x + offset = {float(objective):.10g}"
        )
    return objective


def _check_bound_value(problem: MILP, bound: float | None) -> float | None:
    if bound is None:
        return None
    if math.isnan(bound):
        raise _Rejected("the dual bound is NaN")
    useless = -math.inf if problem.sense == "min" else math.inf
    return None if bound == useless else float(bound)


def _check_bound_side(problem: MILP, objective: float, bound: float | None) -> float | None:
    if bound is None:
        return None
    past = bound - objective if problem.sense == "min" else objective - bound
    if past > BOUND_SIDE * max(1.0, abs(objective)):
        side = "above" if problem.sense == "min" else "below"
        raise _Rejected(
            f"dual bound {float(bound):.10g} is {side} the objective {float(objective):.10g} "
            f"of a feasible point (a {problem.sense} problem): no valid bound can be"
        )
    return objective if past > 0 else bound


def allowed_gap(mip_gap: float | None, objective: float, bound: float) -> bool:
    """Whether ``|objective − bound|`` is within the requested relative gap of ``|objective|``.

    With ``mip_gap=None`` the HiGHS defaults apply (relative :data:`DEFAULT_MIP_GAP` or absolute
    :data:`DEFAULT_MIP_ABS_GAP`). A floor of ``1e-9 · max(1, |objective|)`` absorbs rounding.
    """
    diff = abs(objective - bound)
    if mip_gap is None and diff <= DEFAULT_MIP_ABS_GAP:
        return True
    rel = DEFAULT_MIP_GAP if mip_gap is None else mip_gap
    return diff <= rel * (1 + _GAP_SLACK) * abs(objective) + 1e-9 * max(1.0, abs(objective))


def _check_gap(problem: MILP, checked: Solution, raw: Solution, mip_gap: float | None) -> Solution:
    """An ``optimal`` MIP whose proven gap is wider than allowed is reported ``stopped``."""
    if checked.status != Status.OPTIMAL or not problem.is_mip or checked.bound is None:
        return checked
    if allowed_gap(mip_gap, checked.objective, checked.bound):
        return checked
    diff = abs(checked.objective - checked.bound)
    rel = diff / abs(checked.objective) if checked.objective else math.inf
    wanted = f"the requested {mip_gap:g}" if mip_gap is not None else f"the default {DEFAULT_MIP_GAP:g}"
    message = (
        f"{raw.message}; reported optimal, but the final MIP gap {rel:.3g} "
        f"(|objective − bound| = {diff:.3g}) is above {wanted}: status stopped"
    )
    return dataclasses.replace(checked, status=Status.STOPPED, message=message, raw=raw)
