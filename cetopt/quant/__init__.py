"""Weight quantization: the quantizer (:mod:`cetopt.quant.quantizer`) and bias correction."""

from cetopt.quant.quantizer import QuantizedWeight, fake_quantize, quantize_weight

__all__ = ["QuantizedWeight", "correct_bias", "fake_quantize", "quantize_weight"]


def __getattr__(name: str):
    if name == "correct_bias":  # imported on use: it needs cetopt.nn, which needs this package
        from cetopt.quant.bias_correction import correct_bias

        return correct_bias
    raise AttributeError(f"module 'cetopt.quant' has no attribute {name!r}")
