"""Bit-packing of integer codes: channel ``c``'s values take ``bits[c]`` bits each, back to back.

The stream holds the codes of channel 0, then channel 1, ..., each value in two's complement on
its channel's bit width, least significant bit first; the last byte is zero-padded. A layer of
``n`` weights per channel therefore takes ``ceil(n · Σ_c bits[c] / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pack_codes", "packed_size", "unpack_codes"]


def packed_size(per_channel: int, bits: np.ndarray) -> int:
    """Bytes of the packed stream for ``per_channel`` values in each channel."""
    return -(-int(per_channel) * int(np.asarray(bits, dtype=np.int64).sum()) // 8)


def _layout(per_channel: int, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    value_bits = np.repeat(np.asarray(bits, dtype=np.int64), per_channel)
    offsets = np.concatenate([[0], np.cumsum(value_bits)[:-1]])
    return value_bits, offsets


def pack_codes(codes: torch.Tensor, bits) -> np.ndarray:
    """Pack integer ``codes`` (shape ``(channels, ...)``) with ``bits[c]`` bits for channel ``c``.

    Raises
    ------
    ValueError
        If a code does not fit its channel's bit width.
    """
    q = codes.detach().cpu().reshape(codes.shape[0], -1).to(torch.int64).numpy()
    bits = np.asarray(bits, dtype=np.int64).reshape(-1)
    if bits.shape[0] != q.shape[0]:
        raise ValueError(f"{bits.shape[0]} bit widths for {q.shape[0]} channels")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    bad = (q < lo[:, None]) | (q > hi[:, None])
    if bad.any():
        c = int(np.argwhere(bad)[0][0])
        raise ValueError(f"a code of channel {c} does not fit {int(bits[c])} bits")
    per_channel = q.shape[1]
    value_bits, offsets = _layout(per_channel, bits)
    unsigned = q.reshape(-1) & ((1 << value_bits) - 1)
    stream = np.zeros(packed_size(per_channel, bits) * 8, dtype=np.uint8)
    for j in range(int(bits.max(initial=0))):
        has = value_bits > j
        stream[offsets[has] + j] = (unsigned[has] >> j) & 1
    return np.packbits(stream, bitorder="little")


def unpack_codes(packed: np.ndarray, bits, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the codes as a tensor of ``shape`` and ``dtype``."""
    bits = np.asarray(bits, dtype=np.int64).reshape(-1)
    per_channel = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if np.asarray(packed).size != packed_size(per_channel, bits):
        raise ValueError(
            f"packed stream has {np.asarray(packed).size} bytes, expected {packed_size(per_channel, bits)}"
        )
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little").astype(np.int64)
    value_bits, offsets = _layout(per_channel, bits)
    unsigned = np.zeros(value_bits.shape[0], dtype=np.int64)
    for j in range(int(bits.max(initial=0))):
        has = value_bits > j
        unsigned[has] |= stream[offsets[has] + j] << j
    signed = np.where(unsigned >= (1 << (value_bits - 1)), unsigned - (1 << value_bits), unsigned)
    return torch.from_numpy(signed.reshape(shape)).to(dtype)
