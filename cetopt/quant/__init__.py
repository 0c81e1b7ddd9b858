"""Weight quantization: the quantizer (:mod:`cetopt.quant.quantizer`)."""

from cetopt.quant.quantizer import QuantizedWeight, fake_quantize, quantize_weight

__all__ = ["QuantizedWeight", "fake_quantize", "quantize_weight"]
