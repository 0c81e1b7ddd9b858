"""Compressed layers: quantized (integer codes + scales) and factorised (two thin layers + sparse)."""

from cetopt.nn.factorized import FactorizedConv, FactorizedLinear, factorized_from_factors
from cetopt.nn.quantized import QuantizedConv, QuantizedLinear, quantized_from_float

__all__ = [
    "FactorizedConv",
    "FactorizedLinear",
    "QuantizedConv",
    "QuantizedLinear",
    "factorized_from_factors",
    "quantized_from_float",
]
