"""cvxpy with whichever MIP-capable solver it has installed (HiGHS, SCIP, Gurobi, ..., SciPy's milp).

The MILP is handed over as two vector variables (integer and continuous columns) and sparse
matrices, never one cvxpy object per column.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from cetopt.problem import MILP, Solution, Status
from cetopt.solving.base import Capabilities, Solver
from solvers._highs_banner import mute_highs_banner

try:
    import cvxpy as cp
except ImportError:
    cp = None

__all__ = ["MIP_SOLVERS", "CvxpySolver"]

#: cvxpy's MIP-capable solvers, in the order this backend prefers them.
MIP_SOLVERS = ("HIGHS", "SCIP", "GUROBI", "CPLEX", "MOSEK", "XPRESS", "CBC", "GLPK_MI", "SCIPY")


def _limit_kwargs(name: str, time_limit: float | None, mip_gap: float | None) -> dict[str, Any]:
    """Translate the time limit and MIP gap into the chosen solver's own keyword names."""
    out: dict[str, Any] = {}
    if name == "HIGHS":
        if time_limit is not None:
            out["time_limit"] = float(time_limit)
        if mip_gap is not None:
            out["mip_rel_gap"] = float(mip_gap)
    elif name == "SCIPY":
        opts = {}
        if time_limit is not None:
            opts["time_limit"] = float(time_limit)
        if mip_gap is not None:
            opts["mip_rel_gap"] = float(mip_gap)
        if opts:
            out["scipy_options"] = opts
    elif name == "GUROBI":
        if time_limit is not None:
            out["TimeLimit"] = float(time_limit)
        if mip_gap is not None:
            out["MIPGap"] = float(mip_gap)
    elif name == "SCIP":
        params = {}
        if time_limit is not None:
            params["limits/time"] = float(time_limit)
        if mip_gap is not None:
            params["limits/gap"] = float(mip_gap)
        if params:
            out["scip_params"] = params
    elif name == "CBC":
        if time_limit is not None:
            out["maximumSeconds"] = int(np.ceil(time_limit))
        if mip_gap is not None:
            out["allowableFractionGap"] = float(mip_gap)
    elif name == "GLPK_MI" and time_limit is not None:
        out["tm_lim"] = int(1000 * time_limit)
    elif time_limit is not None or mip_gap is not None:
        raise ValueError(f"cvxpy backend does not know how to pass a time limit or gap to {name}")
    return out


def _pick(installed: list[str], mip: bool, requested: str | None) -> str:
    if requested is not None:
        if requested not in installed:
            raise ValueError(f"cvxpy solver {requested!r} is not installed; installed: {installed}")
        return requested
    for name in MIP_SOLVERS if mip else ("HIGHS", "CLARABEL", *MIP_SOLVERS):
        if name in installed:
            return name
    raise RuntimeError(f"cvxpy has no MIP-capable solver installed (installed: {installed})")


def _quiet_solve(cvx, sub: str, kwargs: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        # cvxpy warns on every stopped or ambiguous solve; the status we return already says it.
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        warnings.filterwarnings("ignore", message=r"(?s)\s*The problem is either infeasible or unbounded")
        cvx.solve(solver=sub, **kwargs)


class CvxpySolver(Solver):
    """cvxpy. Capabilities: MIP, time limit, options; the dual bound is read when the sub-solver is HiGHS.

    ``options`` may name the cvxpy solver (``{"solver": "SCIPY"}``); other keys are passed to
    ``Problem.solve``.
    """

    name = "cvxpy"
    capabilities = Capabilities(mip=True, time_limit=True, dual_bound=False, warm_start=False, options=True)

    @classmethod
    def available(cls) -> bool:
        return cp is not None and any(s in cp.installed_solvers() for s in MIP_SOLVERS)

    def solve(
        self,
        problem: MILP,
        time_limit: float | None = None,
        mip_gap: float | None = None,
        *,
        start: np.ndarray | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Solution:
        options = dict(options or {})
        sub = _pick(cp.installed_solvers(), problem.is_mip, options.pop("solver", None))
        cvx, parts = self._build(problem)
        kwargs = {**_limit_kwargs(sub, time_limit, mip_gap), **options}
        if sub == "HIGHS":
            mute_highs_banner()
        t0 = time.perf_counter()
        _quiet_solve(cvx, sub, kwargs)
        elapsed = time.perf_counter() - t0
        solution = self._read(problem, cvx, parts, sub, elapsed, time_limit)
        if cvx.status == cp.settings.INFEASIBLE_OR_UNBOUNDED:
            feasibility, _ = self._build(problem.feasibility())
            _quiet_solve(feasibility, sub, kwargs)
            status = Status.UNBOUNDED if feasibility.status == cp.OPTIMAL else Status.INFEASIBLE
            if feasibility.status not in (cp.OPTIMAL, cp.INFEASIBLE):
                status = Status.ERROR
            return Solution(
                status=status,
                time=time.perf_counter() - t0,
                solver=self.name,
                message=f"{solution.message}; resolved as {status.value}",
                stats=solution.stats,
            )
        return solution

    @staticmethod
    def _build(problem: MILP):
        integer = np.flatnonzero(problem.integrality)
        continuous = np.flatnonzero(~problem.integrality)
        parts, expr_terms, objective = [], [], 0
        for idx, is_int in ((integer, True), (continuous, False)):
            if idx.size == 0:
                continue
            var = cp.Variable(
                idx.size, integer=is_int, bounds=[problem.col_lower[idx], problem.col_upper[idx]]
            )
            parts.append((idx, var))
            objective = objective + problem.c[idx] @ var
            if problem.num_rows:
                expr_terms.append(problem.A[:, idx] @ var)
        constraints = []
        if expr_terms:
            act = expr_terms[0] if len(expr_terms) == 1 else expr_terms[0] + expr_terms[1]
            lo, up = problem.row_lower, problem.row_upper
            eq = np.flatnonzero(lo == up)
            ge = np.flatnonzero(np.isfinite(lo) & (lo != up))
            le = np.flatnonzero(np.isfinite(up) & (lo != up))
            if eq.size:
                constraints.append(act[eq] == lo[eq])
            if ge.size:
                constraints.append(act[ge] >= lo[ge])
            if le.size:
                constraints.append(act[le] <= up[le])
        sense = cp.Maximize if problem.sense == "max" else cp.Minimize
        return cp.Problem(sense(objective), constraints), parts

    def _read(self, problem, cvx, parts, sub, elapsed, time_limit) -> Solution:
        raw = cvx.status
        status = {
            cp.OPTIMAL: Status.OPTIMAL,
            cp.OPTIMAL_INACCURATE: Status.OPTIMAL,
            cp.INFEASIBLE: Status.INFEASIBLE,
            cp.INFEASIBLE_INACCURATE: Status.INFEASIBLE,
            cp.UNBOUNDED: Status.UNBOUNDED,
            cp.UNBOUNDED_INACCURATE: Status.UNBOUNDED,
            cp.USER_LIMIT: Status.TIME_LIMIT if time_limit is not None else Status.STOPPED,
        }.get(raw, Status.ERROR)
        x = objective = bound = None
        if status in (Status.OPTIMAL, Status.TIME_LIMIT, Status.STOPPED) and all(
            v.value is not None for _, v in parts
        ):
            x = np.zeros(problem.num_cols)
            for idx, var in parts:
                x[idx] = np.asarray(var.value, dtype=np.float64).reshape(-1)
            if problem.integrality.any():
                x[problem.integrality] = np.round(x[problem.integrality])
            objective = problem.objective_value(x)
        stats: dict[str, Any] = {"native_status": raw, "cvxpy_solver": sub}
        info = getattr(cvx.solver_stats, "extra_stats", None)
        if sub == "HIGHS" and info is not None and hasattr(info, "mip_dual_bound") and problem.is_mip:
            dual = float(info.mip_dual_bound)
            # cvxpy hands a maximization to HiGHS as the minimization of −c·x
            dual = -dual if problem.sense == "max" else dual
            bound = dual + problem.offset if np.isfinite(dual) else None
        elif status == Status.OPTIMAL and not problem.is_mip:
            bound = objective
        return Solution(
            status=status,
            x=x,
            objective=objective,
            bound=bound,
            time=elapsed,
            solver=self.name,
            message=f"cvxpy[{sub}]: {raw}",
            stats=stats,
        )
