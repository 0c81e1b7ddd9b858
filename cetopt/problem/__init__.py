"""Problem form: :class:`MILP` in, :class:`Solution` out."""

from cetopt.problem.milp import MILP
from cetopt.problem.solution import Solution, Status, relative_gap

__all__ = ["MILP", "Solution", "Status", "relative_gap"]
