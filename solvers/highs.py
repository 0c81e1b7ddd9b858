"""HiGHS through highspy's low-level API: the model goes in as CSR arrays with one ``passModel`` call.

Default backend. Reports the proven dual bound (``mip_dual_bound`` for MIPs, the optimal objective
for LPs), accepts warm starts (``setSolution``) and any HiGHS option by name.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cetopt.problem import MILP, Solution, Status
from cetopt.solving.base import Capabilities, Solver
from cetopt.solving.verify import OBJECTIVE
from solvers._highs_banner import mute_highs_banner

try:
    import highspy
except ImportError:  # the backend reports itself unavailable instead of breaking imports
    highspy = None

__all__ = ["HighsSolver", "parse_solving_report"]


def _new_highs():
    mute_highs_banner()
    return highspy.Highs()


_NUMBER = r"([-+0-9.eE]+|inf)"


def parse_solving_report(log: str) -> dict[str, Any]:
    """Extract where a HiGHS MIP solve spent its effort from the "Solving report" in its log.

    Returns a dict with ``timing`` (seconds: total, presolve, solve, postsolve, and the part of
    presolve and solve spent in sub-MIPs, i.e. the RINS/RENS heuristics) and ``lp_iterations``
    (total, strong_branching, separation, heuristics), plus ``nodes``. Keys whose lines are
    missing are left out.
    """
    report: dict[str, Any] = {}
    start = log.rfind("Solving report")
    if start < 0:
        return report
    text = log[start:]
    timing: dict[str, float] = {}
    m = re.search(r"Timing\s+" + _NUMBER, text)
    if m:
        timing["total"] = float(m.group(1))
    for phase in ("Presolve", "Solve", "Postsolve"):
        m = re.search(_NUMBER + r" \(" + phase + r"\)(.*?)(?=\n\s+[-+0-9.eE]+ \(|\n  \S|\Z)", text, re.S)
        if not m:
            continue
        timing[phase.lower()] = float(m.group(1))
        sub = re.search(r"subMIP time \[calls\] = " + _NUMBER, m.group(2))
        if sub:
            timing[f"{phase.lower()}_submip"] = float(sub.group(1))
    if timing:
        report["timing"] = timing
    m = re.search(r"LP iterations\s+(\d+)", text)
    if m:
        iters = {"total": int(m.group(1))}
        for key, label in (
            ("strong_branching", "strong br."),
            ("separation", "separation"),
            ("heuristics", "heuristics"),
        ):
            found = re.search(r"(\d+) \(" + re.escape(label) + r"\)", text)
            if found:
                iters[key] = int(found.group(1))
        report["lp_iterations"] = iters
    m = re.search(r"Nodes\s+(\d+)", text)
    if m:
        report["nodes"] = int(m.group(1))
    return report


class HighsSolver(Solver):
    """HiGHS (highspy). Capabilities: MIP, time limit, dual bound, warm start, native options.

    ``options`` takes any HiGHS option name (``setOptionValue``), e.g. ``objective_bound``,
    ``mip_feasibility_tolerance`` or ``threads``. Two extra keys are understood by this backend:
    ``report`` (bool, default True for MIPs) parses HiGHS's solving report into
    ``Solution.stats``; ``log`` (bool) keeps the whole log text in ``stats["log"]``.

    Two more keys stop a MIP early through HiGHS's MIP-interrupt callback, for callers that only
    need to know on which side of a threshold the optimum lies (status ``stopped``):
    ``interrupt_on_bound`` (float ``t``) stops once the *dual bound* proves every feasible point
    worse than ``t`` (max: bound < t; min: bound > t); ``interrupt_on_objective`` (float ``t``)
    stops once an *incumbent* better than ``t`` is found (max: objective > t; min: objective < t).
    """

    name = "highs"
    capabilities = Capabilities(mip=True, time_limit=True, dual_bound=True, warm_start=True, options=True)

    @classmethod
    def available(cls) -> bool:
        return highspy is not None

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
        want_report = bool(options.pop("report", problem.is_mip))
        keep_log = bool(options.pop("log", False))
        stop_bound = options.pop("interrupt_on_bound", None)
        stop_objective = options.pop("interrupt_on_objective", None)
        run = _Run(self, problem, options, time_limit, mip_gap, want_report or keep_log)
        solution, log, dropped = run(start, stop_bound, stop_objective)
        stats_extra: dict[str, Any] = {}
        if start is not None and problem.is_mip and _mispriced(problem, solution):
            # HiGHS maps a MIP start into presolve's reduced space, where reductions that keep
            # only *an* optimum (probing, sparsify, dual reductions) can move or misprice it; the
            # start then prunes the tree and HiGHS returns it as "optimal" with the objective of
            # another point. Its answer contradicts itself, so solve again without the start.
            first = solution
            left = None if time_limit is None else max(0.0, time_limit - first.time)
            run = _Run(self, problem, options, left, mip_gap, want_report or keep_log)
            solution, log, dropped = run(None, stop_bound, stop_objective)
            solution = dataclasses.replace(solution, time=first.time + solution.time)
            stats_extra["mip_start_discarded"] = (
                f"HiGHS reported objective {first.objective!r} for the MIP start, whose objective is "
                f"{problem.objective_value(first.x)!r}; solved again without the start"
            )
        stats = dict(solution.stats)
        stats.update(stats_extra)
        stats["dropped_small_entries"] = int(dropped)  # present when 0 too
        if want_report:
            stats.update(parse_solving_report(log))
        if keep_log:
            stats["log"] = log
        return Solution(
            status=solution.status,
            x=solution.x,
            objective=solution.objective,
            bound=solution.bound,
            gap=solution.gap,
            time=solution.time,
            solver=self.name,
            message=solution.message,
            stats=stats,
        )

    @staticmethod
    def _pass_model(h, problem: MILP) -> int:
        A = problem.A
        n, m = problem.num_cols, problem.num_rows
        sense = -1 if problem.sense == "max" else 1  # ObjSense.kMaximize / kMinimize
        status = h.passModel(
            n,
            m,
            A.nnz,
            2,
            sense,
            problem.offset,  # 2 = MatrixFormat.kRowwise
            problem.c,
            problem.col_lower,
            problem.col_upper,
            problem.row_lower,
            problem.row_upper,
            A.indptr.astype(np.int32),
            A.indices.astype(np.int32),
            A.data,
            problem.integrality.astype(np.int32),
        )
        if status == highspy.HighsStatus.kError:
            raise RuntimeError("HiGHS rejected the model in passModel")
        small = h.getOptionValue("small_matrix_value")
        small = float(small[1] if isinstance(small, tuple) else small)
        # HiGHS silently drops matrix entries at or below small_matrix_value; make that visible.
        return int(np.count_nonzero(np.abs(A.data) <= small))

    def _read_result(self, h, problem: MILP, elapsed: float) -> Solution:
        ms = highspy.HighsModelStatus
        model_status = h.getModelStatus()
        info = h.getInfo()
        message = h.modelStatusToString(model_status)
        stats: dict[str, Any] = {"native_status": message}
        if problem.is_mip:
            stats["nodes"] = int(info.mip_node_count)
        if model_status == ms.kModelEmpty:
            return Solution(
                status=Status.OPTIMAL,
                x=np.zeros(0),
                objective=problem.offset,
                bound=problem.offset,
                time=elapsed,
                message=message,
                stats=stats,
            )
        if model_status == ms.kUnboundedOrInfeasible:
            status = _resolve_unbounded_or_infeasible(problem)
            return Solution(
                status=status, time=elapsed, message=f"{message}; resolved as {status.value}", stats=stats
            )
        status = {
            ms.kOptimal: Status.OPTIMAL,
            ms.kInfeasible: Status.INFEASIBLE,
            ms.kUnbounded: Status.UNBOUNDED,
            ms.kTimeLimit: Status.TIME_LIMIT,
            ms.kIterationLimit: Status.STOPPED,
            ms.kSolutionLimit: Status.STOPPED,
            ms.kObjectiveBound: Status.STOPPED,
            ms.kObjectiveTarget: Status.STOPPED,
            ms.kInterrupt: Status.STOPPED,
            ms.kHighsInterrupt: Status.STOPPED,
        }.get(model_status, Status.ERROR)
        x = objective = bound = None
        if info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible:
            x = np.array(h.getSolution().col_value, dtype=np.float64)
            objective = float(info.objective_function_value)
        if problem.is_mip:
            dual = float(info.mip_dual_bound)
            bound = dual if np.isfinite(dual) else None
        elif status == Status.OPTIMAL:
            bound = objective  # LP duality: the optimal objective is its own dual bound
        if status == Status.UNBOUNDED:
            x = objective = bound = None
        return Solution(
            status=status, x=x, objective=objective, bound=bound, time=elapsed, message=message, stats=stats
        )


class _Run:
    """One configured HiGHS solve of ``problem``: ``run(start, stop_bound, stop_objective)``."""

    def __init__(self, backend, problem, options, time_limit, mip_gap, logging) -> None:
        self.backend, self.problem, self.options = backend, problem, options
        self.time_limit, self.mip_gap, self.logging = time_limit, mip_gap, logging

    def __call__(self, start, stop_bound, stop_objective) -> tuple[Solution, str, int]:
        problem = self.problem
        h = _new_highs()
        log_lines: list[str] = []
        if self.logging:
            h.setOptionValue("output_flag", True)
            h.setOptionValue("log_to_console", False)
            h.cbLogging.subscribe(lambda event: log_lines.append(event.message))
        else:
            h.setOptionValue("output_flag", False)
        if self.time_limit is not None:
            h.setOptionValue("time_limit", float(self.time_limit))
        if self.mip_gap is not None:
            h.setOptionValue("mip_rel_gap", float(self.mip_gap))
            # HiGHS also stops at an absolute gap of 1e-6, which on a small objective is a wide
            # relative one; a requested relative gap is what cetopt.solve checks.
            h.setOptionValue("mip_abs_gap", 0.0)
        for key, value in self.options.items():
            if h.setOptionValue(key, value) == highspy.HighsStatus.kError:
                raise ValueError(f"HiGHS rejected option {key}={value!r}")
        dropped = HighsSolver._pass_model(h, problem)
        if problem.is_mip and (stop_bound is not None or stop_objective is not None):
            _subscribe_interrupt(h, problem.sense, stop_bound, stop_objective)
        if start is not None:
            h.setSolution(
                problem.num_cols,
                np.arange(problem.num_cols, dtype=np.int32),
                np.asarray(start, dtype=np.float64),
            )
        t0 = time.perf_counter()
        h.run()
        elapsed = time.perf_counter() - t0
        return self.backend._read_result(h, problem, elapsed), "".join(log_lines), dropped


def _mispriced(problem: MILP, solution: Solution) -> bool:
    """Whether HiGHS's objective disagrees with its own point (the tolerance of ``verify_solution``)."""
    if solution.x is None or solution.objective is None or solution.x.shape != (problem.num_cols,):
        return False
    x = solution.x
    if not (np.isfinite(x).all() and math.isfinite(solution.objective)):
        return False
    scale = max(1.0, float(np.abs(problem.c) @ np.abs(x)) + abs(problem.offset))
    return abs(solution.objective - problem.objective_value(x)) > OBJECTIVE * scale


def _subscribe_interrupt(h, sense: str, stop_bound, stop_objective) -> None:
    """Interrupt the MIP once its dual bound or its incumbent crosses the given thresholds."""
    sign = 1.0 if sense == "max" else -1.0  # compare in "larger is better" terms
    bound_t = None if stop_bound is None else sign * float(stop_bound)
    objective_t = None if stop_objective is None else sign * float(stop_objective)

    def callback(event) -> None:
        out = event.data_out
        dual, primal = sign * out.mip_dual_bound, sign * out.mip_primal_bound
        if (bound_t is not None and dual < bound_t) or (
            objective_t is not None and np.isfinite(primal) and primal > objective_t
        ):
            event.data_in.user_interrupt = True

    h.cbMipInterrupt.subscribe(callback)


def _resolve_unbounded_or_infeasible(problem: MILP) -> Status:
    """HiGHS's presolve sometimes only knows "unbounded or infeasible": decide with a feasibility solve."""
    h = _new_highs()
    h.setOptionValue("output_flag", False)
    HighsSolver._pass_model(h, problem.feasibility())
    h.run()
    found = h.getModelStatus()
    if found == highspy.HighsModelStatus.kOptimal:
        return Status.UNBOUNDED
    if found == highspy.HighsModelStatus.kInfeasible:
        return Status.INFEASIBLE
    return Status.ERROR
