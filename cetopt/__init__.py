"""cetopt: compress PyTorch models with decisions answered by optimization solvers.

The public surface is re-exported here. Parts that need torch load on first use, so
``import cetopt`` stays cheap for solver-only work.
"""

from __future__ import annotations

import importlib

from cetopt import errors
from cetopt.problem import MILP, Solution, Status
from cetopt.solving import (
    Capabilities,
    Solver,
    SolverInfo,
    available_solvers,
    get_solver,
    register_solver,
    solve,
    solve_many,
    unregister_solver,
)

__version__ = "0.1.0"

# name -> module that defines it; imported lazily (PEP 562).
_LAZY: dict[str, str] = {
    "SensitivityTable": "cetopt.analysis",
    "sensitivity": "cetopt.analysis",
    "channel_sensitivity": "cetopt.analysis",
    "channel_bits": "cetopt.analysis",
    "rank_correlation": "cetopt.analysis",
    "compress": "cetopt.pipeline",
    "CompressionResult": "cetopt.pipeline",
    "Plan": "cetopt.allocation",
    "ParetoFront": "cetopt.allocation",
    "allocate": "cetopt.allocation",
    "pareto": "cetopt.allocation",
    "quantize": "cetopt.quant.apply",
    "save": "cetopt.serialization",
    "load": "cetopt.serialization",
    "mark_source": "cetopt.serialization",
    "SavedModel": "cetopt.serialization",
    "rewrite": "cetopt.graph",
    "decompose": "cetopt.lowrank",
    "build_menu": "cetopt.lowrank",
    "self_compress": "cetopt.selfcompress",
    "SelfCompressionResult": "cetopt.selfcompress",
    "runtime": "cetopt.deploy",
    "export_onnx": "cetopt.deploy",
    "calibrate_activations": "cetopt.deploy",
    "find_stable_units": "cetopt.leo",
    "remove_stable_units": "cetopt.leo",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cetopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "MILP",
    "Capabilities",
    "Solution",
    "Solver",
    "SolverInfo",
    "Status",
    "available_solvers",
    "errors",
    "get_solver",
    "register_solver",
    "solve",
    "solve_many",
    "unregister_solver",
    *_LAZY,
]
