"""Execution modes for quantized models: ``cetopt.runtime(model, mode=...)`` returns a new model.

Modes (the input model and any file it came from are never changed):

``"reference"``
    A copy: every quantized layer dequantizes its codes on each call.
``"dequant-cached"``
    Each quantized layer becomes a float ``nn.Linear`` / ``nn.ConvNd`` holding its dequantized
    weight (computed once): the same outputs, the float model's speed.
``"int8"``
    int8 weights and int8 activations on torch's quantized CPU kernels (``torch.ops.quantized``,
    the x86/fbgemm engine). BatchNorms after a convolution are folded into it first (the codes stay,
    the per-channel scales absorb the BatchNorm). With calibrated :class:`ActivationRanges` the
    activations are static: each layer quantizes its input on the calibrated grid and its output
    on another (``quantized::conv2d`` / ``quantized::linear``, output dequantized to float);
    without, Linear layers are dynamic: the input grid is chosen per call from the input's own
    range and the output stays float (``quantized::linear_dynamic``); convolutions then stay float
    with a warning (torch's ``quantized::conv2d_dynamic`` gave wrong outputs on torch 2.13).
    Activation range: torch's uint8 × int8 kernels (fbgemm, like onnxruntime's on x86 CPUs without
    VNNI) add pairs of products in a saturating int16, which 8-bit weights with full-range uint8
    inputs can overflow (``255 · 2 · 128 > 32767``). So the input of each layer whose weights
    could (:func:`u8s8_is_exact` false) is quantized on a reduced grid, codes 0 … 127
    (``activation_range="reduced"``, torch's ``reduce_range``): ``127 · 2 · 128 ≤ 32767``, no
    sum saturates, and the kernels are exact to the definition. ``fake-int8`` and the ONNX export
    use the same grids; every other layer keeps the full 8-bit grid.
``"fake-int8"``
    The ``int8`` mode's definition simulated in float (fake-quant): the reference the int8 kernels
    are checked against, and the way to measure accuracy with activations quantized, also per
    channel or at 4 bits, which no CPU kernel runs.
``"weight-only"``
    Low-bit weights, float activations: Linear layers of at most 4 bits run
    ``aten._weight_int4pack_mm_for_cpu``, up to 8 bits ``aten._weight_int8pack_mm``, their input
    as bfloat16 (the kernels' fast path; their float32 path is scalar) and the per-channel
    scales applied in float32 after them: outputs within about 1 % of the reference. Layers
    without such a kernel (convolutions, wider codes, shapes the int4 kernel rejects) fall back to
    the nearest width that has one, or to float, with a :class:`KernelFallbackWarning` naming them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from cetopt.deploy.activations import (
    ActivationQuant,
    ActivationRanges,
    calibrate_activations,
    fake_quantize_dynamic,
)
from cetopt.nn.quantized import QuantizedConv, QuantizedLinear, QuantizedMixin
from cetopt.quant.quantizer import expand_groups

__all__ = [
    "MODES",
    "DeployConv1d",
    "DeployConv2d",
    "DeployConv3d",
    "DeployLinear",
    "KernelFallbackWarning",
    "deployment_model",
    "is_deploy_layer",
    "runtime",
    "u8s8_is_exact",
]

ACTIVATION_RANGES = ("auto", "full", "reduced")

MODES = ("reference", "dequant-cached", "int8", "fake-int8", "weight-only")
_INT4_GROUP = 32  # group size passed to the int4 kernel (every group of a row shares its scale)
_INT8_K_MULTIPLE = 16  # aten._weight_int8pack_mm's bfloat16 path needs in_features % 16 == 0


class KernelFallbackWarning(UserWarning):
    """A layer has no kernel for the requested mode and runs at another width (or in float)."""


class _CodesMixin:
    """The integer codes a float deployment layer was dequantized from (``weight = scale · codes``)."""

    def _keep_codes(self, source: QuantizedMixin) -> None:
        self.register_buffer("codes", source.weight_q.clone())
        self.register_buffer("code_scale", source.weight_scale.detach().clone().float())
        self.register_buffer("code_bits", source.weight_bits.clone())
        self.code_group = source.weight_group

    @property
    def max_bits(self) -> int:
        return int(self.code_bits.max()) if self.code_bits.numel() else 0

    def refresh_scale(self) -> None:
        """Re-derive the per-channel scales from ``weight`` (after a BatchNorm was folded in)."""
        w = self.weight.detach().double().reshape(self.codes.shape[0], -1)
        q = self.codes.double().reshape(self.codes.shape[0], -1)
        if self.code_scale.dim() > 1:  # group-wise: a fold scales each channel's groups alike
            q = q * expand_groups(self.code_scale.double(), q.shape[1], self.code_group)
            norm = (q * q).sum(dim=1)
            ratio = torch.where(norm > 0, (w * q).sum(dim=1) / torch.where(norm > 0, norm, 1.0), 1.0)
            self.code_scale = (self.code_scale.double() * ratio[:, None]).float()
            return
        norm = (q * q).sum(dim=1)
        scale = (w * q).sum(dim=1) / torch.where(norm > 0, norm, torch.ones_like(norm))
        self.code_scale = torch.where(norm > 0, scale, self.code_scale.double()).float()


class DeployLinear(_CodesMixin, nn.Linear):
    """A float Linear with its weight dequantized once, remembering the codes."""

    @classmethod
    def from_quantized(cls, layer: QuantizedLinear) -> DeployLinear:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        return _fill(new, layer)


class DeployConv1d(_CodesMixin, nn.Conv1d):
    """A float Conv1d with its weight dequantized once, remembering the codes."""

    dims = 1


class DeployConv2d(_CodesMixin, nn.Conv2d):
    """A float Conv2d with its weight dequantized once, remembering the codes."""

    dims = 2


class DeployConv3d(_CodesMixin, nn.Conv3d):
    """A float Conv3d with its weight dequantized once, remembering the codes."""

    dims = 3


DeployConv = (DeployConv1d, DeployConv2d, DeployConv3d)


def deploy_conv(layer: QuantizedConv) -> nn.Module:
    """The float deployment copy of a quantized convolution."""
    dims = layer.dims
    new = DeployConv[dims - 1](
        layer.in_channels,
        layer.out_channels,
        _tuple(layer.kernel_size, dims),
        _tuple(layer.stride, dims),
        layer.padding if isinstance(layer.padding, str) else _tuple(layer.padding, dims),
        _tuple(layer.dilation, dims),
        layer.groups,
        layer.bias is not None,
    )
    return _fill(new, layer)


def _tuple(v, dims: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _fill(new: nn.Module, layer: QuantizedMixin) -> nn.Module:
    with torch.no_grad():
        new.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone().float(), requires_grad=False)
    new._keep_codes(layer)
    return new.train(layer.training)


def is_deploy_layer(m: nn.Module) -> bool:
    """True for the layers the deployment modes quantize (quantized layers and their float copies)."""
    return isinstance(m, (QuantizedMixin, _CodesMixin))


def _swap(model: nn.Module, make) -> nn.Module:
    """Replace, in place, every child ``m`` for which ``make(name, m)`` returns a module."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = make(name, child)
            if new is not None:
                setattr(parent, child_name, new)
    return model


def _to_deploy(name: str, m: nn.Module) -> nn.Module | None:
    if isinstance(m, QuantizedLinear):
        return DeployLinear.from_quantized(m)
    if isinstance(m, QuantizedConv):
        return deploy_conv(m)
    return None


def dequant_cached(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers hold their dequantized weights."""
    return _swap(copy.deepcopy(model), _to_deploy)


def deployment_model(model: nn.Module) -> nn.Module:
    """The float graph the int8 modes and the ONNX export quantize: dequant-cached, BatchNorm folded.

    BatchNorms (eval statistics) that directly follow a quantized layer whose output feeds nothing
    else are folded into it when torch.fx can trace the model; the codes stay and the per-channel
    scales absorb the BatchNorm. Otherwise the BatchNorms stay as they are. A traced model also
    gets a :class:`cetopt.deploy.grids.TensorQuant` (identity until calibrated) after every
    residual add of two quantized tensors.
    """
    from cetopt.deploy.grids import TensorQuant, insert_tensor_quantizers
    from cetopt.graph.rules.fold_batchnorm import fold_batchnorm
    from cetopt.graph.trace import symbolic_trace

    cached = dequant_cached(model)
    try:
        gm = symbolic_trace(cached, leaf_types=(DeployLinear, *DeployConv, TensorQuant))
    except Exception:  # untraceable (data-dependent control flow, ...): keep the BatchNorms
        return cached
    modules = dict(gm.named_modules())
    folded = False
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if node.args else None
        if (
            isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.running_mean is not None
            and getattr(src, "op", None) == "call_module"
            and isinstance(modules[src.target], _CodesMixin)
            and len(src.users) == 1
        ):
            layer = fold_batchnorm(modules[src.target], bn)  # one shared fold rule with the rewriter
            layer.refresh_scale()
            _set_module(gm, src.target, layer)
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            folded = True
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    insert_tensor_quantizers(gm)  # identity until calibrated (cetopt.deploy.grids)
    return gm  # traced: resolve_grids shares grids along its edges


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def int8_codes(layer: _CodesMixin, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's codes as int8 and its per-channel scales, exactly as stored.

    A scale may be negative: the quantizer mirrors a channel's grid when that fits it better, so
    the code −128 at a negative scale stands for the weight ``+128 · |scale|``. Flipping such a
    channel to a positive scale would need the code +128, which int8 cannot hold, so the signed
    scales go to the kernels as they are (``quantized::linear`` / ``conv*d`` and onnxruntime's
    QLinear kernels compute ``scale · code`` exactly for either sign; the tests check both). A zero
    scale (an all-zero channel) becomes 1 with zero codes.

    Parameters
    ----------
    layer : deployment layer
        A layer of :func:`deployment_model` (it keeps its codes).
    name : str
        Its name (unused; kept for the callers' error messages).

    Returns
    -------
    codes : Tensor of int8
    scale : Tensor of float32, one per output channel
    """
    q = layer.codes.to(torch.int32)
    scale = layer.code_scale.clone()
    zero = scale == 0
    q[zero] = 0  # a zero scale means zero weights; any nonzero scale represents them
    scale = torch.where(zero, torch.ones_like(scale), scale)
    return q.clamp(-128, 127).to(torch.int8), scale


def u8s8_is_exact(layer: _CodesMixin, name: str = "") -> bool:
    """True when uint8 × int8 kernels with int16 pair sums cannot saturate on this layer.

    Such kernels (``vpmaddubsw``: fbgemm, onnxruntime's MLAS on x86 without VNNI) add two
    products ``x_a·w_a + x_b·w_b`` of uint8 activations ``x ≤ 255`` and int8 codes ``w`` in a
    saturating int16. Whichever two codes of a channel are paired, the sum is at most
    ``255 · (|w|₁ + |w|₂)`` with ``|w|₁, |w|₂`` the channel's two largest code magnitudes, so
    ``|w|₁ + |w|₂ ≤ 128`` (``255 · 128 = 32640 ≤ 32767``) makes the kernel exact. With the
    input on the reduced range (``x ≤ 127``) every layer is: ``127 · 256 = 32512``.

    Parameters
    ----------
    layer : deployment layer
    name : str

    Returns
    -------
    bool
    """
    codes, _ = int8_codes(layer, name)
    flat = codes.to(torch.int32).abs().reshape(codes.shape[0], -1)
    if flat.shape[1] < 2:
        return int(flat.max()) <= 128 if flat.numel() else True
    top = flat.topk(2, dim=1).values.sum(dim=1)
    return bool((top <= 128).all())


def needs_reduced_range(layer: _CodesMixin, name: str, activation_range: str) -> bool:
    """Whether ``layer``'s input goes on the reduced grid under ``activation_range``."""
    if activation_range not in ACTIVATION_RANGES:
        raise ValueError(f"activation_range must be one of {ACTIVATION_RANGES}, got {activation_range!r}")
    if activation_range == "auto":
        return not u8s8_is_exact(layer, name)
    return activation_range == "reduced"


def saved_ranges(model: nn.Module) -> ActivationRanges | None:
    """The activation ranges :func:`cetopt.load` found in the file (``model.activation_ranges``)."""
    ranges = getattr(model, "activation_ranges", None)
    return ranges if isinstance(ranges, ActivationRanges) else None


def resolve_ranges(
    deploy: nn.Module, ranges: ActivationRanges, activation_range: str = "auto", shared_grids: bool = True
) -> ActivationRanges:
    """The grids the ``int8`` modes and the ONNX export run on ``deploy`` (resolved ranges).

    Each quantized layer's input goes on the reduced or the full range (``activation_range``; under
    ``"auto"`` a choice ``ranges`` already records is kept), then edges share grids
    (:func:`cetopt.deploy.grids.resolve_grids`). Resolving resolved ranges again returns the same.

    Parameters
    ----------
    deploy : nn.Module
        :func:`deployment_model` of the model.
    ranges : ActivationRanges
    activation_range : {"auto", "full", "reduced"}
    shared_grids : bool

    Returns
    -------
    ActivationRanges
    """
    from cetopt.deploy.grids import resolve_grids

    if activation_range not in ACTIVATION_RANGES:
        raise ValueError(f"activation_range must be one of {ACTIVATION_RANGES}, got {activation_range!r}")
    reduced = {}
    for name, m in deploy.named_modules():
        if not isinstance(m, _CodesMixin) or name not in ranges.inputs:
            continue
        recorded = ranges.activation_range.get(name)
        if activation_range == "auto" and recorded is not None:
            reduced[name] = recorded == "reduced"
        else:
            reduced[name] = needs_reduced_range(m, name, activation_range)
    return resolve_grids(deploy, ranges, reduced, shared_grids)


class _Int8Base(nn.Module):
    """Shared state of the int8 layers: packed weights, the activation grids, the float fallback."""

    def __init__(self, layer: _CodesMixin, name: str, act_in, act_out, reduced_range: bool = False):
        super().__init__()
        self.name = name
        self.reduced_range = reduced_range  # dynamic: linear_dynamic's reduce_range
        codes, scale = int8_codes(layer, name)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), False)
        self.act_in = _kernel_grid(act_in, name, "input")
        self.act_out = _kernel_grid(act_out, name, "output") if self.act_in is not None else None

    def int8_weight(self) -> torch.Tensor:
        zero = torch.zeros(self.weight_scale.shape[0], dtype=torch.int64)
        return torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale.double(), zero, 0)

    def dequantized_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight_int8.dim() - 1)
        return self.weight_int8.float() * self.weight_scale.view(shape)

    @property
    def static(self) -> bool:
        return self.act_in is not None

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = float(self.act_in.scale), int(self.act_in.zero_point)
        x = x.float()
        if self.act_in.reduced_range:  # quint8 holds 0..255: clamp to the grid's top code first
            x = torch.clamp(x, max=(self.act_in.qmax - zp) * scale)
        return torch.quantize_per_tensor(x, scale, zp, torch.quint8)


def _kernel_grid(grid: ActivationQuant | None, name: str, where: str) -> ActivationQuant | None:
    """The per-tensor 8-bit grid a kernel can run, nearest to ``grid``."""
    if grid is None or (grid.bits == 8 and not grid.per_channel):
        return grid
    warnings.warn(
        f"layer {name!r}: the int8 kernels take one 8-bit {where} scale per tensor; the "
        f"{grid.bits}-bit {'per-channel ' if grid.per_channel else ''}range runs as 8 bits per tensor",
        KernelFallbackWarning,
        stacklevel=4,
    )
    return ActivationQuant.from_range(grid.lo.min(), grid.hi.max(), 8, None, grid.reduced_range)


class Int8Linear(_Int8Base):
    """Linear on ``quantized::linear`` (static) or ``quantized::linear_dynamic`` (dynamic)."""

    def __init__(self, layer: DeployLinear, name: str, act_in=None, act_out=None, reduced_range=False):
        super().__init__(layer, name, act_in, act_out, reduced_range)
        self._packed = torch.ops.quantized.linear_prepack(self.int8_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static:
            return torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduced_range)
        y = torch.ops.quantized.linear(
            self._quantize_input(x), self._packed, float(self.act_out.scale), int(self.act_out.zero_point)
        )
        return y.dequantize()


class Int8Conv(_Int8Base):
    """Conv1d/2d/3d on ``quantized::convNd``: static input and output grids."""

    def __init__(
        self, layer: nn.modules.conv._ConvNd, name: str, act_in=None, act_out=None, reduced_range=False
    ):
        super().__init__(layer, name, act_in, act_out, reduced_range)
        self.dims = layer.dims
        ops = torch.ops.quantized
        prepack = (ops.conv1d_prepack, ops.conv2d_prepack, ops.conv3d_prepack)[self.dims - 1]
        self._static_op = (ops.conv1d, ops.conv2d, ops.conv3d)[self.dims - 1]
        self._packed = prepack(
            self.int8_weight(),
            self.bias,
            list(layer.stride),
            list(layer.padding),
            list(layer.dilation),
            layer.groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._static_op(
            self._quantize_input(x), self._packed, float(self.act_out.scale), int(self.act_out.zero_point)
        )
        return y.dequantize()


class FakeInt8(nn.Module):
    """The int8 layers' definition in float: fake-quant input, float layer, fake-quant output."""

    def __init__(self, layer: _CodesMixin, name: str, act_in=None, act_out=None, reduced_range=False):
        super().__init__()
        self.reduced_range = reduced_range  # dynamic inputs: 0..127
        self.layer = copy.deepcopy(layer)
        codes, scale = int8_codes(layer, name)
        with torch.no_grad():
            shape = (-1,) + (1,) * (codes.dim() - 1)
            self.layer.weight.copy_(codes.float() * scale.view(shape))
        self.act_in, self.act_out = act_in, act_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_in is None:
            return self.layer(fake_quantize_dynamic(x, self.reduced_range))
        return self.act_out.fake(self.layer(self.act_in.fake(x)))


class _WeightOnlyBase(nn.Module):
    """Shared by the weight-only layers: bfloat16 activations into the kernel, float32 around it.

    torch's CPU kernels for packed low-bit weights have a vectorised bfloat16 path and a scalar
    float32 one (30-50× slower than float32 ``F.linear`` here), so the input goes in as bfloat16.
    The kernel gets unit scales (exact in bfloat16) and its output is scaled per channel in
    float32, so the scales are not rounded to bfloat16; what differs from the reference is the
    input's and the raw output's bfloat16 rounding (about 2⁻⁹ relative).
    """

    def __init__(self, layer: DeployLinear):
        super().__init__()
        self.register_buffer("scale", layer.code_scale.detach().clone().float())
        self.bias = layer.bias

    def _finish(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        y = (y.float() * self.scale).reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int8WeightLinear(_WeightOnlyBase):
    """Linear on ``aten._weight_int8pack_mm``: int8 weights, bfloat16 activations into the kernel."""

    def __init__(self, layer: DeployLinear, name: str):
        super().__init__(layer)
        self.register_buffer("weight_int8", layer.codes.to(torch.int8).contiguous().clone())
        self.register_buffer("unit", torch.ones(self.weight_int8.shape[0], dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        return self._finish(torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.unit), x.shape)


class Int4WeightLinear(_WeightOnlyBase):
    """Linear on ``aten._weight_int4pack_mm_for_cpu``: 4-bit weights (two per byte), bfloat16 activations."""

    def __init__(self, layer: DeployLinear, name: str):
        super().__init__(layer)
        in_features, out_features = layer.codes.shape[1], layer.codes.shape[0]
        unsigned = (layer.codes.to(torch.int32) + 8).contiguous()  # the kernel's codes are 0..15, offset 8
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 2))
        unit = torch.stack([torch.ones(out_features), torch.zeros(out_features)], dim=-1)
        self.register_buffer(
            "unit_scales_and_zeros",
            unit.expand(in_features // _INT4_GROUP, -1, -1).contiguous().to(torch.bfloat16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, _INT4_GROUP, self.unit_scales_and_zeros
        )
        return self._finish(y, x.shape)


def _fallback(name: str, why: str, runs: str) -> None:
    warnings.warn(f"layer {name!r}: {why}; it runs {runs}", KernelFallbackWarning, stacklevel=4)


def _grouped(name: str, m: nn.Module) -> bool:
    """True (with a fallback warning) for a layer with group-wise scales: no kernel here takes them."""
    if m.code_scale.dim() > 1:
        _fallback(name, "its scales are group-wise (no int8 kernel here takes them)", "in float32")
        return True
    return False


def _weight_only(name: str, m: nn.Module) -> nn.Module | None:
    if not isinstance(m, _CodesMixin):
        return None
    if _grouped(name, m):
        return m
    if not isinstance(m, DeployLinear):
        _fallback(name, "torch has no weight-only low-bit convolution kernel on CPU", "in float32")
        return m
    bits = m.max_bits
    if bits > 8:
        _fallback(name, f"no CPU kernel takes {bits}-bit weights", "in float32")
        return m
    int8_fits = m.in_features % _INT8_K_MULTIPLE == 0
    if bits <= 4:
        if m.in_features % _INT4_GROUP == 0 and m.out_features % 16 == 0:
            return Int4WeightLinear(m, name)
        _fallback(
            name,
            f"the int4 kernel needs in_features divisible by {_INT4_GROUP} and out_features by 16 "
            f"(got {m.in_features}, {m.out_features})",
            "on the int8 weight kernel" if int8_fits else "in float32",
        )
        if not int8_fits:
            return m
    if not int8_fits:
        # the kernel's bfloat16 path crashes on other widths (torch 2.13) and its float32 path
        # is 30-50x slower than a float32 matmul: the float layer is the faster fallback
        _fallback(
            name,
            f"the int8 weight kernel needs in_features divisible by {_INT8_K_MULTIPLE} (got {m.in_features})",
            "in float32",
        )
        return m
    return Int8WeightLinear(m, name)


def _int8_layers(ranges: ActivationRanges | None, fake: bool, activation_range: str, record: dict):
    from cetopt.deploy.grids import TensorQuant

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, TensorQuant):
            grid = ranges.outputs.get(name) if ranges is not None and name in ranges.inputs else None
            return TensorQuant(grid)
        if not isinstance(m, _CodesMixin):
            return None
        act_in = act_out = None
        if ranges is not None:
            if name not in ranges.inputs:
                return m  # calibrated to stay float (activation bits 32)
            act_in, act_out = ranges.inputs[name], ranges.outputs[name]
        if _grouped(name, m):
            return m
        if m.max_bits > 8:
            _fallback(name, f"int8 kernels cannot hold {m.max_bits}-bit weights", "in float32")
            return m
        if act_in is None and not isinstance(m, DeployLinear):
            # quantized::conv2d_dynamic returned wrong outputs on torch 2.13 (tests check the others)
            _fallback(
                name, "dynamic int8 convolutions need calibrated ranges (pass calibration=)", "in float32"
            )
            return m
        if act_in is not None and ranges.resolved:
            reduced = act_in.reduced_range  # chosen by resolve_ranges
        else:
            reduced = needs_reduced_range(m, name, activation_range)
            if act_in is not None:
                act_in = act_in.with_range(reduced)
        record[name] = "reduced" if reduced else "full"
        if fake:
            return FakeInt8(m, name, act_in, act_out, reduced)
        return (Int8Linear if isinstance(m, DeployLinear) else Int8Conv)(m, name, act_in, act_out, reduced)

    return make


def runtime(
    model: nn.Module,
    mode: str = "dequant-cached",
    *,
    activations: ActivationRanges | None = None,
    calibration: Iterable | None = None,
    method: str = "minmax",
    activation_range: str = "auto",
    shared_grids: bool = True,
) -> nn.Module:
    """A new model running ``model``'s quantized layers in execution mode ``mode``.

    Parameters
    ----------
    model : nn.Module
        A model with quantized layers (:func:`cetopt.quantize`, :func:`cetopt.load`); not modified.
    mode : {"reference", "dequant-cached", "int8", "fake-int8", "weight-only"}
        See :mod:`cetopt.deploy.runtime`.
    activations : ActivationRanges, optional
        Static activation grids (:func:`cetopt.deploy.calibrate_activations`) for ``int8`` /
        ``fake-int8``; a layer without one keeps float activations.
    calibration : iterable, optional
        Batches to calibrate the activation grids on (with ``method``) when ``activations`` is not
        given. With neither, the ranges saved in the model's file (``cetopt.save(...,
        activations=)``, found on the loaded model as ``.activation_ranges``) are used, and
        without those ``int8`` quantizes activations dynamically.
    method : {"minmax", "percentile", "mse"}
    activation_range : {"auto", "full", "reduced"}
        ``int8`` / ``fake-int8``: the grid of each layer's input. ``"reduced"``: codes 0 … 127
        (the same calibrated range at half the resolution), ``"full"``: 0 … 255, ``"auto"``:
        reduced exactly for the layers whose weights could saturate the kernels' int16 pair sums
        (:func:`u8s8_is_exact` false: 8-bit codes), full elsewhere; ranges that record a choice
        (resolved ranges, saved and read back) keep it under ``"auto"``.
    shared_grids : bool
        ``int8`` / ``fake-int8`` with calibrated ranges: one grid per edge between quantized
        layers and quantized residual adds (:mod:`cetopt.deploy.grids`, the layout onnxruntime
        fuses), else each layer's own input and output grids and float adds.

    Returns
    -------
    nn.Module
        In eval mode; ``.activation_ranges`` holds the resolved grids (None when dynamic; save
        them with ``to_dict``) and ``.activation_range`` maps each int8 layer to ``"reduced"`` or
        ``"full"``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "reference":
        return copy.deepcopy(model).eval()
    if mode == "dequant-cached":
        return dequant_cached(model).eval()
    if mode == "weight-only":
        return _swap(dequant_cached(model), _weight_only).eval()
    deploy = deployment_model(model).eval()
    if activations is None and calibration is not None:
        activations = calibrate_activations(deploy, calibration, method=method)
    if activations is None:
        activations = saved_ranges(model)
    if activation_range not in ACTIVATION_RANGES:
        raise ValueError(f"activation_range must be one of {ACTIVATION_RANGES}, got {activation_range!r}")
    if activations is not None:
        activations = resolve_ranges(deploy, activations, activation_range, shared_grids)
    record: dict[str, str] = {}
    make = _int8_layers(activations, mode == "fake-int8", activation_range, record)
    result = _swap(deploy, make).eval()
    result.activation_ranges = activations
    result.activation_range = record
    return result
