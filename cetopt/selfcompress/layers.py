"""Linear and convolution layers whose output channels learn their own bit depth and exponent.

A :class:`SelfCompressingLinear` / :class:`SelfCompressingConv` holds float weights (the
straight-through estimator's latent values), a bias, and per output channel a real bit depth
``bits`` and exponent ``exponent`` (trainable). Its forward pass uses ``q(W, bits, exponent)``
(:func:`cetopt.selfcompress.quantizer.quantize_ste`); a channel with ``bits ≤ 0`` outputs exactly
zero (its bias is masked too), so removing it and its inputs downstream changes nothing.

The layers teach the rewriter how to remove their channels (a :class:`~cetopt.graph.LayerHandler`
is registered for them), and know exactly what :func:`cetopt.save` will store for them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cetopt.graph.handlers import LayerHandler, register_layer_handler
from cetopt.quant.packing import packed_size
from cetopt.selfcompress.quantizer import codes, quantize_ste, stored_bits, stored_bits_ste

__all__ = [
    "CHANNEL_OVERHEAD_BITS",
    "SelfCompressingConv",
    "SelfCompressingLayer",
    "SelfCompressingLinear",
    "self_compressing_from_float",
]

#: What :func:`cetopt.save` stores per kept channel besides its codes: a float32 scale and a uint8 bit width.
CHANNEL_OVERHEAD_BITS = 32 + 8


class SelfCompressingLayer(nn.Module):
    """Shared state and bookkeeping of the self-compressing layers.

    Attributes
    ----------
    weight : Parameter, shape (C, ...)
    bias : Parameter or None, shape (C,)
    bits : Parameter, shape (C,)
        Learned bit depth per output channel (real-valued; ``ceil`` of it is stored).
    exponent : Parameter, shape (C,)
        Learned exponent per output channel: the step size is ``2^exponent``.
    removable : buffer (bool), shape (C,)
        Whether the channel can be removed from the network once it reaches zero bits. One that
        cannot (its output reaches the model output, or feeds a normalisation) is stored with one bit.
    zero_since : buffer (int64), shape (C,)
        Training step at which the channel reached zero bits, ``-1`` while it has bits.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_channels(self, init_bits: float) -> None:
        c = self.weight.shape[0]
        wmax = self.weight.detach().abs().reshape(c, -1).amax(dim=1)
        levels = 2.0 ** (init_bits - 1) - 1
        exp = torch.where(
            wmax > 0, torch.ceil(torch.log2(wmax.clamp_min(1e-30) / levels)), torch.full_like(wmax, -8.0)
        )
        self.bits = nn.Parameter(torch.full((c,), float(init_bits)))
        self.exponent = nn.Parameter(exp)
        self.register_buffer("removable", torch.ones(c, dtype=torch.bool))
        self.register_buffer("zero_since", torch.full((c,), -1, dtype=torch.int64))

    @property
    def per_channel(self) -> int:
        """Weights per output channel (the fan-in)."""
        return int(math.prod(self.weight.shape[1:]))

    def quantized_weight(self) -> torch.Tensor:
        """``q(W, bits, exponent)``: what the forward pass multiplies by."""
        return quantize_ste(self.weight, self.bits, self.exponent)

    def masked_bias(self) -> torch.Tensor | None:
        """The bias, zero on channels with no bits (their output is exactly zero)."""
        if self.bias is None:
            return None
        return torch.where(self.bits > 0, self.bias, torch.zeros_like(self.bias))

    def alive(self) -> torch.Tensor:
        """Channels with more than zero bits."""
        return self.bits.detach() > 0

    def kept(self) -> torch.Tensor:
        """Channels that will be stored: alive ones, and dead ones that cannot be removed."""
        return self.alive() | ~self.removable

    def storage_bits_per_weight(self) -> torch.Tensor:
        """Bits each channel's codes take in the saved file (0 for channels that will be removed)."""
        bits = stored_bits(self.bits)
        return torch.where(self.kept(), bits.clamp_min(1), torch.zeros_like(bits))

    def size_bits(self) -> torch.Tensor:
        """Differentiable size of this layer's stored weights, in bits.

        ``per_channel · Σ_c bits_c + 40 · (kept channels)`` where ``bits_c = ceil(b_c)`` (at least 1
        for a dead channel that cannot be removed): its value is what :func:`cetopt.save` stores up
        to the byte padding of the packed stream; its gradient in ``b_c`` is that of
        ``per_channel · relu(b_c)``.
        """
        bits = stored_bits_ste(self.bits)
        bits = torch.where(self.removable, bits, torch.clamp(bits, min=1.0))
        overhead = CHANNEL_OVERHEAD_BITS * int(self.kept().sum())
        return self.per_channel * bits.sum() + overhead

    def storage_bytes(self) -> int:
        """Exact bytes :func:`cetopt.save` writes for this layer: packed codes, scales and bit widths."""
        bits = self.storage_bits_per_weight()
        kept = int(self.kept().sum())
        return packed_size(self.per_channel, bits[self.kept()].numpy()) + 5 * kept

    def integer_codes(self) -> torch.Tensor:
        """The codes stored for every channel (``q = 2^exponent · codes``)."""
        return codes(self.weight, self.bits, self.exponent)


class SelfCompressingLinear(SelfCompressingLayer):
    """A Linear layer with a learned bit depth and exponent per output feature.

    Built from an ``nn.Linear`` ``template`` (copied, not modified).
    """

    def __init__(self, template: nn.Linear, init_bits: float = 8.0):
        super().__init__()
        self.in_features, self.out_features = template.in_features, template.out_features
        self.weight = nn.Parameter(template.weight.detach().clone().float())
        self.bias = None if template.bias is None else nn.Parameter(template.bias.detach().clone().float())
        self._init_channels(init_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.masked_bias())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SelfCompressingConv(SelfCompressingLayer):
    """A Conv1d/2d/3d layer (``groups == 1``, zero padding) with a learned bit depth and exponent per channel.

    Built from an ``nn.ConvNd`` ``template`` (copied, not modified).
    """

    def __init__(self, template: nn.modules.conv._ConvNd, init_bits: float = 8.0):
        super().__init__()
        if template.groups != 1 or template.padding_mode != "zeros" or template.transposed:
            raise TypeError("self-compression supports ungrouped, zero-padded, non-transposed convolutions")
        self.dims = len(template.kernel_size)
        self.in_channels, self.out_channels = template.in_channels, template.out_channels
        self.kernel_size, self.stride = template.kernel_size, template.stride
        self.padding, self.dilation = template.padding, template.dilation
        self.weight = nn.Parameter(template.weight.detach().clone().float())
        self.bias = None if template.bias is None else nn.Parameter(template.bias.detach().clone().float())
        self._init_channels(init_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return conv(x, self.quantized_weight(), self.masked_bias(), self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        )


def self_compressing_from_float(layer: nn.Module, init_bits: float = 8.0) -> SelfCompressingLayer:
    """The self-compressing counterpart of an ``nn.Linear`` or ``nn.ConvNd`` (which is not modified).

    Raises
    ------
    TypeError
        For any other layer, a grouped or transposed convolution, or non-zero padding modes.
    """
    if isinstance(layer, nn.Linear):
        new = SelfCompressingLinear(layer, init_bits)
    elif isinstance(layer, nn.modules.conv._ConvNd):
        new = SelfCompressingConv(layer, init_bits)
    else:
        raise TypeError(
            f"cannot self-compress a {type(layer).__name__}; expected nn.Linear or nn.Conv1d/2d/3d"
        )
    new.train(layer.training)
    return new


def _sliced(module: SelfCompressingLayer, keep: torch.Tensor, dim: int) -> SelfCompressingLayer:
    import copy

    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    if dim == 0:
        for name in ("weight", "bias", "bits", "exponent"):
            p = getattr(module, name)
            if p is not None:
                setattr(new, name, nn.Parameter(p.detach()[keep].clone(), requires_grad=p.requires_grad))
        for name, buf in module._buffers.items():
            setattr(new, name, buf[keep].clone())
        count = len(keep)
        if isinstance(new, SelfCompressingLinear):
            new.out_features = count
        else:
            new.out_channels = count
    else:
        w = module.weight
        new.weight = nn.Parameter(w.detach()[:, keep].clone(), requires_grad=w.requires_grad)
        if isinstance(new, SelfCompressingLinear):
            new.in_features = len(keep)
        else:
            new.in_channels = len(keep)
    return new


class SelfCompressingHandler(LayerHandler):
    """How the rewriter removes channels of a self-compressing layer (channels on dim 1, or -1 for Linear)."""

    def __init__(self, linear: bool):
        self.linear = linear

    @property
    def channel_dim_in(self) -> int:  # type: ignore[override]
        return -1 if self.linear else 1

    @property
    def channel_dim_out(self) -> int:  # type: ignore[override]
        return -1 if self.linear else 1

    def in_channels(self, module: SelfCompressingLayer) -> int:
        return module.weight.shape[1]

    def out_channels(self, module: SelfCompressingLayer) -> int:
        return module.weight.shape[0]

    def prune_out(self, module: SelfCompressingLayer, keep: torch.Tensor) -> SelfCompressingLayer:
        return _sliced(module, keep, 0)

    def prune_in(self, module: SelfCompressingLayer, keep: torch.Tensor) -> SelfCompressingLayer:
        return _sliced(module, keep, 1)


register_layer_handler(SelfCompressingLinear, SelfCompressingHandler(linear=True), replace=True)
register_layer_handler(SelfCompressingConv, SelfCompressingHandler(linear=False), replace=True)
