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
    if (per_channel * bits % 8 == 0).all():
        return _pack_aligned(q, bits)
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
    if (per_channel * bits % 8 == 0).all():
        return torch.from_numpy(
            _unpack_aligned(np.asarray(packed, dtype=np.uint8), bits, per_channel).reshape(shape)
        ).to(dtype)
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little").astype(np.int64)
    value_bits, offsets = _layout(per_channel, bits)
    unsigned = np.zeros(value_bits.shape[0], dtype=np.int64)
    for j in range(int(bits.max(initial=0))):
        has = value_bits > j
        unsigned[has] |= stream[offsets[has] + j] << j
    signed = np.where(unsigned >= (1 << (value_bits - 1)), unsigned - (1 << value_bits), unsigned)
    return torch.from_numpy(signed.reshape(shape)).to(dtype)


# Every channel's codes start on a byte boundary when ``per_channel · bits[c]`` is a multiple of 8
# (any layer whose fan-in is a multiple of 8): the channels of one width are then packed and
# unpacked together, a whole byte at a time, with the same bit order as the general path.


def _channel_bytes(per_channel: int, bits: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(per_channel * bits // 8)])


def _pack_aligned(q: np.ndarray, bits: np.ndarray) -> np.ndarray:
    per_channel = q.shape[1]
    starts = _channel_bytes(per_channel, bits)
    out = np.zeros(int(starts[-1]), dtype=np.uint8)
    for b in np.unique(bits).tolist():
        rows = np.flatnonzero(bits == b)
        unsigned = (q[rows] & ((1 << b) - 1)).astype(np.uint64 if b > 8 else np.uint8)
        if b == 8:
            packed = unsigned.astype(np.uint8)
        elif b in (1, 2, 4):
            per_byte = 8 // b
            shifts = (b * np.arange(per_byte, dtype=np.uint8))[None, None, :]
            packed = (unsigned.reshape(len(rows), -1, per_byte) << shifts).sum(axis=2, dtype=np.uint8)
        else:
            planes = ((unsigned[..., None] >> np.arange(b, dtype=unsigned.dtype)) & 1).astype(np.uint8)
            packed = np.packbits(planes.reshape(len(rows), -1), axis=1, bitorder="little")
        width = per_channel * b // 8
        index = starts[rows][:, None] + np.arange(width)[None, :]
        out[index] = packed.reshape(len(rows), width)
    return out


def _unpack_aligned(packed: np.ndarray, bits: np.ndarray, per_channel: int) -> np.ndarray:
    starts = _channel_bytes(per_channel, bits)
    out = np.empty((bits.shape[0], per_channel), dtype=np.int32 if bits.max(initial=0) > 16 else np.int16)
    for b in np.unique(bits).tolist():
        rows = np.flatnonzero(bits == b)
        width = per_channel * b // 8
        index = starts[rows][:, None] + np.arange(width)[None, :]
        chunk = packed[index]  # (rows, width) bytes
        if b == 8:
            out[rows] = chunk.view(np.int8)
            continue
        if b in (1, 2, 4):
            per_byte = 8 // b
            shifts = (b * np.arange(per_byte, dtype=np.uint8))[None, None, :]
            unsigned = (
                ((chunk[..., None] >> shifts) & ((1 << b) - 1))
                .reshape(len(rows), per_channel)
                .astype(np.int64)
            )
        else:
            planes = np.unpackbits(chunk, axis=1, bitorder="little").reshape(len(rows), per_channel, b)
            unsigned = planes.astype(np.int64) @ (1 << np.arange(b, dtype=np.int64))
        out[rows] = np.where(unsigned >= (1 << (b - 1)), unsigned - (1 << b), unsigned)
    return out
