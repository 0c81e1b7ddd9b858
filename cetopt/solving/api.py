"""``cetopt.solve``: one entry point that checks its input, picks the backend and guards the call."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cetopt.errors import CallbackError, CetoptError, ProblemError, SolveArgumentError, SolverUnavailableError
from cetopt.problem import MILP, Solution, Status
from cetopt.solving.base import Solver
from cetopt.solving.registry import get_solver
from cetopt.solving.verify import verify_solution

__all__ = ["default_workers", "solve", "solve_many"]


def _number(name: str, value, *, positive: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SolveArgumentError(f"{name} must be a number or None, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = value > 0 if positive else value >= 0
    if not (ok and math.isfinite(value)):
        what = "a positive number of seconds" if positive else "a non-negative relative gap"
        raise SolveArgumentError(f"{name} must be {what}, got {value!r}")
    return value


def _check_options(options) -> None:
    if options is not None and not isinstance(options, Mapping):
        raise SolveArgumentError(f"options must be a mapping or None, got {type(options).__name__}")


def _check_start(problem: MILP, start) -> np.ndarray | None:
    if start is None:
        return None
    try:
        start = np.asarray(start, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SolveArgumentError(f"start must be an array of numbers: {exc}") from None
    if start.shape != (problem.num_cols,):
        raise ProblemError(f"start has shape {start.shape}, expected ({problem.num_cols},)")
    if not np.isfinite(start).all():
        raise ProblemError(f"start[{int(np.flatnonzero(~np.isfinite(start))[0])}] is not finite")
    return start


def _check_args(problem: MILP, time_limit, mip_gap, start, options):
    if not isinstance(problem, MILP):
        raise ProblemError(f"problem must be a cetopt.MILP, got {type(problem).__name__}")
    time_limit = _number("time_limit", time_limit, positive=True)
    mip_gap = _number("mip_gap", mip_gap, positive=False)
    _check_options(options)
    return time_limit, mip_gap, _check_start(problem, start)


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
        Checked by :func:`cetopt.solving.verify.verify_solution` (point, objective, bound, MIP
        gap): an answer that fails is status ``error`` with the reason, the backend's own answer in
        ``raw``. A backend that raises (in ``__init__``, ``available()`` or ``solve``) gives status
        ``error`` with its message, not an exception.

    Raises
    ------
    ProblemError
        Malformed problem or start point.
    SolveArgumentError
        ``time_limit``, ``mip_gap`` or ``options`` of the wrong type or value (a ``ValueError``
        and ``TypeError``).
    UnknownSolverError
        Unknown solver name; the message lists the registered ones.
    SolverUnavailableError
        The backend cannot run here, or cannot take integer columns / options.
    """
    time_limit, mip_gap, start = _check_args(problem, time_limit, mip_gap, start, options)
    t0 = time.perf_counter()
    backend = _instantiate(solver)
    if isinstance(backend, Solution):
        return backend
    kwargs = _backend_kwargs(problem, backend, start, options)
    if isinstance(kwargs, Solution):
        return kwargs
    name = _name(backend)
    try:
        solution = backend.solve(problem, time_limit, mip_gap, **kwargs)
    except Exception as exc:  # the contract: a crashing solver yields status "error", not an exception
        return _failed(name, t0, f"{type(exc).__name__}: {exc}")
    if not isinstance(solution, Solution):
        return _failed(name, t0, f"backend returned {type(solution).__name__}, not a cetopt.Solution")
    solution = _timed(solution, name, time.perf_counter() - t0, time_limit)
    return verify_solution(problem, solution, mip_gap)


def _name(backend: Solver) -> str:
    return backend.name or type(backend).__name__


def _failed(name: str, t0: float, message: str) -> Solution:
    return Solution(status=Status.ERROR, solver=name, time=time.perf_counter() - t0, message=message)


def _instantiate(solver) -> Solver | Solution:
    """The backend instance, or an ``error`` Solution when its constructor raises."""
    cls = solver if isinstance(solver, type) else None
    try:
        return get_solver(solver)
    except CetoptError:
        raise
    except Exception as exc:
        name = getattr(cls, "name", "") or str(solver)
        return _failed(name, time.perf_counter(), f"creating the backend raised {type(exc).__name__}: {exc}")


def _backend_kwargs(problem: MILP, backend: Solver, start, options) -> dict[str, Any] | Solution:
    """Keywords for ``backend.solve``, after the availability and capability checks."""
    name = _name(backend)
    try:
        available = type(backend).available()
    except Exception as exc:
        return _failed(name, time.perf_counter(), f"available() raised {type(exc).__name__}: {exc}")
    caps = backend.capabilities
    if not available:
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
    return kwargs


def _timed(solution: Solution, name: str, seconds: float, time_limit: float | None) -> Solution:
    """cetopt's own clock and the backend's name; the backend's claimed time goes to ``stats``."""
    stats = {**solution.stats, "backend_time": solution.time}
    message = solution.message
    if time_limit is not None and seconds > 2 * time_limit + 1.0:
        message = f"{message}; note: ran {seconds:.3g} s against a time limit of {time_limit:g} s"
    return dataclasses.replace(
        solution, solver=solution.solver or name, time=seconds, stats=stats, message=message
    )


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

    Returns
    -------
    list of Solution
        One per problem. A malformed problem (not a :class:`MILP`, a bad start) gets an ``error``
        Solution in its slot; the others are solved.

    Raises
    ------
    SolveArgumentError, UnknownSolverError
        Arguments shared by all solves are wrong; raised before any solve starts.
    CallbackError
        ``on_done`` raised. Every solve still ran; ``err.results`` holds all the solutions.
    """
    items: Sequence[MILP] = list(problems)
    _number("time_limit", time_limit, positive=True)
    _number("mip_gap", mip_gap, positive=False)
    _check_options(options)
    workers = _workers(workers)
    if isinstance(solver, str):
        _check_available(get_solver(solver))  # an unknown or missing backend fails once, up front
    failures: list[tuple[int, Exception]] = []

    def run(i: int) -> Solution:
        sol = _solve_one(items[i], solver, time_limit, mip_gap, options)
        if on_done is not None:
            try:
                on_done(i, sol)
            except Exception as exc:  # reported after every solve finished; no result is lost
                failures.append((i, exc))
        return sol

    if workers == 1 or len(items) <= 1:
        results = [run(i) for i in range(len(items))]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, range(len(items))))
    if failures:
        index, exc = min(failures, key=lambda f: f[0])
        raise CallbackError(
            f"on_done raised for {len(failures)} of {len(items)} problems (first: problem {index}, "
            f"{type(exc).__name__}: {exc}); all {len(items)} solves finished, see err.results",
            results,
            index,
        ) from exc
    return results


def _check_available(backend: Solver) -> None:
    try:
        ok = type(backend).available()
    except Exception:
        return  # each solve reports it as status "error"
    if not ok:
        raise SolverUnavailableError(
            f"solver {_name(backend)!r} cannot run here: its dependency is not installed"
        )


def _workers(workers) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)):
        raise SolveArgumentError(f"workers must be an int or None, got {type(workers).__name__} {workers!r}")
    return max(1, int(workers))


def _solve_one(problem, solver, time_limit, mip_gap, options) -> Solution:
    try:
        return solve(problem, solver, time_limit, mip_gap, options=options)
    except CetoptError as exc:  # this problem is malformed (or this backend refuses it): its slot only
        return Solution(status=Status.ERROR, solver=str(getattr(solver, "name", solver)), message=str(exc))
