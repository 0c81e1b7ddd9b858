"""Deployment: execution modes, activation quantization, W×A allocation, ONNX export, latency."""

from cetopt.deploy.activations import (
    ActivationQuant,
    ActivationRanges,
    calibrate_activations,
    choose_qparams,
    fake_quantize_dynamic,
)
from cetopt.deploy.runtime import (
    MODES,
    KernelFallbackWarning,
    deployment_model,
    runtime,
)

__all__ = [
    "MODES",
    "ActivationQuant",
    "ActivationRanges",
    "KernelFallbackWarning",
    "calibrate_activations",
    "choose_qparams",
    "deployment_model",
    "fake_quantize_dynamic",
    "runtime",
]
