"""LEO: lossless compression by stable-ReLU detection (Serra, Kumar, Ramalingam 2020).

:func:`find_stable_units` proves which ReLUs never change sign on an input domain;
:func:`remove_stable_units` deletes the stably inactive ones and folds the stably active ones
through the graph rewriter, without changing any output on the domain.
"""

from cetopt.leo.detect import find_stable_units
from cetopt.leo.domain import Domain
from cetopt.leo.remove import remove_stable_units
from cetopt.leo.report import STAGES, LayerReport, StabilityReport
from cetopt.leo.training import build_leo_model, leo_recipe, load_leo_model

__all__ = [
    "STAGES",
    "Domain",
    "LayerReport",
    "StabilityReport",
    "build_leo_model",
    "find_stable_units",
    "leo_recipe",
    "load_leo_model",
    "remove_stable_units",
]
