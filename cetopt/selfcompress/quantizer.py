"""The differentiable quantizer of self-compression, with a straight-through estimator.

For one output channel with bit depth ``b`` and exponent ``e`` (both learned, real-valued):

    q(x, b, e) = 2^e · round(clamp(2^−e · x, −2^(b−1), 2^(b−1) − 1)),   and q = 0 where b ≤ 0.

The rounding passes gradients straight through; the clamp's bounds carry the gradient to ``b``
and the scaling carries it to ``e``. For ``b > 0`` every code fits a two's-complement field of
``ceil(b)`` bits (``round(2^(b−1) − 1) ≤ 2^(ceil b − 1) − 1`` and ``round(−2^(b−1)) ≥ −2^(ceil b − 1)``),
so the number of bits a channel stores is ``ceil(b)`` (:func:`stored_bits`).
"""

from __future__ import annotations

import torch

__all__ = ["codes", "quantize_ste", "stored_bits", "stored_bits_ste"]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _channel_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def quantize_ste(x: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``q(x, b, e)`` per output channel (dim 0 of ``x``), differentiable in ``x``, ``b`` and ``e``.

    Parameters
    ----------
    x : Tensor, shape (C, ...)
        Weights.
    b, e : Tensor, shape (C,)
        Bit depth and exponent of each channel.

    Returns
    -------
    Tensor
        Same shape as ``x``: multiples of ``2^e`` in ``[−2^(b−1)·2^e, (2^(b−1) − 1)·2^e]``; exactly
        zero for channels with ``b ≤ 0``.
    """
    bv, ev = _channel_view(b, x), _channel_view(e, x)
    scale = torch.pow(2.0, ev)
    half = torch.pow(2.0, torch.relu(bv) - 1)
    y = torch.minimum(torch.maximum(x / scale, -half), half - 1)
    return torch.where(bv > 0, scale * _round_ste(y), torch.zeros_like(x))


@torch.no_grad()
def codes(x: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Integer codes of :func:`quantize_ste` (``q = 2^e · codes``), as int64; 0 where ``b ≤ 0``."""
    bv, ev = _channel_view(b, x), _channel_view(e, x)
    half = torch.pow(2.0, torch.relu(bv) - 1)
    y = torch.round(torch.minimum(torch.maximum(x / torch.pow(2.0, ev), -half), half - 1))
    return torch.where(bv > 0, y, torch.zeros_like(y)).to(torch.int64)


def stored_bits(b: torch.Tensor) -> torch.Tensor:
    """Bits per weight a channel stores: ``ceil(b)`` for ``b > 0``, else 0 (int64)."""
    return torch.ceil(torch.relu(b.detach())).to(torch.int64)


def stored_bits_ste(b: torch.Tensor) -> torch.Tensor:
    """:func:`stored_bits` as a float whose gradient is that of ``relu(b)`` (straight through the ceil)."""
    r = torch.relu(b)
    return r + (torch.ceil(r) - r).detach()
