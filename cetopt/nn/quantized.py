"""Layers that store integer weights with per-channel scales and dequantize on the fly.

Activations stay in floating point: these layers save memory and disk, they do not run integer
kernels. Weights are ``weight_scale[c] · weight_q[c, ...]``; ``weight_bits[c]`` says how many bits
channel ``c``'s codes need (what :func:`cetopt.save` packs). With a group size ``g``
(``weight_group``), ``weight_scale`` has shape ``(out, groups)`` and flattened input column ``j``
of channel ``c`` uses ``weight_scale[c, j // g]``.
"""

from __future__ import annotations

import copy
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

__all__ = [
    "QuantizedConv",
    "QuantizedConv1D",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedMixin",
    "QuantizedMultiheadAttention",
    "quantized_from_float",
]


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


class QuantizedConv1D(QuantizedMixin, nn.Module):
    """HF ``transformers.pytorch_utils.Conv1D`` (a Linear whose weight is stored ``(in, out)``) with
    integer codes. The codes are kept ``(out, in)``, one scale per output feature, and the forward
    is the same affine map ``x @ W + b``."""

    def __init__(self, nx: int, nf: int, bits: int = 8, bias: bool = True):
        super().__init__()
        self.nx, self.nf = nx, nf
        self._init_quant((nf, nx), bits)
        self.bias = nn.Parameter(torch.zeros(nf)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, bits={_bits_repr(self)}"


class QuantizedEmbedding(QuantizedMixin, nn.Module):
    """An Embedding holding integer codes with one scale per row (token)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bits: int = 8, padding_idx: int | None = None
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_quant((num_embeddings, embedding_dim), bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={_bits_repr(self)}"


class QuantizedMultiheadAttention(QuantizedMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed ``in_proj_weight`` (q, k, v stacked, ``(3E, E)``) is held as
    integer codes with one scale per row; its ``out_proj`` is a separate layer (quantized on its
    own row). Built from a float module by :meth:`from_float`; the forward is torch's own."""

    def __init__(self, *args, bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        if self._parameters.get("in_proj_weight") is None:
            raise ValueError(
                "QuantizedMultiheadAttention needs the packed in_proj_weight (kdim == vdim == embed_dim)"
            )
        shape = tuple(self._parameters.pop("in_proj_weight").shape)
        self._init_quant(shape, bits)

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, bits: int) -> QuantizedMultiheadAttention:
        """A quantized shell of ``module`` (not modified): same submodules and biases, codes zero."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        for key, value in module.__dict__.items():  # own registries and hook tables, not shared
            if isinstance(value, (dict, set)):
                new.__dict__[key] = copy.copy(value)
        shape = tuple(new._parameters.pop("in_proj_weight").shape)
        new._init_quant(shape, bits)
        return new

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.weight


def quantized_from_float(
    layer: nn.Module,
    bits,
    *,
    clip_search: bool = True,
    add_bias: bool = False,
    group_size: int | None = None,
) -> nn.Module:
    """The quantized counterpart of a layer with a quantization handler (which is not modified).

    ``add_bias`` gives it a zero bias where ``layer`` has none (room for a bias correction);
    ``group_size`` gives it a scale per group of that many (flattened) input columns of the
    handler's codes layout. See :mod:`cetopt.quant.handlers` for the layer types (and how to add one).
    """
    from cetopt.quant.handlers import handler_for

    handler = handler_for(layer)
    if handler is None:
        raise TypeError(f"cannot quantize a {type(layer).__name__}; it has no quantization handler")
    qw = quantize_weight(handler.codes_layout(layer), bits, clip_search=clip_search, group_size=group_size)
    return handler.quantized(layer, qw, add_bias=add_bias)


def _linear_or_conv(layer: nn.Module, qw: QuantizedWeight, *, add_bias: bool = False) -> nn.Module:
    """The QuantizedLinear / QuantizedConv of ``layer`` holding ``qw``."""
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
