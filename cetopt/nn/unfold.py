"""Layers as matrix products: a Linear or an ungrouped Conv1d/Conv2d computes ``W · x`` per position.

Methods that reason about a layer's inputs (GPTQ's input Gram matrix, low-rank fitting on
calibration activations) view its weight as ``(out, fan_in)`` and its input as one row of length
``fan_in`` per output position (im2col for convolutions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["input_rows", "is_matmul_layer"]


def is_matmul_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear, or a Conv1d/Conv2d with ``groups=1`` and numeric zero padding."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``x`` of ``module`` as rows of shape ``(positions, fan_in)``.

    Row ``p`` is what the flattened weight ``W.reshape(out, -1)`` multiplies at output position
    ``p`` (every sample, and every spatial position of a convolution).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, module.kernel_size[0]), (1, module.stride[0])
        padding, dilation = (0, module.padding[0]), (1, module.dilation[0])
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, fan_in, P)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])
