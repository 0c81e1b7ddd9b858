"""Solver layer: the backend contract, the registry, and :func:`solve`."""

from cetopt.solving.api import default_workers, solve, solve_many
from cetopt.solving.base import Capabilities, Solver
from cetopt.solving.registry import (
    SolverInfo,
    available_solvers,
    get_solver,
    register_solver,
    unregister_solver,
)

__all__ = [
    "Capabilities",
    "Solver",
    "SolverInfo",
    "available_solvers",
    "default_workers",
    "get_solver",
    "register_solver",
    "solve",
    "solve_many",
    "unregister_solver",
]
