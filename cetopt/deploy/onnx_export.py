"""``export_onnx``: a QDQ ONNX graph of a quantized model that onnxruntime runs on int8 kernels.

The graph is the ``int8`` runtime mode's: BatchNorms folded, then around every quantized layer a
QuantizeLinear/DequantizeLinear pair on its input and on its output (uint8, the calibrated static
grids), its weight stored as its int8 codes with the signed per-channel scales behind a
DequantizeLinear (a Linear's as uint8 codes + 128 at zero point 128, see ``weight_format``), and its
bias as int32 on the ``input scale × weight scale`` grid behind another. onnxruntime fuses each such
group into one int8 operator (QLinearConv, QLinearMatMul, ...). With shared grids
(:mod:`cetopt.deploy.grids`, the default) consecutive layers and residual adds share their grids,
and :func:`fuse_qdq` drops the pairs and ReLUs that change no code, so onnxruntime chains its int8
operators without float ops between them. Token-id inputs get a dynamic sequence axis. onnx and
onnxruntime are optional (``pip install cetopt[onnx]``); ``import cetopt`` never needs them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cetopt._io import atomic_write_bytes
from cetopt.deploy.activations import ActivationRanges, calibrate_activations
from cetopt.deploy.grids import TensorQuant
from cetopt.deploy.runtime import (
    DeployLinear,
    _CodesMixin,
    _swap,
    deployment_model,
    int8_codes,
    resolve_ranges,
    runtime,
    saved_ranges,
    u8s8_is_exact,
)
from cetopt.errors import MissingDependencyError
from cetopt.graph.trace import as_input_tuple

__all__ = ["ExportedOnnx", "export_onnx", "fuse_qdq", "u8s8_is_exact"]

WEIGHT_FORMATS = ("auto", "u8u8", "u8s8")
# A U8U8 weight is the int8 code c stored as the uint8 c + 128 at zero point 128: onnxruntime's
# U8S8 kernels (uint8 activations × int8 weights) add pairs of products in int16 with saturation
# on x86 CPUs without VNNI (vpmaddubsw), which is not the QDQ graph's definition; its U8U8 kernels
# accumulate in int32 exactly, but ran ResNet-18 at 8 bits about 25 % slower (u8s8_is_exact).
_WEIGHT_ZERO_POINT = 128


@dataclass(frozen=True)
class ExportedOnnx:
    """What :func:`export_onnx` wrote.

    Attributes
    ----------
    path : str
    quantized_layers : list of str
        Layers exported with QDQ around weight, input and output.
    float_layers : list of str
        Quantized layers left in float (no calibrated grid, or codes wider than 8 bits).
    max_abs_diff : float or None
        Largest difference between onnxruntime's outputs and the PyTorch ``fake-int8`` model's on
        the example inputs (None when onnxruntime is not installed).
    tolerance : float
        The bound it is checked against: ``2 · step + 1e-4 · max|output| + rounding_spread``,
        ``step`` the widest output grid's. Two steps: the last requantizations may round a tie
        the other way (onnxruntime requantizes an exact int32 sum with one float32 multiplier,
        PyTorch a float32 sum) and the bias is rounded to int32 on the ``input scale × weight
        scale`` grid. ``rounding_spread``: such one-step flips in early layers move every later
        layer's input, and a deep model carries them to its output; how far it carries them on
        these inputs is measured, not assumed (below).
    activation_ranges : ActivationRanges
        The resolved grids the graph runs (each layer's input on its ``activation_range``, shared
        edges, the add quantizers): save them (``to_dict``, or ``cetopt.save(..., activations=)``)
        and a later export with them writes the same graph.
    rounding_spread : float or None
        Largest difference, on the example inputs, between ``fake-int8`` (float32 sums of the
        dequantized values) and the same definition with its integer sums exact (float64): two
        computations of one definition that differ only by float rounding. 0 on the zoo models;
        about 5 output steps on the 8-layer Llama of the latency benchmark, which onnxruntime's
        difference matched.
    """

    path: str
    quantized_layers: list
    float_layers: list
    max_abs_diff: float | None
    tolerance: float
    activation_ranges: ActivationRanges
    rounding_spread: float | None = None
    activation_range: dict | None = None
    """Layer name to ``"reduced"`` (input codes 0 … 127) or ``"full"``."""
    weight_format: dict | None = None
    """Layer name to ``"u8s8"`` or ``"u8u8"``."""


class _QDQLayer(nn.Module):
    """Emits, when traced for ONNX, fake-quant ops that the exporter writes as Q/DQ pairs."""

    def __init__(self, layer: _CodesMixin, name: str, act_in, act_out, unsigned: bool):
        super().__init__()
        self.unsigned = unsigned
        codes, scale = int8_codes(layer, name)
        self.layer = copy.deepcopy(layer)
        shape = (-1,) + (1,) * (codes.dim() - 1)
        with torch.no_grad():
            self.layer.weight.copy_(codes.float() * scale.view(shape))
        self.register_buffer("w_scale", scale)
        self.act_in, self.act_out = act_in, act_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = float(self.act_in.scale), int(self.act_in.zero_point)
        # codes 0..127 (reduced range): exported as QuantizeLinear, then a uint8 Clip to 127
        x = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, self.act_in.qmax)
        channels = self.w_scale.shape[0]
        if self.unsigned:  # U8U8: the int8 codes stored as uint8 at zero point 128
            zeros = torch.full((channels,), _WEIGHT_ZERO_POINT, dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(self.layer.weight, self.w_scale, zeros, 0, 0, 255)
        else:
            zeros = torch.zeros(channels, dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(self.layer.weight, self.w_scale, zeros, 0, -128, 127)
        if isinstance(self.layer, DeployLinear):
            y = F.linear(x, w, self.layer.bias)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.layer.dims - 1]
            m = self.layer
            y = conv(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return torch.fake_quantize_per_tensor_affine(
            y, float(self.act_out.scale), int(self.act_out.zero_point), 0, self.act_out.qmax
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs,
    *,
    activations: ActivationRanges | None = None,
    calibration: Iterable | None = None,
    method: str = "minmax",
    opset: int = 17,
    check: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    weight_format: str = "auto",
    activation_range: str = "auto",
    shared_grids: bool = True,
    fuse: bool = True,
) -> ExportedOnnx:
    """Write ``model`` as a QDQ ONNX graph to ``path`` (atomically).

    Parameters
    ----------
    model : nn.Module
        A model with quantized layers; not modified.
    path : str or PathLike
    example_inputs : Tensor or tuple of Tensors
        Traced with. The batch dimension is exported as dynamic, and so is the sequence
        dimension of token-id inputs (see ``dynamic_axes``).
    activations : ActivationRanges, optional
        Static activation grids (from :func:`cetopt.deploy.calibrate_activations` of this model).
    calibration : iterable, optional
        Batches to calibrate them on with ``method`` when ``activations`` is not given; with
        neither, the ranges saved in the model's file (``cetopt.save(..., activations=)``), else
        the example inputs are the calibration data.
    method : {"minmax", "percentile", "mse"}
    opset : int
        ONNX opset (13 or later: per-channel DequantizeLinear).
    check : bool
        Run the file in onnxruntime (when installed) and compare it with the PyTorch ``fake-int8``
        model on the example inputs.
    dynamic_axes : dict, optional
        ``torch.onnx.export``'s ``dynamic_axes`` for the inputs ``input0``, ``input1``, ... and
        ``output``. Default (:func:`default_dynamic_axes`): axis 0 of every input and the output;
        axis 1 of integer inputs of two or more dimensions (token ids) and of an output of three
        or more dimensions with that length (logits).
    weight_format : {"auto", "u8u8", "u8s8"}
        How the int8 weight codes are stored. ``"u8u8"``: as uint8 at zero point 128, so
        onnxruntime runs its uint8 × uint8 kernels, which accumulate in int32 exactly.
        ``"u8s8"``: as int8, onnxruntime's faster uint8 × int8 kernels, which on x86 CPUs without
        VNNI add pairs of products in int16 with saturation (an output can then be many steps
        off the graph's definition). ``"auto"``: U8S8 for the layers where no pair can saturate
        (:func:`u8s8_is_exact`: every channel's two largest codes sum to at most 128 in
        magnitude, which codes of up to 7 bits always do), U8U8 for the others (8-bit codes;
        U8S8 (on an AVX2 CPU) put the 8-layer Llama's logits 12 steps off and cost mnist1d-cnn 5 points of
        accuracy, its first convolution's outputs up to 82 steps off). A layer whose input is on
        the reduced range cannot saturate (``127 · 256 ≤ 32767``), so ``"auto"`` stores it U8S8.
    activation_range : {"auto", "full", "reduced"}
        The grid of each quantized layer's input, as in :func:`cetopt.runtime`: ``"auto"``
        (default) puts the input of each layer with 8-bit weights (``u8s8_is_exact`` false) on
        codes 0 … 127 (a Clip, then the uint8 QuantizeLinear), so every layer runs U8S8 exactly;
        ``"full"`` keeps 0 … 255 everywhere (then ``"auto"`` weights fall back to U8U8). Ranges
        that record a choice (resolved ranges, e.g. saved from an earlier export or ``runtime``)
        keep it under ``"auto"``.
    shared_grids : bool
        One grid per edge between quantized layers and a quantizer after each residual add of
        two quantized tensors (:mod:`cetopt.deploy.grids`), so onnxruntime chains its int8
        operators (QLinearConv, QLinearAdd, uint8 MaxPool, QLinearGlobalAveragePool, QGemm);
        False: each layer's own grids, requantized in float between layers, adds in float.
    fuse : bool
        Rewrite the QDQ graph where that provably changes no value (:func:`fuse_qdq`): drop a
        DequantizeLinear → QuantizeLinear pair on one grid, a ReLU / ReLU6 that maps every
        code of its grid to itself, a Clip to 127 of codes already clipped; move a Flatten /
        Reshape after the QuantizeLinear it feeds.

    Returns
    -------
    ExportedOnnx
    """
    onnx = _require("onnx")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")

    inputs = as_input_tuple(example_inputs)
    deploy = deployment_model(model).eval()
    if activations is None and calibration is None:
        activations = saved_ranges(model)  # saved in the model's file, if it was loaded from one
    if activations is None:
        data = list(calibration) if calibration is not None else [inputs]
        activations = calibrate_activations(deploy, data, method=method)
    quantized, floats = [], []
    ranges: dict[str, str] = {}
    formats: dict[str, str] = {}
    activations = resolve_ranges(deploy, activations, activation_range, shared_grids)

    def make(name: str, m: nn.Module):
        if isinstance(m, TensorQuant):
            grid = (
                _kernel_grid(activations.outputs[name], name, "add") if name in activations.inputs else None
            )
            return TensorQuant(grid)
        if not isinstance(m, _CodesMixin):
            return None
        if name not in activations.inputs or m.max_bits > 8:
            floats.append(name)
            return m
        quantized.append(name)
        act_in, act_out = _per_tensor(activations, name)
        reduced = act_in.reduced_range
        ranges[name] = "reduced" if reduced else "full"
        unsigned = weight_format == "u8u8" or (
            weight_format == "auto" and not reduced and not u8s8_is_exact(m, name)
        )
        formats[name] = "u8u8" if unsigned else "u8s8"
        return _QDQLayer(m, name, act_in, act_out, unsigned=unsigned)

    export_model = _swap(copy.deepcopy(deploy), make).eval()
    graph = _to_onnx(export_model, inputs, opset, dynamic_axes)
    graph = _int8_initializers(graph)
    if fuse:
        graph = fuse_qdq(graph)
    onnx.checker.check_model(graph)
    atomic_write_bytes(path, graph.SerializeToString())
    diff, tol, spread = None, 0.0, None
    if check:
        diff, tol, spread = _compare(
            model, path, inputs, activations, quantized, activation_range, shared_grids
        )
    return ExportedOnnx(str(path), quantized, floats, diff, tol, activations, spread, ranges, formats)


def _kernel_grid(grid, name: str, where: str):
    from cetopt.deploy.runtime import _kernel_grid as grid_of

    return grid_of(grid, name, where)


def _per_tensor(ranges: ActivationRanges, name: str):
    from cetopt.deploy.runtime import _kernel_grid

    return _kernel_grid(ranges.inputs[name], name, "input"), _kernel_grid(
        ranges.outputs[name], name, "output"
    )


def _require(package: str):
    """Import an optional package, or raise :class:`MissingDependencyError` naming the extra."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise MissingDependencyError(
            f"ONNX export needs the optional package {package!r}, which is not installed: "
            "pip install 'cetopt[onnx]'"
        ) from exc


def _diff_symbolic(g, x, n, dim, prepend, append):
    """``aten::diff`` for the TorchScript exporter (HF masks call it): Concat, then n × (Slice − Slice)."""
    from torch.onnx import symbolic_helper as sh

    n = sh._get_const(n, "i", "n")
    dim = sh._get_const(dim, "i", "dim")
    parts = [t for t in (prepend, x, append) if not sh._is_none(t)]
    if len(parts) > 1:
        x = g.op("Concat", *parts, axis_i=dim)
    for _ in range(n):
        later = sh._slice_helper(g, x, axes=[dim], starts=[1], ends=[2**62])
        earlier = sh._slice_helper(g, x, axes=[dim], starts=[0], ends=[-1])
        x = g.op("Sub", later, earlier)
    return x


# operators the TorchScript exporter lacks, added for the duration of one export
_EXTRA_SYMBOLICS = {"aten::diff": _diff_symbolic}


@contextlib.contextmanager
def _extra_symbolics(opset: int):
    added = []
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry

        known = lambda name: registry.is_registered_op(name, opset)  # noqa: E731
    except ImportError:  # another torch layout: register regardless
        known = lambda name: False  # noqa: E731
    try:
        for name, fn in _EXTRA_SYMBOLICS.items():
            if not known(name):
                torch.onnx.register_custom_op_symbolic(name, fn, opset)
                added.append(name)
        yield
    finally:
        for name in added:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def default_dynamic_axes(model: nn.Module, inputs: tuple) -> dict[str, dict[int, str]]:
    """The axes exported as dynamic: the batch (axis 0) of every input and of the output, and
    the sequence (axis 1) of token-id inputs (integer tensors of two or more dimensions) and of an
    output of three or more dimensions whose axis 1 has their length (an LM's logits)."""
    axes = {f"input{i}": {0: "batch"} for i in range(len(inputs))}
    lengths = set()
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and not x.is_floating_point():
            axes[f"input{i}"][1] = "sequence"
            lengths.add(x.shape[1])
    axes["output"] = {0: "batch"}
    if lengths:
        with torch.no_grad():
            out = model(*inputs)
        if isinstance(out, torch.Tensor) and out.dim() >= 3 and out.shape[1] in lengths:
            axes["output"][1] = "sequence"
    return axes


def _to_onnx(model: nn.Module, inputs: tuple, opset: int, dynamic_axes=None):
    onnx = _require("onnx")

    names = [f"input{i}" for i in range(len(inputs))]
    if dynamic_axes is None:
        dynamic_axes = default_dynamic_axes(model, inputs)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _extra_symbolics(opset):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            model,
            inputs,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=["output"],
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            do_constant_folding=True,
        )
    return _cast_bool_cumsum(onnx.load_from_string(buffer.getvalue()))


def _cast_bool_cumsum(graph):
    """torch's ``cumsum`` of a bool tensor is int64; ONNX CumSum takes no bool: insert the Cast."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [n for n in graph.graph.node if n.op_type == "CumSum"]
    if not nodes:
        return graph
    inferred = onnx.shape_inference.infer_shapes(graph)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    g = graph.graph
    for node in nodes:
        if types.get(node.input[0]) != TensorProto.BOOL:
            continue
        cast = helper.make_node(
            "Cast",
            [node.input[0]],
            [f"{node.input[0]}_int64"],
            to=TensorProto.INT64,
            name=f"{node.name}_cast",
        )
        g.node.insert(list(g.node).index(node), cast)
        node.input[0] = cast.output[0]
    return graph


def _int8_initializers(graph):
    """Fold each QuantizeLinear of a float initializer into an int8 initializer; bias to int32."""
    import onnx
    from onnx import numpy_helper

    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    consts = _constant_nodes(g)
    values = {**{k: numpy_helper.to_array(v) for k, v in inits.items()}, **consts}
    producers = {o: n for n in g.node for o in n.output}
    drop = []
    for node in list(g.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        w = values[node.input[0]].astype(np.float64)
        scale = values[node.input[1]].astype(np.float64)
        zp = values[node.input[2]] if len(node.input) > 2 else np.zeros_like(scale, dtype=np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.clip(
            np.rint(w / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape), info.min, info.max
        )
        name = node.output[0]
        g.initializer.append(numpy_helper.from_array(q.astype(zp.dtype), name))
        drop.append(node)
    for node in drop:
        g.node.remove(node)
    _bias_to_int32(g, values, producers)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return onnx.shape_inference.infer_shapes(graph)


def _constant_nodes(g) -> dict:
    from onnx import numpy_helper

    out = {}
    for n in g.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _bias_to_int32(g, values: dict, producers: dict) -> None:
    """Conv/Gemm biases behind a DequantizeLinear of int32 codes at scale ``s_x · s_w[c]``."""
    from onnx import helper, numpy_helper

    inits = {t.name for t in g.initializer}
    for node in list(g.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if (
            dq_x is None
            or dq_w is None
            or dq_x.op_type != "DequantizeLinear"
            or dq_w.op_type != "DequantizeLinear"
        ):
            continue
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            continue
        s_x = values[dq_x.input[1]].astype(np.float64)
        s_w = values[dq_w.input[1]].astype(np.float64)
        bias = values[node.input[2]].astype(np.float64)
        scale = (s_x * s_w).astype(np.float32)
        codes = np.clip(np.rint(bias / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2]
        g.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{base}_int32"),
                numpy_helper.from_array(scale, f"{base}_int32_scale"),
                numpy_helper.from_array(np.zeros_like(codes), f"{base}_int32_zero"),
            ]
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{base}_int32", f"{base}_int32_scale", f"{base}_int32_zero"],
            [f"{base}_dq"],
            axis=0,
        )
        g.node.insert(list(g.node).index(node), dq)
        node.input[2] = f"{base}_dq"


def _compare(
    model, path, inputs, activations, quantized, activation_range="auto", shared_grids=True
) -> tuple[float | None, float, float | None]:
    """onnxruntime against ``fake-int8`` on ``inputs``: (max |difference|, tolerance, spread)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, 0.0, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = runtime(
            model,
            "fake-int8",
            activations=activations,
            activation_range=activation_range,
            shared_grids=shared_grids,
        )
    with torch.no_grad():
        expected = reference(*inputs)
        exact = _swap(reference, _exact_layer)(*inputs)  # the same grids, integer sums exact
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {f"input{i}": x.numpy() for i, x in enumerate(inputs)}
    got = session.run(None, feed)[0]
    diff = float(np.abs(got - expected.numpy()).max())
    spread = float((expected - exact).abs().max())
    step = max((float(activations.outputs[n].scale) for n in quantized), default=0.0)
    tol = 2 * step + 1e-4 * float(expected.abs().max()) + spread
    return diff, tol, spread


class _ExactInt8(nn.Module):
    """A ``fake-int8`` layer computed as the integer kernels define it, without float rounding.

    The input is quantized as ``fake-int8`` does; the products of its codes with the weight codes
    are summed in float64, which holds every such int32 sum exactly; the sum times
    ``input scale · weight scale`` plus the bias is requantized in float64. ``fake-int8`` sums the
    dequantized values in float32 instead, so the two differ only by float rounding, which can
    put a value on the other side of a rounding boundary.
    """

    def __init__(self, fake: nn.Module):
        super().__init__()
        self.fake = fake

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fake
        layer, grid_in, grid_out = f.layer, f.act_in, f.act_out
        s_in = float(grid_in.scale)
        codes_in = torch.round(grid_in.fake(x).double() / s_in)  # (q − zero point), exactly
        w = layer.weight.double()
        shape = (-1,) + (1,) * (w.dim() - 1)
        w_scale = f.w_scale.double()
        codes_w = torch.round(w / w_scale.view(shape))
        if isinstance(layer, nn.Linear):
            acc = F.linear(codes_in, codes_w)
            y = acc * (s_in * w_scale)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[layer.dims - 1]
            acc = conv(codes_in, codes_w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            y = acc * (s_in * w_scale).view(-1, *([1] * (acc.dim() - 2)))
        if layer.bias is not None:
            bias = layer.bias.double()
            y = y + (bias if isinstance(layer, nn.Linear) else bias.view(-1, *([1] * (acc.dim() - 2))))
        s_out, zp = float(grid_out.scale), int(grid_out.zero_point)
        q = torch.clamp(torch.round(y / s_out) + zp, 0, grid_out.qmax)
        return ((q - zp) * s_out).to(x.dtype)


def _exact_layer(name: str, m: nn.Module) -> nn.Module | None:
    from cetopt.deploy.runtime import FakeInt8

    if not isinstance(m, FakeInt8) or m.act_in is None:
        return None
    if m.act_in.per_channel or m.act_out.per_channel:
        return None  # the export quantizes per tensor; this reference is for per-tensor grids
    m.w_scale = int8_codes(m.layer, name)[1]
    return _ExactInt8(m)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session on ``path`` (all graph optimisations on)."""
    ort = _require("onnxruntime")

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle threads must not spin: timed next to PyTorch, spinning would steal its cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_float_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs,
    opset: int = 17,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> str:
    """The float graph of ``model`` (dequant-cached) as ONNX: the onnxruntime fp32 baseline.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    path : str or PathLike
    example_inputs : Tensor or tuple of Tensors
    opset : int
    dynamic_axes : dict, optional
        As in :func:`export_onnx`.

    Returns
    -------
    str
        ``path``.
    """
    from cetopt.deploy.runtime import dequant_cached

    graph = _to_onnx(dequant_cached(model).eval(), as_input_tuple(example_inputs), opset, dynamic_axes)
    atomic_write_bytes(path, graph.SerializeToString())
    return str(path)


_SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


def fuse_qdq(graph):
    """Rewrite a QDQ graph where that provably changes no value, so onnxruntime fuses more of it.

    Each rule is checked on every code of the grid involved (float32, as onnxruntime computes):

    * ``DequantizeLinear(g) → QuantizeLinear(g)`` (one per-tensor grid ``g``): ``Q(DQ(c)) = c``
      for every code, so the pair goes and the codes flow on;
    * a ``Relu`` or ``Clip`` right after ``DequantizeLinear(g)`` that returns every value of the
      grid unchanged (a ReLU after zero point 0), or whose only reader is ``QuantizeLinear(g)``
      and ``Q(op(DQ(c))) = c`` for every code (a ReLU6 whose grid tops out at 6): it goes;
    * a ``Clip`` to 127 of uint8 codes that are already at most 127 (a max-pool of clipped codes
      on one grid): it goes;
    * ``Flatten`` / ``Reshape`` / ``Squeeze`` / ``Unsqueeze`` feeding only a per-tensor
      ``QuantizeLinear``: the quantization moves before it (elementwise; the shape op then
      moves uint8 codes), so ``DequantizeLinear → GlobalAveragePool → QuantizeLinear`` can fuse.

    Parameters
    ----------
    graph : onnx.ModelProto
        Changed in place.

    Returns
    -------
    onnx.ModelProto
    """
    import onnx
    from onnx import numpy_helper

    g = graph.graph
    while True:
        values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        values.update(_constant_nodes(g))
        if not _fuse_once(g, values, numpy_helper):
            break
    while True:  # the Constant nodes (scales, zero points, bounds) of the nodes that went
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    _topological_sort(g)
    del g.value_info[:]  # tensors changed type (codes now flow where floats did): infer again
    return onnx.shape_inference.infer_shapes(graph)


def _topological_sort(g) -> None:
    """Reorder ``g.node`` so every node comes after the producers of its inputs (stable)."""
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = [copy.deepcopy(n) for n in g.node]
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"fuse_qdq left a cycle at {rest[0].name!r}")  # a bug, not bad input
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def _grid_of(node, values):
    """(scale, zero point) of a per-tensor Q/DQ node as numpy scalars, or None."""
    if len(node.input) < 3 or node.input[1] not in values or node.input[2] not in values:
        return None
    scale, zp = values[node.input[1]], values[node.input[2]]
    if scale.ndim or zp.ndim or zp.dtype not in (np.uint8, np.int8):
        return None
    if any(a.name == "axis" for a in node.attribute) and scale.ndim:
        return None
    return np.float32(scale), zp


def _same_grid(a, b) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1] == b[1] and a[1].dtype == b[1].dtype


def _codes(grid, top: int | None = None) -> np.ndarray:
    info = np.iinfo(grid[1].dtype)
    return np.arange(info.min, (info.max if top is None else top) + 1, dtype=np.int64)


def _dq(grid, codes):
    return ((codes - int(grid[1])).astype(np.float32) * grid[0]).astype(np.float32)


def _q(grid, x):
    info = np.iinfo(grid[1].dtype)
    return np.clip(np.rint(x / grid[0]) + int(grid[1]), info.min, info.max).astype(np.int64)


def _unary(node, values, x):
    """``node`` (Relu or Clip with constant bounds) applied to ``x``, or None."""
    if node.op_type == "Relu":
        return np.maximum(x, np.float32(0))
    if node.op_type == "Clip":
        bounds = [node.input[i] if len(node.input) > i else "" for i in (1, 2)]
        if any(b and b not in values for b in bounds):
            return None
        lo = values[bounds[0]] if bounds[0] else -np.inf
        hi = values[bounds[1]] if bounds[1] else np.inf
        return np.clip(x, np.float32(lo), np.float32(hi)).astype(np.float32)
    return None


def _clip_top(node, values) -> int | None:
    """127 (or another top) for a uint8 ``Clip(x, none/0, top)``, else None."""
    if node.op_type != "Clip" or len(node.input) < 3 or node.input[2] not in values:
        return None
    if node.input[1] and (node.input[1] not in values or int(values[node.input[1]]) != 0):
        return None
    top = values[node.input[2]]
    return int(top) if top.dtype == np.uint8 else None


def _fuse_once(g, values, numpy_helper) -> bool:
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def rewire(old: str, new: str) -> None:
        for n in g.node:
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new

    def top_of(name: str) -> int | None:
        """The largest code a uint8 tensor can hold when a Clip bounds it (through max-pools)."""
        node = producers.get(name)
        while node is not None and node.op_type in ("MaxPool", *_SHAPE_OPS):
            node = producers.get(node.input[0])
        return _clip_top(node, values) if node is not None else None

    for node in g.node:
        # DQ(g) → Q(g)
        if node.op_type == "QuantizeLinear" and node.output[0] not in outputs:
            dq = producers.get(node.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear":
                grid = _grid_of(node, values)
                if _same_grid(grid, _grid_of(dq, values)):
                    codes = _codes(grid)
                    if np.array_equal(_q(grid, _dq(grid, codes)), codes):
                        rewire(node.output[0], dq.input[0])
                        g.node.remove(node)
                        if len(consumers.get(dq.output[0], [])) == 1 and dq.output[0] not in outputs:
                            g.node.remove(dq)
                        return True
        # DQ(g) → Relu / Clip that changes no code
        if node.op_type in ("Relu", "Clip") and node.output[0] not in outputs:
            dq = producers.get(node.input[0])
            grid = _grid_of(dq, values) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if grid is not None:
                codes = _codes(grid, top_of(dq.input[0]))
                x = _dq(grid, codes)
                y = _unary(node, values, x)
                readers = consumers.get(node.output[0], [])
                identity = y is not None and np.array_equal(y, x)
                requantized = (
                    y is not None
                    and len(readers) == 1
                    and readers[0].op_type == "QuantizeLinear"
                    and _same_grid(_grid_of(readers[0], values), grid)
                    and np.array_equal(_q(grid, y), codes)
                )
                if identity or requantized:
                    rewire(node.output[0], node.input[0])
                    g.node.remove(node)
                    return True
        # Clip to 127 of codes at most 127
        top = _clip_top(node, values)
        if top is not None and node.output[0] not in outputs and (top_of(node.input[0]) or 10**9) <= top:
            rewire(node.output[0], node.input[0])
            g.node.remove(node)
            return True
        if top is not None and node.output[0] not in outputs:
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                src = producers.get(q.input[0])
                while src is not None and src.op_type in ("MaxPool", *_SHAPE_OPS):
                    src = producers.get(src.input[0])
                if (
                    src is not None
                    and src.op_type == "DequantizeLinear"
                    and _same_grid(_grid_of(src, values), _grid_of(q, values))
                    and (top_of(src.input[0]) or 10**9) <= top
                ):
                    rewire(node.output[0], node.input[0])
                    g.node.remove(node)
                    return True
        # X on grid g read by Q(g) → DQ(g) and by others: the others read DQ(g) (= X), so that
        # onnxruntime can run the op making X on the codes (its output has one reader, the Q)
        if node.op_type == "QuantizeLinear" and len(consumers.get(node.input[0], [])) > 1:
            grid = _grid_of(node, values)
            src = producers.get(node.input[0])
            while src is not None and src.op_type in ("MaxPool", "Relu", *_SHAPE_OPS):
                src = producers.get(src.input[0])
            if (
                src is not None
                and src.op_type == "DequantizeLinear"
                and _same_grid(grid, _grid_of(src, values))
            ):
                top = top_of(src.input[0])
                codes = _codes(grid, top)
                after = consumers.get(node.output[0], [])
                clip = after[0] if len(after) == 1 and _clip_top(after[0], values) is not None else None
                if clip is not None and (top is None or _clip_top(clip, values) < top):
                    clip = None  # the Clip would change codes X holds: not the same values
                dq_of = consumers.get((clip or node).output[0], [])
                dq = next(
                    (
                        d
                        for d in dq_of
                        if d.op_type == "DequantizeLinear" and _same_grid(grid, _grid_of(d, values))
                    ),
                    None,
                )
                if (
                    (clip is not None or len(after) >= 1)
                    and dq is not None
                    and np.array_equal(_q(grid, _dq(grid, codes)), codes)
                ):
                    others = [c for c in consumers[node.input[0]] if c is not node]
                    x = node.input[0]
                    for c in others:
                        for k, i in enumerate(c.input):
                            if i == x:
                                c.input[k] = dq.output[0]
                    if others:
                        return True
        # shape op → Q (per tensor): quantize first
        if node.op_type == "QuantizeLinear" and _grid_of(node, values) is not None:
            shape = producers.get(node.input[0])
            if (
                shape is not None
                and shape.op_type in _SHAPE_OPS
                and len(consumers.get(shape.output[0], [])) == 1
                and shape.output[0] not in outputs
            ):
                q_out, shape_out = node.output[0], shape.output[0]
                node.input[0] = shape.input[0]
                node.output[0] = shape_out  # now the codes before the shape op
                shape.input[0] = shape_out
                shape.output[0] = q_out
                nodes = [copy.deepcopy(n) for n in g.node]
                i, j = list(g.node).index(shape), list(g.node).index(node)
                nodes.insert(j + 1, nodes.pop(i))  # the shape op right after the Q, which stays
                del g.node[:]
                g.node.extend(nodes)
                return True
    return False
