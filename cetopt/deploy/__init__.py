"""Deployment: execution modes, activation quantization, W×A allocation, ONNX export, latency."""

from cetopt.deploy.activations import (
    ActivationQuant,
    ActivationRanges,
    calibrate_activations,
    choose_qparams,
    fake_quantize_dynamic,
)
from cetopt.deploy.onnx_export import ExportedOnnx, export_onnx
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
    "ExportedOnnx",
    "KernelFallbackWarning",
    "calibrate_activations",
    "choose_qparams",
    "deployment_model",
    "export_onnx",
    "fake_quantize_dynamic",
    "runtime",
]
