"""Analysis stage: how sensitive each layer is to compression."""

from cetopt.analysis.channels import channel_bits, channel_sensitivity
from cetopt.analysis.correlation import rank_correlation
from cetopt.analysis.estimators import METHODS, sensitivity
from cetopt.analysis.objective import LossObjective, quantizable_layers
from cetopt.analysis.table import SensitivityTable

__all__ = [
    "METHODS",
    "LossObjective",
    "SensitivityTable",
    "channel_bits",
    "channel_sensitivity",
    "quantizable_layers",
    "rank_correlation",
    "sensitivity",
]
