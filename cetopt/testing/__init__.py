"""Public test helpers: the solver contract a backend must meet (:mod:`cetopt.testing.solver_contract`)."""

from cetopt.testing.solver_contract import CONTRACT_CHECKS

__all__ = ["CONTRACT_CHECKS"]
