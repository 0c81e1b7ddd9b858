"""``cetopt.solve``: one entry point that checks its input, picks the backend and guards the call."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cetopt.errors import ProblemError, SolverUnavailableError
from cetopt.problem import MILP, Solution, Status
from cetopt.solving.base import Solver
from cetopt.solving.registry import get_solver

__all__ = ["default_workers", "solve", "solve_many"]


def _check_args(problem: MILP, time_limit, mip_gap, start) -> np.ndarray | None:
    if not isinstance(problem, MILP):
        raise ProblemError(f"problem must be a cetopt.MILP, got {type(problem).__name__}")
    if time_limit is not None and not (time_limit > 0 and math.isfinite(time_limit)):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if mip_gap is not None and not (mip_gap >= 0 and math.isfinite(mip_gap)):
        raise ValueError(f"mip_gap must be a non-negative relative gap, got {mip_gap!r}")
    if start is None:
        return None
    start = np.asarray(start, dtype=np.float64)
    if start.shape != (problem.num_cols,):
        raise ProblemError(f"start has shape {start.shape}, expected ({problem.num_cols},)")
    if not np.isfinite(start).all():
        raise ProblemError(f"start[{int(np.flatnonzero(~np.isfinite(start))[0])}] is not finite")
    return start


def solve(
    problem: MILP,
    solver: str | Solver | type[Solver] = "highs",
    time_limit: float | None = None,
    mip_gap: float | None = None,
    *,
    start: np.ndarray | None = None,
    options: Mapping[str, Any] | None = None,
) -> Solution:
    """Solve a :class:`cetopt.MILP` with any registered backend.

    Parameters
    ----------
    problem : MILP
        The problem.
    solver : str, Solver class or instance
        A registered name (see :func:`cetopt.available_solvers`) or a backend object.
    time_limit : float, optional
        Seconds. On expiry the status is ``time_limit`` and the best solution found is attached.
    mip_gap : float, optional
        Relative optimality gap at which a MIP solve may stop and call itself ``optimal``.
    start : array_like, optional
        A starting point (warm start). Passed to backends that declare ``warm_start``; others
        ignore it.
    options : mapping, optional
        Backend-native settings (for HiGHS, any ``setOptionValue`` name). Passed to backends that
        declare ``options``; for others a non-empty mapping is an error.

    Returns
    -------
    Solution
        Never raises for a solver that crashes: that gives status ``error`` with its message.

    Raises
    ------
    ProblemError, ValueError
        Malformed problem or arguments.
    UnknownSolverError
        Unknown solver name; the message lists the registered ones.
    SolverUnavailableError
        The backend cannot run here, or cannot take integer columns / options.
    """
    start = _check_args(problem, time_limit, mip_gap, start)
    backend = get_solver(solver)
    name = backend.name or type(backend).__name__
    caps = backend.capabilities
    if not type(backend).available():
        raise SolverUnavailableError(f"solver {name!r} cannot run here: its dependency is not installed")
    if problem.is_mip and not caps.mip:
        raise SolverUnavailableError(f"solver {name!r} solves LPs only; this problem has integer columns")
    kwargs: dict[str, Any] = {}
    if start is not None and caps.warm_start:
        kwargs["start"] = start
    if options:
        if not caps.options:
            raise SolverUnavailableError(f"solver {name!r} takes no native options; got {sorted(options)}")
        kwargs["options"] = dict(options)
    t0 = time.perf_counter()
    try:
        solution = backend.solve(problem, time_limit, mip_gap, **kwargs)
    except Exception as exc:  # the contract: a crashing solver yields status "error", not an exception
        return Solution(
            status=Status.ERROR,
            solver=name,
            time=time.perf_counter() - t0,
            message=f"{type(exc).__name__}: {exc}",
        )
    if not isinstance(solution, Solution):
        return Solution(
            status=Status.ERROR,
            solver=name,
            time=time.perf_counter() - t0,
            message=f"backend returned {type(solution).__name__}, not a cetopt.Solution",
        )
    return solution


def default_workers() -> int:
    """Number of worker threads for independent solves: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def solve_many(
    problems: Iterable[MILP],
    solver: str | Solver | type[Solver] = "highs",
    time_limit: float | None = None,
    mip_gap: float | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    workers: int | None = None,
    on_done: Callable[[int, Solution], None] | None = None,
) -> list[Solution]:
    """Solve independent problems on all cores; results come back in input order.

    HiGHS releases the GIL while it solves, so a thread pool runs the solves truly in parallel
    without copying the problems into other processes.

    Parameters
    ----------
    problems : iterable of MILP
    solver, time_limit, mip_gap, options
        As for :func:`solve`, applied to each problem.
    workers : int, optional
        Threads; default :func:`default_workers`.
    on_done : callable, optional
        Called as ``on_done(index, solution)`` when each solve finishes (e.g. to advance a progress
        bar).
    """
    items: Sequence[MILP] = list(problems)
    workers = default_workers() if workers is None else max(1, int(workers))

    def run(i: int) -> Solution:
        sol = solve(items[i], solver, time_limit, mip_gap, options=options)
        if on_done is not None:
            on_done(i, sol)
        return sol

    if workers == 1 or len(items) <= 1:
        return [run(i) for i in range(len(items))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, range(len(items))))
