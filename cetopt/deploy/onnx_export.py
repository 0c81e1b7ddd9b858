"""``export_onnx``: a QDQ ONNX graph of a quantized model that onnxruntime runs on int8 kernels.

The graph is the ``int8`` runtime mode's: BatchNorms folded, then around every quantized layer a
QuantizeLinear/DequantizeLinear pair on its input and on its output (uint8, the calibrated static
grids), its weight stored as int8 codes with per-channel scales behind a DequantizeLinear, and its
bias as int32 on the ``input scale × weight scale`` grid behind another. onnxruntime fuses each such
group into one int8 operator (QLinearConv, QLinearMatMul, ...). onnx and onnxruntime are optional
(``pip install cetopt[onnx]``); ``import cetopt`` never needs them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import warnings
from collections.abc import Iterable
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
    runtime,
)
from cetopt.errors import MissingDependencyError
from cetopt.graph.trace import as_input_tuple

__all__ = ["ExportedOnnx", "export_onnx"]


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
        The bound it is checked against: 2 output quantization steps of the widest final grid
        plus 1e-4 relative; onnxruntime and PyTorch may round a tie the other way and
        requantize the bias differently.
    activation_ranges : ActivationRanges
    """

    path: str
    quantized_layers: list
    float_layers: list
    max_abs_diff: float | None
    tolerance: float
    activation_ranges: ActivationRanges


class _QDQLayer(nn.Module):
    """Emits, when traced for ONNX, fake-quant ops that the exporter writes as Q/DQ pairs."""

    def __init__(self, layer: _CodesMixin, name: str, act_in, act_out):
        super().__init__()
        codes, scale = int8_codes(layer, name)
        self.layer = copy.deepcopy(layer)
        shape = (-1,) + (1,) * (codes.dim() - 1)
        with torch.no_grad():
            self.layer.weight.copy_(codes.float() * scale.view(shape))
        self.register_buffer("w_scale", scale)
        self.act_in, self.act_out = act_in, act_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(
            x, float(self.act_in.scale), int(self.act_in.zero_point), 0, 255
        )
        zeros = torch.zeros(self.w_scale.shape[0], dtype=torch.int32)
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
) -> ExportedOnnx:
    """Write ``model`` as a QDQ ONNX graph to ``path`` (atomically).

    Parameters
    ----------
    model : nn.Module
        A model with quantized layers; not modified.
    path : str or PathLike
    example_inputs : Tensor or tuple of Tensors
        Traced with; the batch dimension is exported as dynamic.
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

    Returns
    -------
    ExportedOnnx
    """
    onnx = _require("onnx")

    inputs = as_input_tuple(example_inputs)
    deploy = deployment_model(model).eval()
    if activations is None:
        data = list(calibration) if calibration is not None else [inputs]
        activations = calibrate_activations(deploy, data, method=method)
    quantized, floats = [], []

    def make(name: str, m: nn.Module):
        if not isinstance(m, _CodesMixin):
            return None
        if name not in activations.inputs or m.max_bits > 8:
            floats.append(name)
            return m
        quantized.append(name)
        return _QDQLayer(m, name, *_per_tensor(activations, name))

    export_model = _swap(copy.deepcopy(deploy), make).eval()
    graph = _to_onnx(export_model, inputs, opset)
    graph = _int8_initializers(graph)
    onnx.checker.check_model(graph)
    atomic_write_bytes(path, graph.SerializeToString())
    diff, tol = None, 0.0
    if check:
        diff, tol = _compare(model, path, inputs, activations, quantized)
    return ExportedOnnx(str(path), quantized, floats, diff, tol, activations)


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


def _to_onnx(model: nn.Module, inputs: tuple, opset: int):
    onnx = _require("onnx")

    names = [f"input{i}" for i in range(len(inputs))]
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
            dynamic_axes={n: {0: "batch"} for n in [*names, "output"]},
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


def _compare(model, path, inputs, activations, quantized) -> tuple[float | None, float]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = runtime(model, "fake-int8", activations=activations)
    with torch.no_grad():
        expected = reference(*inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {f"input{i}": x.numpy() for i, x in enumerate(inputs)}
    got = session.run(None, feed)[0]
    diff = float(np.abs(got - expected.numpy()).max())
    step = max((float(activations.outputs[n].scale) for n in quantized), default=0.0)
    tol = 2 * step + 1e-4 * float(expected.abs().max())
    return diff, tol


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


def export_float_onnx(model: nn.Module, path: str | os.PathLike, example_inputs, opset: int = 17) -> str:
    """The float graph of ``model`` (dequant-cached) as ONNX: the onnxruntime fp32 baseline."""
    from cetopt.deploy.runtime import dequant_cached

    graph = _to_onnx(dequant_cached(model).eval(), as_input_tuple(example_inputs), opset)
    atomic_write_bytes(path, graph.SerializeToString())
    return str(path)
