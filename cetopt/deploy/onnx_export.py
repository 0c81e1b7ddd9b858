"""``export_onnx``: a QDQ ONNX graph of a quantized model that onnxruntime runs on int8 kernels.

The graph is the ``int8`` runtime mode's: BatchNorms folded, then around every quantized layer a
QuantizeLinear/DequantizeLinear pair on its input and on its output (uint8, the calibrated static
grids), its weight stored as its int8 codes with the signed per-channel scales behind a
DequantizeLinear (a Linear's as uint8 codes + 128 at zero point 128, see ``weight_format``), and its
bias as int32 on the ``input scale × weight scale`` grid behind another. onnxruntime fuses each such
group into one int8 operator (QLinearConv, QLinearMatMul, ...). Token-id inputs get a dynamic
sequence axis. onnx and onnxruntime are optional (``pip install cetopt[onnx]``); ``import cetopt``
never needs them.
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
from cetopt.deploy.runtime import (
    DeployLinear,
    _CodesMixin,
    _swap,
    deployment_model,
    int8_codes,
    needs_reduced_range,
    runtime,
    u8s8_is_exact,
)
from cetopt.errors import MissingDependencyError
from cetopt.graph.trace import as_input_tuple

__all__ = ["ExportedOnnx", "export_onnx", "u8s8_is_exact"]

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
        The calibrated grids (each layer's input then runs on its ``activation_range``).
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
        if self.act_in.reduced_range:  # codes 0..127 on a uint8 QuantizeLinear: a Clip before it
            x = torch.clamp(x, max=(self.act_in.qmax - zp) * scale)
        x = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
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
            y, float(self.act_out.scale), int(self.act_out.zero_point), 0, 255
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
        neither, the example inputs are the calibration data.
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
        U8S8 put the 8-layer Llama's logits 12 steps off and cost mnist1d-cnn 5 points of
        accuracy, its first convolution's outputs up to 82 steps off). A layer whose input is on
        the reduced range cannot saturate (``127 · 256 ≤ 32767``), so ``"auto"`` stores it U8S8.
    activation_range : {"auto", "full", "reduced"}
        The grid of each quantized layer's input, as in :func:`cetopt.runtime`: ``"auto"``
        (default) puts the input of each layer with 8-bit weights (``u8s8_is_exact`` false) on
        codes 0 … 127 (a Clip, then the uint8 QuantizeLinear), so every layer runs U8S8 exactly;
        ``"full"`` keeps 0 … 255 everywhere (then ``"auto"`` weights fall back to U8U8).

    Returns
    -------
    ExportedOnnx
    """
    onnx = _require("onnx")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")

    inputs = as_input_tuple(example_inputs)
    deploy = deployment_model(model).eval()
    if activations is None:
        data = list(calibration) if calibration is not None else [inputs]
        activations = calibrate_activations(deploy, data, method=method)
    quantized, floats = [], []
    ranges: dict[str, str] = {}
    formats: dict[str, str] = {}
    if activation_range not in ("auto", "full", "reduced"):
        raise ValueError(
            f"activation_range must be one of ('auto', 'full', 'reduced'), got {activation_range!r}"
        )

    def make(name: str, m: nn.Module):
        if not isinstance(m, _CodesMixin):
            return None
        if name not in activations.inputs or m.max_bits > 8:
            floats.append(name)
            return m
        quantized.append(name)
        reduced = needs_reduced_range(m, name, activation_range)
        ranges[name] = "reduced" if reduced else "full"
        unsigned = weight_format == "u8u8" or (
            weight_format == "auto" and not reduced and not u8s8_is_exact(m, name)
        )
        formats[name] = "u8u8" if unsigned else "u8s8"
        act_in, act_out = _per_tensor(activations, name)
        return _QDQLayer(m, name, act_in.with_range(reduced), act_out, unsigned=unsigned)

    export_model = _swap(copy.deepcopy(deploy), make).eval()
    graph = _to_onnx(export_model, inputs, opset, dynamic_axes)
    graph = _int8_initializers(graph)
    onnx.checker.check_model(graph)
    atomic_write_bytes(path, graph.SerializeToString())
    diff, tol, spread = None, 0.0, None
    if check:
        diff, tol, spread = _compare(model, path, inputs, activations, quantized, activation_range)
    return ExportedOnnx(str(path), quantized, floats, diff, tol, activations, spread, ranges, formats)


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
    model, path, inputs, activations, quantized, activation_range="auto"
) -> tuple[float | None, float, float | None]:
    """onnxruntime against ``fake-int8`` on ``inputs``: (max |difference|, tolerance, spread)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, 0.0, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = runtime(model, "fake-int8", activations=activations, activation_range=activation_range)
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
