"""Safety-guided self-compression: per-channel bit depths learned in training (arXiv 2505.00350)."""

from cetopt.selfcompress.compress import (
    RestoreEvent,
    SelfCompressionResult,
    self_compress,
    size_term,
    storage_bytes,
)
from cetopt.selfcompress.layers import (
    SelfCompressingConv,
    SelfCompressingLayer,
    SelfCompressingLinear,
    self_compressing_from_float,
)
from cetopt.selfcompress.preservation import PreservationSet, build_preservation_set
from cetopt.selfcompress.quantizer import codes, quantize_ste, stored_bits

__all__ = [
    "PreservationSet",
    "RestoreEvent",
    "SelfCompressingConv",
    "SelfCompressingLayer",
    "SelfCompressingLinear",
    "SelfCompressionResult",
    "build_preservation_set",
    "codes",
    "quantize_ste",
    "self_compress",
    "self_compressing_from_float",
    "size_term",
    "storage_bytes",
    "stored_bits",
]
