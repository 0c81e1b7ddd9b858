"""Public test helpers: the solver contract a backend must meet (:mod:`cetopt.testing.solver_contract`)
and the misbehaving solvers cetopt rejects (:mod:`cetopt.testing.misbehaving`)."""

from cetopt.testing.misbehaving import MISBEHAVIOURS
from cetopt.testing.solver_contract import CONTRACT_CHECKS

__all__ = ["CONTRACT_CHECKS", "MISBEHAVIOURS"]
