"""Factorised layers: ``W ≈ U V + S`` as two thin layers plus an optional sparse part.

``FactorizedLinear`` computes ``second(first(x)) + S x`` with ``first = Linear(in, r, bias=False)``
(weight V) and ``second = Linear(r, out)`` (weight U, the layer's bias). Rank 0 is allowed when
there is a sparse part: the layer is then ``S x + b`` (a pruned layer), ``second`` only holds the
bias. ``FactorizedConv`` does the same with ``first`` a convolution with the original kernel,
stride, padding and dilation into ``r`` channels and ``second`` a 1×1 convolution. The sparse
part keeps only its nonzeros: values are a parameter, their flat positions in the dense weight an
int64 buffer.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FactorizedConv", "FactorizedLinear", "check_factor_shapes", "factorized_from_factors"]


class _SparsePart(nn.Module):
    """The nonzeros of a sparse weight of a given dense shape."""

    def __init__(self, shape: tuple[int, ...], nnz: int):
        super().__init__()
        self.shape = tuple(shape)
        self.values = nn.Parameter(torch.zeros(nnz))
        self.register_buffer("positions", torch.zeros(nnz, dtype=torch.int64))

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        flat = torch.zeros(int(torch.tensor(self.shape).prod()), dtype=dtype, device=self.values.device)
        return flat.index_put((self.positions,), self.values.to(dtype)).reshape(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.values.numel()}"


class FactorizedLinear(nn.Module):
    """``y = U (V x) + S x + b`` with rank ``r`` and ``nnz`` sparse entries."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, nnz: int = 0):
        super().__init__()
        _check_rank(rank, nnz)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        with warnings.catch_warnings():  # rank 0: zero-element weights
            warnings.simplefilter("ignore", UserWarning)
            self.first = nn.Linear(in_features, rank, bias=False)
            self.second = nn.Linear(rank, out_features, bias=bias)
        self.sparse = _SparsePart((out_features, in_features), nnz) if nnz else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return F.linear(x, self.sparse.dense(x.dtype), self.second.bias)
        y = self.second(self.first(x))
        if self.sparse is not None:
            y = y + F.linear(x, self.sparse.dense(x.dtype))
        return y


class FactorizedConv(nn.Module):
    """A ConvNd as a rank-``r`` convolution, a 1×1 convolution, and an optional sparse convolution."""

    def __init__(self, conv: nn.modules.conv._ConvNd, rank: int, nnz: int = 0):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only ungrouped, zero-padded convolutions can be factorised")
        _check_rank(rank, nnz)
        cls = type(conv)
        self.dims = len(conv.kernel_size)
        self.rank = rank
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        with warnings.catch_warnings():  # rank 0: zero-element weights
            warnings.simplefilter("ignore", UserWarning)
            self.first, self.second = self._thin_layers(cls, conv, rank)
        shape = (conv.out_channels, conv.in_channels, *conv.kernel_size)
        self.sparse = _SparsePart(shape, nnz) if nnz else None

    @staticmethod
    def _thin_layers(cls, conv, rank: int) -> tuple[nn.Module, nn.Module]:
        first = cls(
            conv.in_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
        )
        return first, cls(rank, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        if self.rank == 0:
            s = self.sparse.dense(x.dtype)
            return conv(x, s, self.second.bias, self.stride, self.padding, self.dilation)
        y = self.second(self.first(x))
        if self.sparse is not None:
            y = y + conv(x, self.sparse.dense(x.dtype), None, self.stride, self.padding, self.dilation)
        return y


def _check_rank(rank: int, nnz: int) -> None:
    if rank < 0 or (rank == 0 and nnz == 0):
        raise ValueError(
            f"rank must be positive, or 0 with a sparse part; got rank {rank} with {nnz} nonzeros"
        )


def check_factor_shapes(weight_shape: tuple[int, ...], first: torch.Tensor, second: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``second @ first`` has the shape of a weight of ``weight_shape``."""
    if second.dim() != 2 or first.dim() < 2:
        raise ValueError(
            f"factors must be matrices, got shapes {tuple(first.shape)} and {tuple(second.shape)}"
        )
    out, rank = second.shape
    fan_in = int(torch.tensor(weight_shape[1:]).prod())
    first_fan_in = int(torch.tensor(first.shape[1:]).prod())
    if first.shape[0] != rank or first_fan_in != fan_in:
        raise ValueError(
            f"factors of shapes {tuple(first.shape)} and {tuple(second.shape)} do not fit a weight of "
            f"shape {weight_shape}"
        )
    if out != weight_shape[0]:
        raise ValueError(f"second factor has {out} rows, the layer has {weight_shape[0]} outputs")


def factorized_from_factors(
    layer: nn.Module, first: torch.Tensor, second: torch.Tensor, sparse: torch.Tensor | None = None
) -> FactorizedLinear | FactorizedConv:
    """Build the factorised replacement of ``layer`` (not modified) from ``W ≈ second @ first + sparse``.

    Parameters
    ----------
    layer : nn.Linear or nn.ConvNd
    first : Tensor, shape (r, in) — for a convolution (r, in·k…) or (r, in, k…)
    second : Tensor, shape (out, r)
    sparse : Tensor, optional
        Dense tensor of the layer's weight shape (or (out, in·k…)); only its nonzeros are kept.
    """
    check_factor_shapes(tuple(layer.weight.shape), first, second)
    rank = second.shape[1]
    nnz = 0 if sparse is None else int(torch.count_nonzero(sparse))
    if isinstance(layer, nn.Linear):
        new = FactorizedLinear(
            layer.in_features, layer.out_features, rank, bias=layer.bias is not None, nnz=nnz
        )
    elif isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        new = FactorizedConv(layer, rank, nnz=nnz)
    else:
        raise TypeError(f"cannot factorise a {type(layer).__name__}; expected nn.Linear or nn.Conv1d/2d/3d")
    with torch.no_grad():
        new.first.weight.copy_(first.reshape(new.first.weight.shape))
        new.second.weight.copy_(second.reshape(new.second.weight.shape))
        if layer.bias is not None:
            new.second.bias.copy_(layer.bias)
        if nnz:
            flat = sparse.reshape(-1)
            positions = torch.nonzero(flat, as_tuple=True)[0]
            new.sparse.positions.copy_(positions)
            new.sparse.values.copy_(flat[positions])
    new.train(layer.training)
    return new
