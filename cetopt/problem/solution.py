"""What a solver returns: status, point, objective, dual bound and gap, as plain data."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Solution", "Status", "relative_gap"]


class Status(str, enum.Enum):
    """How a solve ended.

    ``optimal``
        Proven optimal (within the requested MIP gap).
    ``time_limit``
        The time limit stopped the solver; ``x`` holds the best solution found, if any.
    ``stopped``
        Another limit or a user-given target stopped the solver early (node, iteration or
        solution limit, objective target or bound, interrupt); ``x`` and ``bound`` are whatever
        it had. Never reported as ``optimal``.
    ``infeasible``
        Proven to have no feasible point.
    ``unbounded``
        Proven feasible with an objective unbounded in the optimization direction.
    ``error``
        The solver failed; ``message`` says why.
    """

    OPTIMAL = "optimal"
    TIME_LIMIT = "time_limit"
    STOPPED = "stopped"
    INFEASIBLE = "infeasible"
    UNBOUNDED = "unbounded"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """Relative gap ``|objective − bound| / max(1, |objective|)``, or ``None`` if either is missing."""
    if objective is None or bound is None or not (math.isfinite(objective) and math.isfinite(bound)):
        return None
    return abs(objective - bound) / max(1.0, abs(objective))


@dataclass(frozen=True, eq=False, kw_only=True)
class Solution:
    """The result of one solve.

    Attributes
    ----------
    status : Status
        How the solve ended (compares equal to its string value, e.g. ``"optimal"``).
    x : ndarray or None
        Best point found, if any.
    objective : float or None
        Objective of ``x``, offset included.
    bound : float or None
        The solver's proven dual bound: no feasible point is better than this. ``None`` where the
        solver does not report one.
    gap : float or None
        Relative gap between ``objective`` and ``bound``.
    time : float
        Wall-clock seconds spent inside the solver call.
    solver : str
        Name of the backend.
    message : str
        The solver's own words about the end of the solve.
    stats : dict
        Backend-specific figures (node count, time breakdown, native status).
    verified : bool
        Set by :func:`cetopt.solve` once the answer passed its checks (point, objective, bound).
    raw : Solution or None
        The backend's own answer, kept when :func:`cetopt.solve` changed it (an ``error`` from a
        failed check, an ``optimal`` downgraded to ``stopped``), for debugging.
    """

    status: Status
    x: np.ndarray | None = None
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    time: float = 0.0
    solver: str = ""
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    raw: Solution | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))
        if self.x is not None:
            object.__setattr__(self, "x", np.asarray(self.x, dtype=np.float64))
        if self.gap is None and self.status in (Status.OPTIMAL, Status.TIME_LIMIT, Status.STOPPED):
            object.__setattr__(self, "gap", relative_gap(self.objective, self.bound))

    @property
    def has_solution(self) -> bool:
        """Whether a feasible point is attached."""
        return self.x is not None

    def __repr__(self) -> str:
        parts = [f"status={self.status.value!r}", f"solver={self.solver!r}"]
        if self.objective is not None:
            parts.append(f"objective={self.objective:.10g}")
        if self.bound is not None:
            parts.append(f"bound={self.bound:.10g}")
        if self.gap is not None:
            parts.append(f"gap={self.gap:.3g}")
        parts.append(f"time={self.time:.3g}s")
        return f"Solution({', '.join(parts)})"
