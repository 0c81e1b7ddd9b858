"""The contract every solver backend implements, built-in or a user's own."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cetopt.problem import MILP, Solution

__all__ = ["Capabilities", "Solver"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. :func:`cetopt.solve` reads these flags before it calls the backend.

    Attributes
    ----------
    mip : bool
        Accepts integer columns (otherwise LPs only).
    time_limit : bool
        Honours ``time_limit`` and then returns its best solution with status ``time_limit``.
    dual_bound : bool
        Reports a proven dual bound in :attr:`Solution.bound`.
    warm_start : bool
        Accepts ``start=`` (a full starting point) as a keyword of ``solve``.
    options : bool
        Accepts ``options=`` (a mapping of backend-native settings) as a keyword of ``solve``.
    """

    mip: bool = True
    time_limit: bool = False
    dual_bound: bool = False
    warm_start: bool = False
    options: bool = False


class Solver(abc.ABC):
    """Base class of solver backends.

    A backend sets :attr:`name`, declares :attr:`capabilities`, and implements :meth:`solve`. It
    becomes usable as ``solver="<name>"`` everywhere cetopt takes a solver once it is registered with
    :func:`cetopt.register_solver` or through an entry point in the group ``cetopt.solvers``.

    The minimal contract is ``solve(problem, time_limit, mip_gap) -> Solution``. Backends that
    declare ``warm_start`` or ``options`` also receive ``start=`` / ``options=`` keywords.

    Rules every backend follows (the shared contract suite, :mod:`cetopt.testing`, checks them):

    * never report ``optimal`` when it stopped early; read the solver's native status;
    * ``bound`` is a proven dual bound or ``None``, never the incumbent;
    * ``x`` respects the problem's bounds and rows to the solver's tolerances.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    @classmethod
    def available(cls) -> bool:
        """Whether the backend can run here (its dependencies import). Must not raise."""
        return True

    @abc.abstractmethod
    def solve(
        self,
        problem: MILP,
        time_limit: float | None = None,
        mip_gap: float | None = None,
        *,
        start: np.ndarray | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Solution:
        """Solve ``problem`` and return a :class:`~cetopt.Solution`."""
