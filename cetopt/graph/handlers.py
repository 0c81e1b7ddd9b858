"""Layer handlers: how the rewriter reads and edits the channels of one layer type.

Every layer type that cetopt can compress has a :class:`LayerHandler` with four methods
(``in_channels``, ``out_channels``, ``prune_in``, ``prune_out``) plus two facts about its channel
layout (which tensor dimension carries channels, and whether its input and output channels are
the same channels, as in BatchNorm). A user's own layer gets the same support by registering a
handler::

    class ScaledLinearHandler(cetopt.graph.LayerHandler):
        channel_dim_in = channel_dim_out = -1

        def in_channels(self, m): return m.weight.shape[1]
        def out_channels(self, m): return m.weight.shape[0]
        def prune_out(self, m, keep): ...   # return a new module keeping output channels `keep`
        def prune_in(self, m, keep): ...    # return a new module keeping input channels `keep`

    cetopt.graph.register_layer_handler(ScaledLinear, ScaledLinearHandler())

A module with a handler is a leaf of the traced graph: the tracer does not look inside it.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from cetopt.errors import RewriteError

__all__ = [
    "BatchNormHandler",
    "ConvHandler",
    "EmbeddingHandler",
    "LayerHandler",
    "LayerNormHandler",
    "LinearHandler",
    "MultiheadAttentionHandler",
    "get_handler",
    "register_layer_handler",
    "registered_layer_types",
]


class LayerHandler(abc.ABC):
    """The four-method contract of a channel-carrying layer type.

    Attributes
    ----------
    channel_dim_in, channel_dim_out : int
        Dimension of the input / output tensor that carries this layer's channels (``1`` for
        convolutions and BatchNorm on NC... tensors, ``-1`` for Linear, LayerNorm, Embedding).
    coupled_in_out : bool
        Input channel ``i`` and output channel ``i`` are the same channel (BatchNorm, LayerNorm,
        depthwise convolution, attention's embedding dimension): removing one removes both.
    """

    channel_dim_in: ClassVar[int] = 1
    channel_dim_out: ClassVar[int] = 1
    coupled_in_out: ClassVar[bool] = False

    def is_coupled(self, module: nn.Module) -> bool:
        """Whether this module's input and output channels are the same (default: the class flag)."""
        return self.coupled_in_out

    def is_prunable(self, module: nn.Module) -> bool:
        """Whether channels of this module may be removed at all (e.g. not for grouped convolutions)."""
        return True

    @abc.abstractmethod
    def in_channels(self, module: nn.Module) -> int | None:
        """Number of input channels (``None`` if the input carries no channels, as for Embedding)."""

    @abc.abstractmethod
    def out_channels(self, module: nn.Module) -> int:
        """Number of output channels."""

    @abc.abstractmethod
    def prune_out(self, module: nn.Module, keep: torch.Tensor) -> nn.Module:
        """A new module keeping only output channels ``keep`` (sorted int64 indices)."""

    @abc.abstractmethod
    def prune_in(self, module: nn.Module, keep: torch.Tensor) -> nn.Module:
        """A new module keeping only input channels ``keep`` (sorted int64 indices)."""


def _param(tensor: torch.Tensor, like: nn.Parameter | None) -> nn.Parameter | None:
    if like is None:
        return None
    return nn.Parameter(tensor.detach().clone(), requires_grad=like.requires_grad)


class LinearHandler(LayerHandler):
    """nn.Linear: weight (out, in), channels on the last dimension."""

    channel_dim_in = -1
    channel_dim_out = -1

    def in_channels(self, module: nn.Linear) -> int:
        return module.in_features

    def out_channels(self, module: nn.Linear) -> int:
        return module.out_features

    def prune_out(self, module: nn.Linear, keep: torch.Tensor) -> nn.Linear:
        return _linear(module, module.weight[keep], None if module.bias is None else module.bias[keep])

    def prune_in(self, module: nn.Linear, keep: torch.Tensor) -> nn.Linear:
        return _linear(module, module.weight[:, keep], module.bias)


def _linear(template: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    new.weight = _param(weight, template.weight)
    if bias is not None:
        new.bias = _param(bias, template.bias)
    new.train(template.training)
    return new


class ConvHandler(LayerHandler):
    """nn.Conv1d / nn.Conv2d / nn.Conv3d, including depthwise. Channels on dimension 1.

    A depthwise convolution (``groups == in_channels == out_channels``) couples input and output
    channel ``i``. Other grouped convolutions are compressible by quantization or factorization,
    but their channels are not removed (the group structure would break).
    """

    channel_dim_in = 1
    channel_dim_out = 1

    def is_coupled(self, module: nn.modules.conv._ConvNd) -> bool:
        return module.groups > 1 and module.groups == module.in_channels == module.out_channels

    def is_prunable(self, module: nn.modules.conv._ConvNd) -> bool:
        return module.groups == 1 or self.is_coupled(module)

    def in_channels(self, module) -> int:
        return module.in_channels

    def out_channels(self, module) -> int:
        return module.out_channels

    def prune_out(self, module, keep: torch.Tensor):
        if self.is_coupled(module):
            return _conv(
                module, module.weight[keep], _maybe(module.bias, keep), len(keep), len(keep), len(keep)
            )
        if module.groups != 1:
            raise RewriteError("cannot remove output channels of a grouped (non-depthwise) convolution")
        return _conv(module, module.weight[keep], _maybe(module.bias, keep), module.in_channels, len(keep), 1)

    def prune_in(self, module, keep: torch.Tensor):
        if self.is_coupled(module):
            return self.prune_out(module, keep)
        if module.groups != 1:
            raise RewriteError("cannot remove input channels of a grouped (non-depthwise) convolution")
        return _conv(module, module.weight[:, keep], module.bias, len(keep), module.out_channels, 1)


def _maybe(tensor: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor[keep]


def _conv(template, weight, bias, in_channels: int, out_channels: int, groups: int):
    cls = type(template)
    new = cls(
        in_channels,
        out_channels,
        template.kernel_size,
        stride=template.stride,
        padding=template.padding,
        dilation=template.dilation,
        groups=groups,
        bias=bias is not None,
        padding_mode=template.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight = _param(weight, template.weight)
    if bias is not None:
        new.bias = _param(bias, template.bias)
    new.train(template.training)
    return new


class BatchNormHandler(LayerHandler):
    """nn.BatchNorm1d/2d/3d: one channel in, the same channel out."""

    coupled_in_out = True

    def in_channels(self, module) -> int:
        return module.num_features

    def out_channels(self, module) -> int:
        return module.num_features

    def prune_out(self, module, keep: torch.Tensor):
        new = type(module)(
            len(keep),
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            new.weight = _param(module.weight[keep], module.weight)
            new.bias = _param(module.bias[keep], module.bias)
        if module.track_running_stats:
            new.running_mean = module.running_mean[keep].clone()
            new.running_var = module.running_var[keep].clone()
            new.num_batches_tracked = module.num_batches_tracked.clone()
        new.train(module.training)
        return new

    def prune_in(self, module, keep: torch.Tensor):
        return self.prune_out(module, keep)


class LayerNormHandler(LayerHandler):
    """nn.LayerNorm over the last dimension only (a 1-D ``normalized_shape``)."""

    channel_dim_in = -1
    channel_dim_out = -1
    coupled_in_out = True

    def is_prunable(self, module: nn.LayerNorm) -> bool:
        return len(module.normalized_shape) == 1

    def in_channels(self, module: nn.LayerNorm) -> int:
        return module.normalized_shape[-1]

    def out_channels(self, module: nn.LayerNorm) -> int:
        return module.normalized_shape[-1]

    def prune_out(self, module: nn.LayerNorm, keep: torch.Tensor) -> nn.LayerNorm:
        if len(module.normalized_shape) != 1:
            raise RewriteError("cannot remove channels of a LayerNorm over more than one dimension")
        new = nn.LayerNorm(
            len(keep),
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
        )
        if module.elementwise_affine:
            new.weight = _param(module.weight[keep], module.weight)
            if module.bias is not None:
                new.bias = _param(module.bias[keep], module.bias)
        new.train(module.training)
        return new

    def prune_in(self, module, keep: torch.Tensor):
        return self.prune_out(module, keep)


class EmbeddingHandler(LayerHandler):
    """nn.Embedding: no input channels (indices in), ``embedding_dim`` channels out."""

    channel_dim_in = -1
    channel_dim_out = -1

    def in_channels(self, module: nn.Embedding) -> None:
        return None

    def out_channels(self, module: nn.Embedding) -> int:
        return module.embedding_dim

    def prune_out(self, module: nn.Embedding, keep: torch.Tensor) -> nn.Embedding:
        new = nn.Embedding(
            module.num_embeddings,
            len(keep),
            padding_idx=module.padding_idx,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
        )
        new.weight = _param(module.weight[:, keep], module.weight)
        new.train(module.training)
        return new

    def prune_in(self, module, keep):
        raise RewriteError("an Embedding has no input channels to remove")


class MultiheadAttentionHandler(LayerHandler):
    """nn.MultiheadAttention (self-attention with ``kdim == vdim == embed_dim``, ``batch_first`` or not).

    Its input and output embedding channels are coupled, as in Torch-Pruning: removing channel ``i``
    removes row and column ``i`` of the query, key, value and output projections. The remaining
    embedding dimension must stay divisible by the number of heads.
    """

    channel_dim_in = -1
    channel_dim_out = -1
    coupled_in_out = True

    def is_prunable(self, module: nn.MultiheadAttention) -> bool:
        return module._qkv_same_embed_dim and module.bias_k is None

    def in_channels(self, module: nn.MultiheadAttention) -> int:
        return module.embed_dim

    def out_channels(self, module: nn.MultiheadAttention) -> int:
        return module.embed_dim

    def prune_out(self, module: nn.MultiheadAttention, keep: torch.Tensor) -> nn.MultiheadAttention:
        if not self.is_prunable(module):
            raise RewriteError("only self-attention with a packed in-projection and no bias_k can be pruned")
        e, n = module.embed_dim, len(keep)
        if n % module.num_heads:
            raise RewriteError(
                f"{e - n} channels removed from an attention layer with {module.num_heads} heads leaves {n}, "
                f"not divisible by the number of heads"
            )
        rows = torch.cat([keep, keep + e, keep + 2 * e])
        new = nn.MultiheadAttention(
            n,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            batch_first=module.batch_first,
        )
        new.in_proj_weight = _param(module.in_proj_weight[rows][:, keep], module.in_proj_weight)
        if module.in_proj_bias is not None:
            new.in_proj_bias = _param(module.in_proj_bias[rows], module.in_proj_bias)
        new.out_proj.weight = _param(module.out_proj.weight[keep][:, keep], module.out_proj.weight)
        if module.out_proj.bias is not None:
            new.out_proj.bias = _param(module.out_proj.bias[keep], module.out_proj.bias)
        new.train(module.training)
        return new

    def prune_in(self, module, keep):
        return self.prune_out(module, keep)


_HANDLERS: dict[type, LayerHandler] = {}


def register_layer_handler(
    layer_type: type[nn.Module], handler: LayerHandler, *, replace: bool = False
) -> None:
    """Teach the rewriter a layer type.

    Parameters
    ----------
    layer_type : type
        The nn.Module subclass. Subclasses of it use the same handler unless they have their own.
    handler : LayerHandler
        An instance implementing the four-method contract.
    replace : bool
        Allow replacing the handler of a type that already has one.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a LayerHandler instance, got {handler!r}")
    if layer_type in _HANDLERS and not replace:
        raise ValueError(f"{layer_type.__name__} already has a handler; pass replace=True to replace it")
    _HANDLERS[layer_type] = handler


def unregister_layer_handler(layer_type: type[nn.Module]) -> None:
    """Forget the handler of ``layer_type``."""
    _HANDLERS.pop(layer_type, None)


def get_handler(module: nn.Module) -> LayerHandler | None:
    """The handler for ``module``'s type (nearest registered base class), or ``None``."""
    for cls in type(module).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


def registered_layer_types() -> tuple[type, ...]:
    """Every layer type with a handler."""
    return tuple(_HANDLERS)


for _types, _handler in (
    ((nn.Linear,), LinearHandler()),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), ConvHandler()),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), BatchNormHandler()),
    ((nn.LayerNorm,), LayerNormHandler()),
    ((nn.Embedding,), EmbeddingHandler()),
    ((nn.MultiheadAttention,), MultiheadAttentionHandler()),
):
    for _t in _types:
        register_layer_handler(_t, _handler)
