"""``save`` / ``load``: compressed models on disk as safetensors, quantized weights bit-packed.

A file holds

* for every quantized layer ``N``: ``N.weight_packed`` (uint8, codes packed at each channel's bit
  width, :mod:`cetopt.quant.packing`), ``N.weight_scale`` (float32 per channel, or float16 per
  group of input columns, shape ``(channels, groups)``, when the layer's table entry has a
  ``group_size``) and ``N.weight_bits`` (uint8 per channel);
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
import itertools
import json
import math
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
from cetopt._modes import in_eval_mode
from cetopt.errors import CetoptError, ModelFileError
from cetopt.graph.decisions import decision_from_dict
from cetopt.graph.rewriter import _SOURCE, history, rewrite
from cetopt.graph.rules.quantize import skeleton_quantization
from cetopt.nn.quantized import QuantizedMixin
from cetopt.quant.packing import pack_codes, packed_size, unpack_codes
from cetopt.quant.quantizer import num_groups

__all__ = ["SavedModel", "load", "mark_source", "save", "saved_size"]

FORMAT = "cetopt-1"
_QUANT_KEYS = ("weight_q", "weight_scale", "weight_bits")
_MIN_LIMIT = 2**24  # elements any metadata size may ask for, whatever the file holds (64 MB of float32)


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


@in_eval_mode("model")
def save(
    model: nn.Module, path: str | os.PathLike, *, source: str | None = None, activations=None
) -> SavedModel:
    """Write ``model`` to ``path`` atomically.

    Parameters
    ----------
    model : nn.Module
        Typically the result of :func:`cetopt.quantize` or :func:`cetopt.graph.rewrite`.
    path : str or PathLike
    source : str, optional
        Architecture source for :func:`load` (``"zoo:<name>"`` or ``"module:attr"``); defaults to
        the one recorded on the model (:func:`mark_source`, set by the zoo).
    activations : cetopt.deploy.ActivationRanges, optional
        Activation grids to keep in the file's metadata, best the resolved ones (the
        ``.activation_ranges`` of a ``cetopt.runtime(model, "fake-int8", ...)`` model or of
        ``export_onnx``'s result: they record each layer's reduced / full input range and the
        shared grids). :func:`load` puts them on the model as ``.activation_ranges``, where
        ``runtime`` and ``export_onnx`` find them, so load + export reproduces the same graph.
    """
    if activations is not None and not hasattr(activations, "to_dict"):
        raise TypeError(f"activations must be an ActivationRanges, got {type(activations).__name__}")
    blob, layers = _serialize(model, source, activations)
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


@in_eval_mode("model")
def saved_size(model: nn.Module, *, source: str | None = None) -> int:
    """The bytes :func:`save` would write for ``model``, measured in memory (no file is touched)."""
    return len(_serialize(model, source)[0])


def _serialize(model: nn.Module, source: str | None, activations=None) -> tuple[bytes, dict]:
    """The file's bytes, and per quantized layer its packed, scale and bit-width sizes."""
    record = history(model)
    source = source or record["source"]
    quantized = _quantized_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    owners: dict[int, str] = {}
    tied_layers: dict[str, str] = {}  # a layer sharing another's codes (a tied weight) → that layer
    for name, layer in quantized.items():
        if id(layer.weight_q) in owners:
            tied_layers[name] = owners[id(layer.weight_q)]
            continue
        owners[id(layer.weight_q)] = name
        bits = layer.weight_bits.to(torch.int64).numpy()
        packed = torch.from_numpy(pack_codes(layer.weight_q, bits))
        tensors[f"{name}.weight_packed"] = packed
        group = layer.weight_group
        # group steps are float16 values already (the quantizer rounds them): stored in 2 bytes, exactly
        scale = layer.weight_scale.detach().to(torch.float32 if group is None else torch.float16)
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        tensors[f"{name}.weight_bits"] = layer.weight_bits.to(torch.uint8).contiguous()
        layers[name] = {
            "packed": packed.numel(),
            "scale": scale.element_size() * scale.numel(),
            "bits": bits.size,
            "shape": list(layer.weight_q.shape),
            "dtype": str(layer.weight_q.dtype).removeprefix("torch."),
        }
        if group is not None:  # absent for per-channel scales, as in files written before groups
            layers[name]["group_size"] = int(group)
    skip = {f"{name}.{key}" for name in quantized for key in _QUANT_KEYS}
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}  # a tensor stored under another key (shared storage) → that key
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride()) if value.numel() else None
        if ident is not None and ident in seen:
            tied[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = value.detach().contiguous()
    metadata = {
        "format": FORMAT,
        "source": json.dumps(source),
        "history": json.dumps(record["decisions"]),
        "example_inputs": json.dumps(record["example_inputs"]),
        "quantized": json.dumps(layers),
        "tied": json.dumps({"layers": tied_layers, "tensors": tied}),
    }
    if activations is not None:
        metadata["activation_ranges"] = json.dumps(activations.to_dict())
    return st_save(tensors, metadata=metadata), layers


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _tensors(blob: bytes, path) -> dict[str, torch.Tensor]:
    """The file's tensors, read by safetensors itself (it checks the header and every offset)."""
    try:
        return st_load(blob)
    except Exception as exc:  # SafetensorError, or anything its parser raises on garbage
        raise ModelFileError(f"{path} is not a valid safetensors file: {exc}") from exc


def _metadata(blob: bytes, path) -> dict:
    size = struct.unpack("<Q", blob[:8])[0]  # safetensors has validated the header's framing
    meta = json.loads(blob[8 : 8 + size]).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not a cetopt file (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    return meta


def _field(meta: dict, key: str, path, default: str | None = None):
    text = meta.get(key, default)
    if text is None:
        raise ModelFileError(f"{path}: the metadata has no {key!r} entry")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: metadata entry {key!r} is not valid JSON ({exc})") from exc


def _shape(value, what: str, path, limit: int) -> tuple[int, ...]:
    """A shape from the metadata, checked before anything of that size is allocated."""
    ok = isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )
    if not ok or len(value) > 8:
        raise ModelFileError(f"{path}: {what} {value!r} is not a shape")
    if math.prod(value) > limit:
        raise ModelFileError(
            f"{path}: {what} {value} asks for {math.prod(value)} elements, more than the file's tensors "
            f"and architecture justify ({limit})"
        )
    return tuple(value)


def _dtype(name, what: str, path) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ModelFileError(f"{path}: {what} {name!r} is not a torch dtype")
    return dtype


def _size_limit(tensors: dict[str, torch.Tensor], base: nn.Module) -> int:
    """Most elements any size in the metadata may ask for: what the file and architecture hold."""
    in_file = sum(t.numel() * (8 if t.dtype == torch.uint8 else 1) for t in tensors.values())
    in_base = sum(t.numel() for t in base.state_dict().values())
    return max(_MIN_LIMIT, in_file, in_base)


def _example_inputs(spec, path, limit: int) -> tuple[torch.Tensor, ...] | None:
    if spec is None:
        return None
    if not isinstance(spec, list) or not all(isinstance(s, dict) for s in spec):
        raise ModelFileError(f"{path}: example_inputs {spec!r} is not a list of shapes")
    shapes = [_shape(s.get("shape"), "example input shape", path, limit) for s in spec]
    if sum(math.prod(s) for s in shapes) > limit:
        raise ModelFileError(f"{path}: the example inputs ask for more than {limit} elements")
    dtypes = [_dtype(s.get("dtype"), "example input dtype", path) for s in spec]
    return tuple(torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes))


def _decisions(records, path, limit: int) -> list:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ModelFileError(f"{path}: the history is not a list of decisions")
    out = []
    for i, record in enumerate(records):
        if record.get("type") == "Factorize":
            _check_factorize(record, f"decision {i}", path, limit)
        try:
            out.append(decision_from_dict(record))
        except Exception as exc:  # KeyError, TypeError, ValueError on a malformed record
            raise ModelFileError(
                f"{path}: decision {i} ({record.get('type')!r}) is malformed: {exc!r}"
            ) from exc
    return out


def _check_factorize(record: dict, what: str, path, limit: int) -> None:
    _shape(record.get("first_shape"), f"{what} first factor shape", path, limit)
    _shape(record.get("second_shape"), f"{what} second factor shape", path, limit)
    numel, nnz = record.get("sparse_numel"), record.get("nnz") or 0
    if numel is not None:
        _shape([numel], f"{what} sparse size", path, limit)
    if not isinstance(nnz, int) or nnz < 0 or nnz > (numel or 0):
        raise ModelFileError(f"{path}: {what} has {nnz!r} nonzeros in a sparse part of {numel!r} entries")


def _quantized_state(tensors: dict, layers, path, limit: int) -> dict[str, torch.Tensor]:
    """Unpack every quantized layer's codes, after checking its shape against its own tensors."""
    if not isinstance(layers, dict):
        raise ModelFileError(f"{path}: the quantized-layer table is not a mapping")
    state = {}
    for name, info in layers.items():
        keys = [f"{name}.weight_{k}" for k in ("bits", "packed", "scale")]
        if not isinstance(info, dict) or any(k not in tensors for k in keys):
            raise ModelFileError(f"{path}: quantized layer {name!r} lacks its tensors or description")
        shape = _shape(info.get("shape"), f"layer {name!r} weight shape", path, limit)
        dtype = _dtype(info.get("dtype"), f"layer {name!r} code dtype", path)
        bits, packed, scale = (tensors.pop(k) for k in keys)
        group = _group_size(info.get("group_size"), name, path)
        _check_codes(name, shape, bits, packed, scale, path, group)
        codes = unpack_codes(packed.numpy(), bits.to(torch.int64).numpy(), shape, dtype)
        state[f"{name}.weight_q"] = codes
        state[f"{name}.weight_scale"] = scale.to(torch.float32)
        state[f"{name}.weight_bits"] = bits.to(torch.int16)
    return state


def _group_size(value, name: str, path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelFileError(f"{path}: layer {name!r} has group size {value!r}, not a positive integer")
    return value


def _check_codes(name: str, shape, bits, packed, scale, path, group: int | None = None) -> None:
    channels = shape[0] if shape else 0
    if group is None:
        scale_shape, scale_dtype = (channels,), torch.float32
    else:
        scale_shape, scale_dtype = (channels, num_groups(math.prod(shape[1:]), group)), torch.float16
    if scale.dtype != scale_dtype:
        raise ModelFileError(f"{path}: layer {name!r} stores {scale.dtype} scales, expected {scale_dtype}")
    if not shape or bits.dtype != torch.uint8 or bits.shape != (channels,) or scale.shape != scale_shape:
        raise ModelFileError(
            f"{path}: layer {name!r}: {tuple(bits.shape)} bit widths and {tuple(scale.shape)} scales "
            f"for a weight of shape {shape}"
        )
    if (bits.numel() and int(bits.max()) > 32) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ModelFileError(f"{path}: layer {name!r} has bit widths above 32 or a malformed code stream")
    expected = packed_size(math.prod(shape[1:]), bits.to(torch.int64).numpy())
    if packed.numel() != expected:
        raise ModelFileError(
            f"{path}: layer {name!r} has {packed.numel()} bytes of codes; its shape and bits need {expected}"
        )


def _build_architecture(source: str | None, allow_import: bool) -> nn.Module:
    if source is None:
        raise CetoptError("the file records no architecture source; pass load(path, model=<architecture>)")
    if source.startswith("zoo:"):
        from cetopt.zoo import build_model

        try:
            return build_model(source.removeprefix("zoo:"))
        except CetoptError as exc:
            raise ModelFileError(f"the file names an unknown architecture: {exc}") from exc
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


def _rebuild(base: nn.Module, decisions: list, inputs, path, owned: bool = False) -> nn.Module:
    if not decisions:
        return base if owned else _copy(base)
    try:
        # The file's tensors replace every code and scale: the layers are built without quantizing.
        with skeleton_quantization():
            return rewrite(base, decisions, inputs, copy_model=not owned)
    except Exception as exc:
        raise ModelFileError(f"{path}: the recorded decisions do not fit the architecture: {exc}") from exc


@in_eval_mode("model")
def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    allow_import: bool = False,
    mode: str | None = None,
) -> nn.Module:
    """Rebuild a model written by :func:`save`; its outputs equal the saved model's exactly.

    Only safetensors and JSON are read, never a pickle. Every size the metadata asks for (example
    inputs, factor shapes, code shapes) is checked against the file's own tensors and the
    architecture before anything is allocated.

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

    Raises
    ------
    ModelFileError
        The file cannot be read, is not a cetopt safetensors file, or its contents are malformed
        or do not fit the architecture; the message says which.
    """
    try:
        rebuilt = _load(path, model, allow_import)
    except CetoptError:
        raise
    except Exception as exc:  # a malformed file must never escape as a raw parser error
        raise ModelFileError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if mode is None:
        return rebuilt
    from cetopt.deploy.runtime import runtime

    return runtime(rebuilt, mode)  # finds the saved activation ranges on the model, if any


def _load(path, model: nn.Module | None, allow_import: bool) -> nn.Module:
    blob = _read(path)
    tensors = _tensors(blob, path)
    meta = _metadata(blob, path)
    source = _field(meta, "source", path)
    if source is not None and not isinstance(source, str):
        raise ModelFileError(f"{path}: the architecture source {source!r} is not a string")
    history_records = _field(meta, "history", path)
    spec = _field(meta, "example_inputs", path, "null")
    layers = _field(meta, "quantized", path)
    tied = _field(meta, "tied", path, '{"layers": {}, "tensors": {}}')
    base = model if model is not None else _build_architecture(source, allow_import)
    limit = _size_limit(tensors, base)
    decisions = _decisions(history_records, path, limit)
    inputs = _example_inputs(spec, path, limit)
    state = _quantized_state(tensors, layers, path, limit)
    rebuilt = None
    if model is not None and decisions:
        try:
            rebuilt = _rebuild(_light_copy(model, decisions), decisions, inputs, path, owned=True)
        except ModelFileError:
            rebuilt = None  # decided below on a full copy, which reports the error if it is real
        if rebuilt is not None and any(
            t.is_meta for t in itertools.chain(rebuilt.parameters(), rebuilt.buffers())
        ):
            rebuilt = None  # a placeholder survived the decisions: copy every value
    if rebuilt is None:
        rebuilt = _rebuild(base, decisions, inputs, path, owned=model is None)
    state.update(tensors)
    _add_tied(state, tied, path)
    try:
        rebuilt.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: the tensors do not fit the architecture: {exc}") from exc
    rebuilt.eval()
    if source is not None:
        setattr(rebuilt, _SOURCE, source)
    ranges = _field(meta, "activation_ranges", path, "null")
    if ranges is not None:
        from cetopt.deploy.activations import ActivationRanges

        try:
            rebuilt.activation_ranges = ActivationRanges.from_dict(ranges)
        except Exception as exc:
            raise ModelFileError(f"{path}: the saved activation ranges are malformed ({exc})") from exc
    return rebuilt


def _add_tied(state: dict, tied, path) -> None:
    """Add the entries a tied weight shares with another key (stored once in the file)."""
    if not isinstance(tied, dict) or not all(
        isinstance(tied.get(k, {}), dict) for k in ("layers", "tensors")
    ):
        raise ModelFileError(f"{path}: the tied-weight table is malformed")
    for alias, owner in tied.get("layers", {}).items():
        for key in _QUANT_KEYS:
            if f"{owner}.{key}" not in state:
                raise ModelFileError(f"{path}: layer {alias!r} is tied to {owner!r}, which the file lacks")
            state[f"{alias}.{key}"] = state[f"{owner}.{key}"]
    for alias, owner in tied.get("tensors", {}).items():
        if owner not in state:
            raise ModelFileError(f"{path}: tensor {alias!r} is tied to {owner!r}, which the file lacks")
        state[alias] = state[owner]


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _light_copy(model: nn.Module, decisions: list) -> nn.Module:
    """A deep copy of ``model`` in which the weights that the file's :class:`Quantize` decisions
    replace are shape-only (``meta``) placeholders: their values would be copied only to be thrown
    away (the quantized layers get the file's codes). Everything else is copied as usual."""
    import copy

    from cetopt.graph.decisions import Quantize
    from cetopt.quant.handlers import quant_targets

    names = {d.layer for d in decisions if isinstance(d, Quantize)}
    targets, _ = quant_targets(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    memo: dict = {}
    for t in targets:
        p = params.get(t.key)
        if t.name in names and isinstance(p, nn.Parameter):
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), p.requires_grad)
    return copy.deepcopy(model, memo)


def file_tensor_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Byte size of every tensor stored in a safetensors file, read from its header."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
    return {k: int(np.diff(v["data_offsets"])[0]) for k, v in header.items() if k != "__metadata__"}
