"""What each (layer, bits) option costs on disk, and how budgets are read.

The byte model is the one :func:`cetopt.save` writes: the codes of a layer packed back to back
(``ceil(params · bits / 8)`` bytes), plus per output channel a float32 scale and a uint8 bit width
(5 bytes); a group-wise option (a scale per ``g`` input columns) stores instead a float16 scale per
group, ``ceil(columns / g)`` per channel, and the uint8 bit width (``2·groups + 1`` bytes per
channel). Biases and other float tensors are stored as they are and are not part of the budget.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np

from cetopt.analysis.table import SensitivityTable
from cetopt.errors import BudgetError

__all__ = [
    "BYTES_PER_CHANNEL",
    "BYTES_PER_GROUP",
    "check_budget",
    "fp32_weight_bytes",
    "group_scale_bytes",
    "option_bytes",
    "parse_budget",
]

#: A float32 scale and a uint8 bit width per output channel.
BYTES_PER_CHANNEL = 5
#: A float16 scale per group of input columns (group-wise options).
BYTES_PER_GROUP = 2


def group_scale_bytes(params, channels, group_size: int) -> np.ndarray:
    """Scale and bit-width bytes of layers quantized with ``group_size`` columns per scale.

    ``channels · (2 · ceil(columns / group_size) + 1)`` with ``columns = params / channels``.
    """
    params = np.asarray(params, dtype=np.float64)
    channels = np.asarray(channels, dtype=np.float64)
    columns = np.ceil(params / np.maximum(channels, 1))
    groups = np.maximum(np.ceil(columns / group_size), 1)
    return channels * (BYTES_PER_GROUP * groups + 1)


def option_bytes(table: SensitivityTable) -> np.ndarray:
    """Bytes of every (layer, option) of the table, shape ``(layers, options)``."""
    bits = np.asarray(table.bits, dtype=np.float64)
    channels = np.ones(table.num_layers) if table.channels is None else table.channels.astype(np.float64)
    # float64, not int64: exact below 2**53 bits, and no silent overflow above
    codes = np.multiply(table.params.astype(np.float64)[:, None], bits[None, :])
    codes /= 8  # in place: one (layers, bits) array, no temporaries of its size
    np.ceil(codes, out=codes)
    sizes = np.asarray(table.group_sizes)
    per_channel = sizes == 0
    if per_channel.all():
        codes += (BYTES_PER_CHANNEL * channels)[:, None]
        return codes
    codes[:, per_channel] += (BYTES_PER_CHANNEL * channels)[:, None]
    for g in np.unique(sizes[~per_channel]).tolist():
        codes[:, sizes == g] += group_scale_bytes(table.params, channels, int(g))[:, None]
    return codes


def fp32_weight_bytes(table: SensitivityTable) -> float:
    """Bytes of the same weights in float32: the reference of compression ratios."""
    return 4.0 * float(table.params.sum())


_RATIO = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*$", re.I)
_BITS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(b|bit|bits)\s*$", re.I)
_BYTES = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(b|kb|mb|kib|mib|bytes?)?\s*$", re.I)
_UNITS = {None: 1, "b": 1, "byte": 1, "bytes": 1, "kb": 1e3, "mb": 1e6, "kib": 1024, "mib": 1024**2}


def parse_budget(budget: float | str, table: SensitivityTable, name: str = "budget") -> float:
    """Turn a budget into bytes for the table's layers.

    Parameters
    ----------
    budget : float or str
        Bytes (a number, or ``"120kb"``, ``"1.5MiB"``), a compression ratio against float32
        weights (``"10x"``; at least 1, since a ratio below 1 asks for more bytes than float32),
        or an average bit width (``"3.2bits"``; every layer's codes at that average plus the
        per-channel overhead).
    table : SensitivityTable
    name : str
        The argument's name, for error messages.

    Raises
    ------
    BudgetError
        If the budget cannot be read, or is not a positive finite number of bytes (a ``ValueError``).
    """
    if isinstance(budget, str):
        with contextlib.suppress(ValueError):
            budget = float(budget)  # "120000", "1e9": bytes
    if isinstance(budget, (int, float, np.integer, np.floating)) and not isinstance(budget, (bool, np.bool_)):
        value = float(budget)
    elif isinstance(budget, str) and (m := _RATIO.match(budget)):
        ratio = float(m.group(1))
        if not ratio >= 1:
            raise BudgetError(
                f"{name} {budget!r}: a compression ratio must be at least 1 (float32 size); "
                f"below 1 it would allow more bytes than the float32 weights"
            )
        value = fp32_weight_bytes(table) / ratio
    elif isinstance(budget, str) and (m := _BITS.match(budget)) and m.group(2).lower() != "b":
        channels = np.ones(table.num_layers) if table.channels is None else table.channels
        value = float(table.params.sum()) * float(m.group(1)) / 8 + BYTES_PER_CHANNEL * float(channels.sum())
    elif isinstance(budget, str) and (m := _BYTES.match(budget)):
        value = float(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None]
    else:
        raise BudgetError(
            f"cannot read {name} {budget!r}: give bytes (120000, '120kb'), a ratio ('10x') or "
            "average bits ('3.2bits')"
        )
    if not np.isfinite(value) or value <= 0:
        raise BudgetError(f"{name} must be a positive finite amount, got {budget!r}")
    return value


def check_budget(budget: float | str, name: str = "budget") -> str:
    """Check a budget's form before any work, without a table; return its kind.

    Parameters
    ----------
    budget : float or str
        As :func:`parse_budget` takes it.
    name : str
        The argument's name, for error messages.

    Returns
    -------
    str
        ``"bytes"``, ``"ratio"`` or ``"bits"``.

    Raises
    ------
    BudgetError
        The same errors :func:`parse_budget` raises for the budget's form (unreadable, a ratio
        below 1, not positive), so ``"0.5x"`` fails before the sensitivities are measured.
    """
    if isinstance(budget, str):
        with contextlib.suppress(ValueError):
            budget = float(budget)
    if isinstance(budget, (int, float, np.integer, np.floating)) and not isinstance(budget, (bool, np.bool_)):
        kind, value = "bytes", float(budget)
    elif isinstance(budget, str) and (m := _RATIO.match(budget)):
        kind, value = "ratio", float(m.group(1))
        if not value >= 1:
            raise BudgetError(
                f"{name} {budget!r}: a compression ratio must be at least 1 (float32 size); "
                f"below 1 it would allow more bytes than the float32 weights"
            )
    elif isinstance(budget, str) and (m := _BITS.match(budget)) and m.group(2).lower() != "b":
        kind, value = "bits", float(m.group(1))
    elif isinstance(budget, str) and (m := _BYTES.match(budget)):
        kind, value = "bytes", float(m.group(1))
    else:
        raise BudgetError(
            f"cannot read {name} {budget!r}: give bytes (120000, '120kb'), a ratio ('10x') or "
            "average bits ('3.2bits')"
        )
    if not np.isfinite(value) or value <= 0:
        raise BudgetError(f"{name} must be a positive finite amount, got {budget!r}")
    return kind
