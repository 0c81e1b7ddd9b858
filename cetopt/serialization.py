"""``save`` / ``load``: compressed models on disk as safetensors, quantized weights bit-packed.

A file holds

* for every quantized layer ``N``: ``N.weight_packed`` (uint8, codes packed at each channel's bit
  width, :mod:`cetopt.quant.packing`), ``N.weight_scale`` (float32 per channel) and
  ``N.weight_bits`` (uint8 per channel);
* every other tensor of the ``state_dict`` as it is (biases, BatchNorm, float layers);
* metadata: the format version, the architecture ``source`` (``"zoo:<name>"`` or
  ``"module:attr"``), the decisions that turned that architecture into this model, and the shapes
  of the example inputs the graph was traced with.

``load`` builds the architecture from its source (or takes a skeleton model), redoes the recorded
decisions to get the same structure, and loads the tensors: outputs are reproduced exactly. No
pickle is ever read.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from cetopt._io import atomic_write_bytes
from cetopt.errors import CetoptError
from cetopt.graph.decisions import decision_from_dict
from cetopt.graph.rewriter import _SOURCE, history, rewrite
from cetopt.nn.quantized import QuantizedMixin
from cetopt.quant.packing import pack_codes, unpack_codes

__all__ = ["SavedModel", "load", "mark_source", "save"]

FORMAT = "cetopt-1"
_QUANT_KEYS = ("weight_q", "weight_scale", "weight_bits")


def mark_source(model: nn.Module, source: str) -> nn.Module:
    """Record where ``model``'s architecture comes from (``"zoo:<name>"`` or ``"module:attr"``).

    :func:`load` builds the architecture from it. Returns ``model``.
    """
    setattr(model, _SOURCE, source)
    return model


@dataclass(frozen=True)
class SavedModel:
    """What :func:`save` wrote.

    Attributes
    ----------
    path : str
    bytes_on_disk : int
        The file's real size.
    quantized_bytes : int
        Bytes of the quantized weights in the file: packed codes, scales and bit widths.
    other_bytes : int
        Bytes of every other tensor (biases, BatchNorm, float layers).
    header_bytes : int
        safetensors header and metadata.
    layers : dict
        Per quantized layer: its packed, scale and bit-width bytes.
    """

    path: str
    bytes_on_disk: int
    quantized_bytes: int
    other_bytes: int
    header_bytes: int
    layers: dict


def _quantized_layers(model: nn.Module) -> dict[str, QuantizedMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedMixin)}


def save(model: nn.Module, path: str | os.PathLike, *, source: str | None = None) -> SavedModel:
    """Write ``model`` to ``path`` atomically.

    Parameters
    ----------
    model : nn.Module
        Typically the result of :func:`cetopt.quantize` or :func:`cetopt.graph.rewrite`.
    path : str or PathLike
    source : str, optional
        Architecture source for :func:`load` (``"zoo:<name>"`` or ``"module:attr"``); defaults to
        the one recorded on the model (:func:`mark_source`, set by the zoo).
    """
    record = history(model)
    source = source or record["source"]
    quantized = _quantized_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, layer in quantized.items():
        bits = layer.weight_bits.to(torch.int64).numpy()
        packed = torch.from_numpy(pack_codes(layer.weight_q, bits))
        tensors[f"{name}.weight_packed"] = packed
        tensors[f"{name}.weight_scale"] = layer.weight_scale.detach().to(torch.float32).contiguous()
        tensors[f"{name}.weight_bits"] = layer.weight_bits.to(torch.uint8).contiguous()
        layers[name] = {
            "packed": packed.numel(),
            "scale": 4 * bits.size,
            "bits": bits.size,
            "shape": list(layer.weight_q.shape),
            "dtype": str(layer.weight_q.dtype).removeprefix("torch."),
        }
    skip = {f"{name}.{key}" for name in quantized for key in _QUANT_KEYS}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().contiguous()
    metadata = {
        "format": FORMAT,
        "source": json.dumps(source),
        "history": json.dumps(record["decisions"]),
        "example_inputs": json.dumps(record["example_inputs"]),
        "quantized": json.dumps(layers),
    }
    blob = st_save(tensors, metadata=metadata)
    atomic_write_bytes(path, blob)
    header = 8 + struct.unpack("<Q", blob[:8])[0]
    quantized_bytes = sum(v["packed"] + v["scale"] + v["bits"] for v in layers.values())
    return SavedModel(
        path=str(path),
        bytes_on_disk=os.path.getsize(path),
        quantized_bytes=quantized_bytes,
        other_bytes=len(blob) - header - quantized_bytes,
        header_bytes=header,
        layers=layers,
    )


def _metadata(blob: bytes) -> dict:
    size = struct.unpack("<Q", blob[:8])[0]
    meta = json.loads(blob[8 : 8 + size]).get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise CetoptError(f"not a cetopt file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def _build_architecture(source: str | None, allow_import: bool) -> nn.Module:
    if source is None:
        raise CetoptError("the file records no architecture source; pass load(path, model=<architecture>)")
    if source.startswith("zoo:"):
        from cetopt.zoo import build_model

        return build_model(source.removeprefix("zoo:"))
    if not allow_import:
        raise CetoptError(
            f"the file names the architecture {source!r}; importing and calling it runs code named by the "
            "file, so pass allow_import=True if you trust it, or load(path, model=<architecture>)"
        )
    module_name, _, attr = source.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if not isinstance(obj, nn.Module) else obj


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    allow_import: bool = False,
    mode: str | None = None,
) -> nn.Module:
    """Rebuild a model written by :func:`save`; its outputs equal the saved model's exactly.

    Parameters
    ----------
    path : str or PathLike
    model : nn.Module, optional
        The uncompressed architecture to rebuild on (its weights do not matter; it is not
        modified). Without it the architecture comes from the file's source: zoo names always,
        ``module:attr`` only with ``allow_import=True``.
    allow_import : bool
        Allow importing and calling the ``module:attr`` the file names.
    mode : str, optional
        An execution mode of :func:`cetopt.runtime` (``"dequant-cached"``, ``"int8"``, ...) to
        return the model in; the file is only read.
    """
    blob = Path(path).read_bytes()
    meta = _metadata(blob)
    source = json.loads(meta["source"])
    base = model if model is not None else _build_architecture(source, allow_import)
    decisions = [decision_from_dict(d) for d in json.loads(meta["history"])]
    spec = json.loads(meta.get("example_inputs", "null"))
    inputs = (
        None
        if spec is None
        else tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec)
    )
    rebuilt = rewrite(base, decisions, inputs) if decisions else _copy(base)
    tensors = st_load(blob)
    state = {}
    for name, info in json.loads(meta["quantized"]).items():
        bits = tensors.pop(f"{name}.weight_bits").to(torch.int64)
        packed = tensors.pop(f"{name}.weight_packed").numpy()
        dtype = getattr(torch, info["dtype"])
        state[f"{name}.weight_q"] = unpack_codes(packed, bits.numpy(), tuple(info["shape"]), dtype)
        state[f"{name}.weight_scale"] = tensors.pop(f"{name}.weight_scale")
        state[f"{name}.weight_bits"] = bits.to(torch.int16)
    state.update(tensors)
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    if source is not None:
        setattr(rebuilt, _SOURCE, source)
    if mode is not None:
        from cetopt.deploy.runtime import runtime

        return runtime(rebuilt, mode)
    return rebuilt


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def file_tensor_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Byte size of every tensor stored in a safetensors file, read from its header."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
    return {k: int(np.diff(v["data_offsets"])[0]) for k, v in header.items() if k != "__metadata__"}
