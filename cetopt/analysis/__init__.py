"""Analysis stage: how sensitive each layer is to compression."""

from cetopt.analysis.table import SensitivityTable

__all__ = ["SensitivityTable"]
