"""Weight quantization: the quantizer (:mod:`cetopt.quant.quantizer`), GPTQ rounding and bias correction."""

from cetopt.quant.quantizer import QuantizedWeight, fake_quantize, quantize_weight

__all__ = [
    "QuantHandler",
    "QuantizedWeight",
    "calibrate_sequentially",
    "correct_bias",
    "fake_quantize",
    "gptq_option_weights",
    "gptq_round",
    "quant_targets",
    "quantize_weight",
    "register_quant_handler",
]


def __getattr__(name: str):
    if name == "correct_bias":  # imported on use: it needs cetopt.nn, which needs this package
        from cetopt.quant.bias_correction import correct_bias

        return correct_bias
    if name == "gptq_option_weights":
        from cetopt.quant.apply import gptq_option_weights

        return gptq_option_weights
    if name == "gptq_round":
        from cetopt.quant.gptq import gptq_round

        return gptq_round
    if name in ("QuantHandler", "quant_targets", "register_quant_handler"):
        from cetopt.quant import handlers

        return getattr(handlers, name)
    if name == "calibrate_sequentially":
        from cetopt.quant.sequential import calibrate_sequentially

        return calibrate_sequentially
    raise AttributeError(f"module 'cetopt.quant' has no attribute {name!r}")
