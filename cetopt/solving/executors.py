"""Where independent tasks run: a local thread pool (the default) or a Ray cluster.

``get_executor("thread" | "ray" | Executor, workers)`` gives an :class:`Executor`; its
:meth:`~Executor.outcomes` runs a function over items and returns, per item, the result or the
exception it raised, in input order. :func:`run_with_retry` retries each failed item once, and
:func:`solve_tasks` does that for solver calls, where an ``error`` status also counts as a failure.

Ray is optional (``pip install "cetopt[ray]"``) and imported only when a Ray executor is built.
``ray.init()`` with no address starts a local cluster; an address joins an existing one.
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cetopt.errors import CetoptError
from cetopt.problem import MILP, Solution, Status

__all__ = [
    "Executor",
    "Outcome",
    "RayExecutor",
    "ThreadExecutor",
    "get_executor",
    "map_tasks",
    "run_with_retry",
    "solve_tasks",
]


@dataclass
class Outcome:
    """One task's result, or the exception it raised (``ok`` says which)."""

    ok: bool
    value: Any = None
    error: BaseException | None = None


class Executor(abc.ABC):
    """Runs a function over independent items."""

    name: str = "executor"

    @abc.abstractmethod
    def outcomes(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Outcome]:
        """``fn(item)`` for every item, in input order; an exception is captured, never raised."""


def _capture(fn: Callable[[Any], Any], item: Any) -> Outcome:
    try:
        return Outcome(True, fn(item))
    except Exception as exc:  # reported to the caller, which decides about retries
        return Outcome(False, error=exc)


class ThreadExecutor(Executor):
    """A local thread pool (HiGHS releases the GIL, so solves run truly in parallel)."""

    name = "thread"

    def __init__(self, workers: int | None = None):
        from cetopt.solving.api import default_workers

        self.workers = default_workers() if workers is None else max(1, int(workers))

    def outcomes(self, fn, items):
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return [_capture(fn, item) for item in items]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(functools.partial(_capture, fn), items))


class RayExecutor(Executor):
    """Tasks on a Ray cluster: a local one started by ``ray.init()``, or the one at ``address``.

    Parameters
    ----------
    address : str, optional
        Address of an existing cluster (``"auto"``, ``"ray://host:10001"``); default: start a
        local cluster, or use the one this process already joined.
    num_cpus : int, optional
        CPUs of a local cluster that this executor starts (default: all).
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError as exc:
            raise CetoptError(
                "executor='ray' needs Ray: pip install 'cetopt[ray]' (or pip install ray)"
            ) from exc
        self.ray = ray
        if not ray.is_initialized():
            # workers import cetopt from where this process does, not from another installation
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            root = os.path.dirname(root)
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
            )
        self._remote = ray.remote(max_retries=0)(_call)

    def outcomes(self, fn, items):
        fn_ref = self.ray.put(fn)
        refs = [self._remote.remote(fn_ref, item) for item in items]
        out = []
        for ref in refs:
            try:
                out.append(Outcome(True, self.ray.get(ref)))
            except Exception as exc:  # the task raised, or its worker died
                out.append(Outcome(False, error=exc))
        return out


def _call(fn, item):
    return fn(item)


def get_executor(executor: str | Executor | None = None, workers: int | None = None) -> Executor:
    """The :class:`Executor` for ``executor``: ``None``/``"thread"``/``"local"``, ``"ray"``, or an instance.

    Raises
    ------
    ValueError
        An unknown name.
    CetoptError
        ``"ray"`` without Ray installed.
    """
    if isinstance(executor, Executor):
        return executor
    if executor in (None, "thread", "local"):
        return ThreadExecutor(workers)
    if executor == "ray":
        return RayExecutor()
    raise ValueError(f"unknown executor {executor!r}; use 'thread', 'ray' or an Executor instance")


def map_tasks(
    fn: Callable[[Any], Any], items: Sequence[Any], executor=None, workers: int | None = None
) -> list:
    """``[fn(item) for item in items]`` on ``executor`` (see :func:`get_executor`).

    Re-raises the first exception, after every item ran.
    """
    out = get_executor(executor, workers).outcomes(fn, list(items))
    for o in out:
        if not o.ok:
            raise o.error
    return [o.value for o in out]


def run_with_retry(
    executor: Executor,
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    failed: Callable[[Any], bool] | None = None,
) -> tuple[list[Outcome], list[int]]:
    """Run ``fn`` over ``items``; retry every failed item once.

    An item fails when it raises, or when ``failed(result)`` is true. Returns the outcomes (a
    retried item's second outcome) and the indices that failed twice.
    """

    def bad(o: Outcome) -> bool:
        return not o.ok or (failed is not None and failed(o.value))

    items = list(items)
    out = executor.outcomes(fn, items)
    again = [k for k, o in enumerate(out) if bad(o)]
    if again:
        for k, o in zip(again, executor.outcomes(fn, [items[k] for k in again])):
            out[k] = o
    return out, [k for k in again if bad(out[k])]


def _solve_task(problem: MILP, solver, time_limit, mip_gap, options) -> Solution:
    from cetopt.solving.api import solve

    return solve(problem, solver, time_limit, mip_gap, options=options)


def solve_tasks(
    problems: Sequence[MILP],
    solver="highs",
    time_limit: float | None = None,
    mip_gap: float | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    executor: Executor | None = None,
) -> tuple[list[Solution], list[int]]:
    """Solve independent problems on ``executor``, retrying each failed solve once.

    A solve fails when it raises or returns status ``error``. Returns the solutions (a failed
    one as an ``error`` Solution whose message says why) and the indices that failed twice.
    """
    executor = executor or ThreadExecutor()
    fn = functools.partial(
        _solve_task, solver=solver, time_limit=time_limit, mip_gap=mip_gap, options=options
    )
    out, failures = run_with_retry(executor, fn, problems, lambda s: s.status == Status.ERROR)
    name = str(getattr(solver, "name", solver))
    sols = [
        o.value
        if o.ok
        else Solution(
            status=Status.ERROR, solver=name, message=f"task failed: {type(o.error).__name__}: {o.error}"
        )
        for o in out
    ]
    return sols, failures
