"""Layers that store integer weights with per-channel scales and dequantize on the fly.

Activations stay in floating point: these layers save memory and disk, they do not run integer
kernels. Weights are ``weight_scale[c] · weight_q[c, ...]``; ``weight_bits[c]`` says how many bits
channel ``c``'s codes need (what :func:`cetopt.save` packs). With a group size ``g``
(``weight_group``), ``weight_scale`` has shape ``(out, groups)`` and flattened input column ``j``
of channel ``c`` uses ``weight_scale[c, j // g]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cetopt.quant.quantizer import (
    QuantizedWeight,
    check_group_size,
    dequantize,
    num_groups,
    quantize_weight,
    storage_dtype,
)

__all__ = ["QuantizedConv", "QuantizedLinear", "QuantizedMixin", "quantized_from_float"]


class QuantizedMixin:
    """Buffers and helpers shared by the quantized layers."""

    weight_group: int | None = None

    def _init_quant(
        self, weight_shape: tuple[int, ...], max_bits: int, group_size: int | None = None
    ) -> None:
        self.weight_group = check_group_size(group_size)
        self.register_buffer("weight_q", torch.zeros(weight_shape, dtype=storage_dtype(max_bits)))
        if self.weight_group is None:
            self.register_buffer("weight_scale", torch.ones(weight_shape[0]))
        else:
            columns = math.prod(weight_shape[1:])
            self.register_buffer(
                "weight_scale", torch.ones(weight_shape[0], num_groups(columns, self.weight_group))
            )
        self.register_buffer("weight_bits", torch.full((weight_shape[0],), max_bits, dtype=torch.int16))

    def set_quantized(self, qw: QuantizedWeight) -> None:
        self.weight_q = qw.q.clone()
        self.weight_scale = qw.scale.clone()
        self.weight_bits = qw.bits.clone()
        self.weight_group = qw.group_size

    @property
    def max_bits(self) -> int:
        return int(self.weight_bits.max()) if self.weight_bits.numel() else 0

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32)."""
        return dequantize(self.weight_q, self.weight_scale, self.max_bits, self.weight_group)

    def weight_storage_bits(self) -> int:
        """Bits the packed codes take: ``Σ_c bits[c] · (weights per channel)``."""
        per_channel = self.weight_q[0].numel() if self.weight_q.shape[0] else 0
        return int(self.weight_bits.to(torch.int64).sum()) * per_channel


class QuantizedLinear(QuantizedMixin, nn.Module):
    """A Linear layer holding integer codes and per-output-channel scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 8,
        bias: bool = True,
        group_size: int | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_quant((out_features, in_features), bits, group_size)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={_bits_repr(self)}"


class QuantizedConv(QuantizedMixin, nn.Module):
    """A Conv1d/Conv2d/Conv3d layer holding integer codes and per-output-channel scales."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        bits: int = 8,
        group_size: int | None = None,
    ):
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(f"QuantizedConv supports zero padding only, got padding_mode={padding_mode!r}")
        self.dims = dims
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self._init_quant((out_channels, in_channels // groups, *kernel_size), bits, group_size)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return conv(
            x, self.weight.to(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bits={_bits_repr(self)}"
        )


def _bits_repr(layer: QuantizedMixin) -> str:
    bits = layer.weight_bits
    group = "" if layer.weight_group is None else f", group_size={layer.weight_group}"
    if bits.numel() and bool((bits == bits[0]).all()):
        return str(int(bits[0])) + group
    return f"{int(bits.min())}..{int(bits.max())} per channel" + group


def quantized_from_float(
    layer: nn.Module,
    bits,
    *,
    clip_search: bool = True,
    add_bias: bool = False,
    group_size: int | None = None,
) -> QuantizedLinear | QuantizedConv:
    """The quantized counterpart of an nn.Linear or nn.ConvNd (which is not modified).

    ``add_bias`` gives it a zero bias where ``layer`` has none (room for a bias correction);
    ``group_size`` gives it a scale per group of that many (flattened) input columns.
    """
    qw = quantize_weight(layer.weight, bits, clip_search=clip_search, group_size=group_size)
    has_bias = layer.bias is not None or add_bias
    if isinstance(layer, nn.Linear):
        new = QuantizedLinear(
            layer.in_features, layer.out_features, bits=qw.max_bits, bias=has_bias, group_size=qw.group_size
        )
    elif isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        new = QuantizedConv(
            len(layer.kernel_size),
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            has_bias,
            layer.padding_mode,
            bits=qw.max_bits,
            group_size=qw.group_size,
        )
    else:
        raise TypeError(f"cannot quantize a {type(layer).__name__}; expected nn.Linear or nn.Conv1d/2d/3d")
    new.set_quantized(qw)
    if layer.bias is not None:
        new.bias = nn.Parameter(
            layer.bias.detach().clone().to(torch.float32), requires_grad=layer.bias.requires_grad
        )
    new.train(layer.training)
    return new
