"""Named errors. Every error cetopt raises on bad input says which thing is wrong.

All of them derive from :class:`CetoptError` and from the matching builtin (``ValueError``,
``TypeError``, ...) so ``except ValueError`` keeps working for callers that do not know cetopt.
"""

from __future__ import annotations

import re

_NUMPY_SCALAR = re.compile(r"np\.(?:float|int|uint|bool_?|complex)\d*\(([^()]*)\)")


def _plain_numbers(text: str) -> str:
    """``np.float64(0.5)`` → ``0.5``: NumPy 2 scalar reprs read as numbers in messages."""
    return _NUMPY_SCALAR.sub(r"\1", text)


class CetoptError(Exception):
    """Base class of every error cetopt raises on purpose.

    Its message shows NumPy scalars as plain numbers (``0.5``, not ``np.float64(0.5)``).
    """

    def __str__(self) -> str:
        return _plain_numbers(super().__str__())


class ProblemError(CetoptError, ValueError):
    """A :class:`cetopt.MILP` is malformed: a shape, a NaN, or a lower bound above its upper bound."""


class UnknownSolverError(CetoptError, LookupError):
    """No solver is registered under the requested name."""


class SolverRegistrationError(CetoptError, ValueError):
    """A solver cannot be registered (bad class, or the name is taken and ``replace`` was not given)."""


class SolverUnavailableError(CetoptError, RuntimeError):
    """The solver is registered but cannot run here (a dependency is missing), or lacks a capability."""


class SolverFailedError(CetoptError, RuntimeError):
    """A solve that a result depends on ended without a usable solution."""

    def __init__(self, message: str, solution=None):
        super().__init__(message)
        self.solution = solution


class InfeasibleBudgetError(CetoptError, ValueError):
    """The requested budget is below the smallest size any choice can reach."""

    def __init__(self, message: str, minimum: float):
        super().__init__(message)
        self.minimum = minimum


class NonFiniteError(CetoptError, ValueError):
    """An input array holds NaN or infinity where finite numbers are required."""


class DataShapeError(CetoptError, ValueError):
    """Data handed to cetopt does not fit the model (wrong shape, wrong dimension, empty)."""


class DomainError(CetoptError, ValueError):
    """An input domain is malformed (lo > hi, NaN bounds, wrong dimension)."""


class UnsupportedLayerError(CetoptError, TypeError):
    """The model holds a layer that the requested operation cannot handle; the message names it."""

    def __init__(self, message: str, module_name: str | None = None):
        super().__init__(message)
        self.module_name = module_name


class NoQuantizableLayerError(CetoptError, ValueError):
    """The model has no layer that the operation could compress."""


class UntraceableModelError(CetoptError, RuntimeError):
    """torch.fx could not trace the model; the message names the module and gives fx's reason."""

    def __init__(self, message: str, module_name: str | None = None):
        super().__init__(message)
        self.module_name = module_name


class RewriteError(CetoptError, ValueError):
    """A rewrite decision does not fit the model (unknown layer, index out of range, ...)."""


class UnreachableBudgetError(CetoptError, ValueError):
    """A requested rank or sparsity cannot be reached by the layer it names (too large, negative, empty)."""

    def __init__(self, message: str, layer: str | None = None):
        super().__init__(message)
        self.layer = layer


class CalibrationShapeError(DataShapeError):
    """Calibration data does not fit the model (wrong shape, dtype or dimension); the message says how."""


class SolveArgumentError(CetoptError, ValueError, TypeError):
    """An argument of :func:`cetopt.solve` / :func:`cetopt.solve_many` has the wrong type or value.

    The message names the argument (``time_limit``, ``mip_gap``, ``start``, ``options``, ``workers``).
    It is also a ``TypeError``, so code that caught the raw ``TypeError`` of a wrong type still does.
    """


class CallbackError(CetoptError, RuntimeError):
    """An ``on_done`` callback of :func:`cetopt.solve_many` raised; every solve still ran.

    ``results`` holds all solutions in input order, ``index`` the first problem whose callback
    failed; the callback's exception is the ``__cause__``.
    """

    def __init__(self, message: str, results, index: int):
        super().__init__(message)
        self.results = results
        self.index = index


class ModelFileError(CetoptError, ValueError):
    """A model file cannot be read: missing, not safetensors, not cetopt's, malformed, or not fitting the
    architecture; the message names the file and what is wrong with it."""


class ReportMismatchError(CetoptError, ValueError):
    """A report is applied to a model other than the one it was computed on (other weights or layers)."""


class OutputPathError(CetoptError, ValueError):
    """An output path cannot be written (a file where a directory is needed, no permission, ...)."""


class AllocationArgumentError(CetoptError, ValueError):
    """An argument of :func:`cetopt.allocate` or :func:`cetopt.pareto` is malformed; the message names it."""


class BudgetError(AllocationArgumentError):
    """A budget cannot be read, or is not a positive finite amount (NaN, ``"0x"``, ``"0.5x"``, ...)."""


class UnknownLayerError(AllocationArgumentError, KeyError):
    """Bit limits or tie groups name a layer the table does not have."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class CommandLineError(CetoptError, ValueError):
    """A ``cetopt`` command-line argument cannot be used (``--model``, ``--data``, ``--checkpoint``,
    ``--budget`` ...); the message names the flag, the value and what is wrong with it."""


class MissingDependencyError(CetoptError, ImportError):
    """A feature needs an optional package that is not installed; the message names it and its extra."""


class JointMenuError(CetoptError, ValueError):
    """The joint menu (``compress(..., joint=True)``) got arguments it cannot use together."""
