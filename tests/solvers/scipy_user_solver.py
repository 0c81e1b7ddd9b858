"""A user's own backend, written the way the README tells plugin authors to: SciPy's ``milp`` (HiGHS inside).

It lives in the tests to show that the public contract and registration paths work for code that
is not part of cetopt.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

import cetopt


class ScipyMilpSolver(cetopt.Solver):
    name = "scipy-milp"
    capabilities = cetopt.Capabilities(mip=True, time_limit=True, dual_bound=True)

    def solve(self, problem, time_limit=None, mip_gap=None):
        sign = -1.0 if problem.sense == "max" else 1.0
        options = {"disp": False}
        if time_limit is not None:
            options["time_limit"] = time_limit
        if mip_gap is not None:
            options["mip_rel_gap"] = mip_gap
        constraints = (
            [LinearConstraint(problem.A, problem.row_lower, problem.row_upper)] if problem.num_rows else []
        )
        t0 = time.perf_counter()
        res = milp(
            sign * problem.c,
            integrality=problem.integrality.astype(int),
            bounds=Bounds(problem.col_lower, problem.col_upper),
            constraints=constraints,
            options=options,
        )
        elapsed = time.perf_counter() - t0
        # scipy: 0 optimal, 1 iteration/time limit, 2 infeasible, 3 unbounded, 4 other
        status = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded"}.get(res.status, "error")
        if res.status == 4 and "unbounded or infeasible" in res.message:
            feasible = self.solve(problem.feasibility(), time_limit, mip_gap).status == "optimal"
            status = "unbounded" if feasible else "infeasible"
        x = res.x if res.x is not None and status in ("optimal", "time_limit") else None
        objective = problem.objective_value(x) if x is not None else None
        bound = getattr(res, "mip_dual_bound", None)
        if bound is not None and np.isfinite(bound):
            bound = sign * bound + problem.offset
        elif status == "optimal" and not problem.is_mip:
            bound = objective
        else:
            bound = None
        return cetopt.Solution(
            status=status,
            x=x,
            objective=objective,
            bound=bound,
            time=elapsed,
            solver=self.name,
            message=res.message,
        )
