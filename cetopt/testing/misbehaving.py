"""Solvers that misbehave on purpose, and what :func:`cetopt.solve` makes of each.

Each fixture wraps an honest backend (``highs`` unless told otherwise), solves with it, and then
corrupts the answer in one way: a point of the wrong length, a NaN, a point that breaks a row, an
objective that disagrees with the point, a dual bound on the wrong side, a fractional integer, an
``optimal`` without a point, an ``optimal`` MIP far from its bound; or it raises (in ``solve``,
``__init__`` or ``available()``), or takes long and claims it did not. :data:`MISBEHAVIOURS` pairs
each with the status cetopt returns, and :func:`check_misbehaviour_is_caught` (part of
``CONTRACT_CHECKS``) asserts it for any honest backend, so a plugin author sees what cetopt rejects::

    from cetopt.testing.misbehaving import MISBEHAVIOURS, wrap
    bad = wrap(MISBEHAVIOURS[0].cls, "mysolver")
    cetopt.solve(problem, bad).status  # "error"
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cetopt.problem import MILP, Solution, Status
from cetopt.solving.base import Capabilities, Solver

__all__ = [
    "MISBEHAVIOURS",
    "MisbehavingSolver",
    "Misbehaviour",
    "check_misbehaviour_is_caught",
    "wrap",
]


class MisbehavingSolver(Solver):
    """Base fixture: solves with :attr:`inner` (any backend cetopt takes) and corrupts the answer."""

    name = "misbehaving"
    capabilities = Capabilities(mip=True, time_limit=True, dual_bound=True)
    inner: ClassVar[Any] = "highs"

    def solve(self, problem: MILP, time_limit=None, mip_gap=None) -> Solution:
        from cetopt.solving.api import solve

        honest = solve(problem, self.inner, time_limit, mip_gap)
        return self.corrupt(problem, honest)

    def corrupt(self, problem: MILP, honest: Solution) -> Solution:
        """The misbehaviour: a changed copy of the honest answer."""
        return honest


def _with(honest: Solution, **changes) -> Solution:
    return dataclasses.replace(honest, verified=False, raw=None, gap=None, **changes)


class WrongShape(MisbehavingSolver):
    name = "wrong-shape"

    def corrupt(self, problem, honest):
        return _with(honest, x=np.append(honest.x, 0.0))


class NaNPoint(MisbehavingSolver):
    name = "nan-point"

    def corrupt(self, problem, honest):
        x = honest.x.copy()
        x[0] = np.nan
        return _with(honest, x=x)


class InfeasiblePoint(MisbehavingSolver):
    """Every column at its upper bound (or 1e6), objective made to match: breaks the rows."""

    name = "infeasible-point"

    def corrupt(self, problem, honest):
        x = np.where(np.isfinite(problem.col_upper), problem.col_upper, 1e6)
        return _with(honest, x=x, objective=problem.objective_value(x), bound=None)


class FractionalPoint(MisbehavingSolver):
    name = "fractional-point"

    def corrupt(self, problem, honest):
        x = honest.x.copy()
        j = int(np.flatnonzero(problem.integrality)[0])
        x[j] += 0.5 if x[j] + 0.5 <= problem.col_upper[j] else -0.5
        return _with(honest, x=x, objective=problem.objective_value(x), bound=None)


class WrongObjective(MisbehavingSolver):
    name = "wrong-objective"

    def corrupt(self, problem, honest):
        return _with(honest, objective=honest.objective + 1.0 + abs(honest.objective))


class LyingBound(MisbehavingSolver):
    """A dual bound better than the point it returns: no valid bound can be."""

    name = "lying-bound"

    def corrupt(self, problem, honest):
        past = 1.0 if problem.sense == "min" else -1.0  # min: above the objective; max: below
        return _with(honest, bound=honest.objective + past * (1.0 + abs(honest.objective)))


class OptimalWithoutPoint(MisbehavingSolver):
    name = "optimal-without-point"

    def corrupt(self, problem, honest):
        return _with(honest, x=None)


class WideGapOptimal(MisbehavingSolver):
    """Calls itself optimal with a valid bound far below (min) / above (max) its objective."""

    name = "wide-gap-optimal"

    def corrupt(self, problem, honest):
        short = -1.0 if problem.sense == "min" else 1.0  # min: below the objective; max: above
        return _with(honest, bound=honest.objective + short * (1.0 + abs(honest.objective)))


class RaisingSolve(MisbehavingSolver):
    name = "raising-solve"

    def corrupt(self, problem, honest):
        raise RuntimeError("simulated crash inside solve")


class RaisingInit(MisbehavingSolver):
    name = "raising-init"

    def __init__(self):
        raise RuntimeError("simulated crash in __init__")


class RaisingAvailable(MisbehavingSolver):
    name = "raising-available"

    @classmethod
    def available(cls) -> bool:
        raise RuntimeError("simulated crash in available()")


class Slow(MisbehavingSolver):
    """Sleeps past the time limit, then claims it took no time: cetopt reports its own clock."""

    name = "slow"
    delay: ClassVar[float] = 1.5

    def corrupt(self, problem, honest):
        time.sleep(self.delay)
        return _with(honest, time=0.0)


@dataclass(frozen=True)
class Misbehaviour:
    """A fixture and what cetopt returns for it: ``status``, and a phrase of its ``message``."""

    cls: type[MisbehavingSolver]
    status: Status
    message: str


MISBEHAVIOURS = [
    Misbehaviour(WrongShape, Status.ERROR, "shape"),
    Misbehaviour(NaNPoint, Status.ERROR, "nan"),
    Misbehaviour(InfeasiblePoint, Status.ERROR, "row"),
    Misbehaviour(FractionalPoint, Status.ERROR, "not integer"),
    Misbehaviour(WrongObjective, Status.ERROR, "objective"),
    Misbehaviour(LyingBound, Status.ERROR, "dual bound"),
    Misbehaviour(OptimalWithoutPoint, Status.ERROR, "without a point"),
    Misbehaviour(WideGapOptimal, Status.STOPPED, "gap"),
    Misbehaviour(RaisingSolve, Status.ERROR, "simulated crash inside solve"),
    Misbehaviour(RaisingInit, Status.ERROR, "__init__"),
    Misbehaviour(RaisingAvailable, Status.ERROR, "available()"),
    Misbehaviour(Slow, Status.OPTIMAL, "time limit"),
]


def wrap(cls: type[MisbehavingSolver], inner: Any) -> type[MisbehavingSolver]:
    """``cls`` with ``inner`` (a backend name, class or instance) as its honest solver."""
    return type(cls.__name__, (cls,), {"inner": inner})


def _probe() -> MILP:
    """max 5a + 4b + 3c, 2a + 3b + c ≤ 5, 4a + b + 2c ≤ 11, integers in [0, 3]: optimum 13 at (2, 0, 1)."""
    return MILP(
        c=[5.0, 4.0, 3.0],
        A=np.array([[2.0, 3.0, 1.0], [4.0, 1.0, 2.0]]),
        row_upper=[5.0, 11.0],
        col_upper=[3.0, 3.0, 3.0],
        integrality=[True, True, True],
        sense="max",
    )


def check_misbehaviour_is_caught(solver) -> None:
    """Each misbehaving wrapper around ``solver`` gets the status :data:`MISBEHAVIOURS` lists."""
    from cetopt.solving.api import solve

    problem = _probe()
    for case in MISBEHAVIOURS:
        bad = wrap(case.cls, solver)
        limit = 0.2 if case.cls is Slow else None
        sol = solve(problem, bad, time_limit=limit, mip_gap=0.0)
        name = case.cls.__name__
        assert sol.status == case.status, f"{name}: status {sol.status.value} ({sol.message})"
        assert case.message.lower() in sol.message.lower(), f"{name}: message {sol.message!r}"
        if case.status == Status.ERROR:
            assert sol.x is None and not sol.verified, f"{name}: an error carries no point"
        if case.cls is Slow:
            assert sol.time >= Slow.delay and sol.stats["backend_time"] == 0.0
