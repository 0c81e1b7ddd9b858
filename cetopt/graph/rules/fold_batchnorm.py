"""FoldBatchNorm: fold an eval-mode BatchNorm into the Linear or convolution before it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cetopt.graph.decisions import FoldBatchNorm
from cetopt.graph.rules.base import RewriteRule, RewriteState

__all__ = ["FoldBatchNormRule"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FoldBatchNormRule(RewriteRule):
    """Carry out :class:`FoldBatchNorm`. Guarded like ``torch.fx``'s own fuser: the producer's output
    must feed only the BatchNorm."""

    decision_type = FoldBatchNorm

    def check(self, state: RewriteState, d: FoldBatchNorm) -> str | None:
        bn = state.module(d.batchnorm)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return f"{d.batchnorm!r} is a {type(bn).__name__}, not a BatchNorm"
        if bn.running_mean is None:
            return f"{d.batchnorm!r} tracks no running statistics; there is nothing fixed to fold"
        node = state.layer_node(d.batchnorm)
        src = node.args[0]
        if getattr(src, "op", None) != "call_module" or not isinstance(state.module(src.target), _PRODUCERS):
            return f"the input of {d.batchnorm!r} does not come straight from a Linear or convolution"
        if (
            isinstance(state.module(src.target), nn.modules.conv._ConvNd)
            and state.module(src.target).transposed
        ):
            return "transposed convolutions are not folded"
        if len(src.users) != 1:
            return (
                f"the output of {src.target!r} feeds more than the BatchNorm; folding would change the others"
            )
        return None

    @torch.no_grad()
    def apply(self, state: RewriteState, d: FoldBatchNorm) -> None:
        node = state.layer_node(d.batchnorm)
        producer_node = node.args[0]
        producer = state.module(producer_node.target)
        bn = state.module(d.batchnorm)
        state.set_module(producer_node.target, fold_batchnorm(producer, bn))
        node.replace_all_uses_with(producer_node)
        state.model.graph.erase_node(node)
        state.changed()


def fold_batchnorm(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` in eval mode (computed in float64)."""
    folded = copy.deepcopy(layer)
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    w = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(std)
    b = (b - bn.running_mean.double()) * scale + beta
    folded.weight = nn.Parameter(w.to(layer.weight.dtype))
    folded.bias = nn.Parameter(b.to(layer.weight.dtype))
    return folded
