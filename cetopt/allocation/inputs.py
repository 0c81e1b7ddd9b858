"""Checking ``allocate``'s arguments and turning a table into per-group arrays.

Every malformed argument raises a :mod:`cetopt.errors` type that names it. Tie groups are merged
into "super-layers" by connected components; sums over a group's members are one sparse product.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from cetopt.analysis.table import SensitivityTable
from cetopt.errors import AllocationArgumentError, BudgetError, UnknownLayerError

__all__ = ["Groups", "bit_limits", "check_options", "positive_amount", "tie_groups"]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def positive_amount(name: str, value) -> float:
    """``value`` as a positive finite float, else :class:`BudgetError` naming ``name``."""
    if not _is_real(value) or not (math.isfinite(float(value)) and float(value) > 0):
        raise BudgetError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_options(time_limit, mip_gap, activation_bits) -> None:
    """Raise :class:`AllocationArgumentError` on a malformed solve option."""
    if time_limit is not None and not (_is_real(time_limit) and 0 < float(time_limit) < math.inf):
        raise AllocationArgumentError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if not (_is_real(mip_gap) and 0 <= float(mip_gap) < math.inf):
        raise AllocationArgumentError(f"mip_gap must be a non-negative finite relative gap, got {mip_gap!r}")
    if not (isinstance(activation_bits, numbers.Integral) and not isinstance(activation_bits, bool)) or (
        activation_bits < 1
    ):
        raise AllocationArgumentError(f"activation_bits must be a positive integer, got {activation_bits!r}")


def _layer_index(table: SensitivityTable) -> dict[str, int]:
    return {name: i for i, name in enumerate(table.layers)}


def _limit_vector(table, spec, what: str, default: float) -> np.ndarray:
    out = np.full(table.num_layers, default)
    if spec is None:
        return out
    items = spec.items() if isinstance(spec, Mapping) else [(None, spec)]
    index = _layer_index(table) if isinstance(spec, Mapping) else {}
    for name, value in items:
        if not _is_real(value) or math.isnan(float(value)):
            label = what if name is None else f"{what}[{name!r}]"
            raise AllocationArgumentError(f"{label} must be a number of bits, got {value!r}")
        if name is None:
            out[:] = float(value)
        elif name not in index:
            raise UnknownLayerError(f"{what} names a layer not in the table: {name!r}")
        else:
            out[index[name]] = float(value)
    return out


def bit_limits(table: SensitivityTable, min_bits, max_bits) -> np.ndarray:
    """Mask of allowed (layer, bits) options under the global or per-layer bit ranges."""
    lo = _limit_vector(table, min_bits, "min_bits", -np.inf)
    hi = _limit_vector(table, max_bits, "max_bits", np.inf)
    bits = np.asarray(table.bits, dtype=np.float64)
    allowed = (bits[None, :] >= lo[:, None]) & (bits[None, :] <= hi[:, None])
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        i = int(empty[0])
        raise AllocationArgumentError(
            f"layer {table.layers[i]!r} has no bit width within its limits [{lo[i]}, {hi[i]}] "
            f"among {list(table.bits)}"
        )
    return allowed


class Groups:
    """Layers merged by tie groups: ``labels[layer]`` is its group, groups ordered by first member."""

    def __init__(self, labels: np.ndarray | None, num_layers: int):
        self.labels = labels
        self.count = num_layers if labels is None else int(labels.max()) + 1
        self._sum = None
        if labels is not None:
            ones = np.ones(num_layers)
            self._sum = sp.csr_matrix((ones, (labels, np.arange(num_layers))), shape=(self.count, num_layers))

    def sum(self, per_layer: np.ndarray) -> np.ndarray:
        """Per-group sums of a ``(layers, options)`` array."""
        return per_layer if self._sum is None else np.asarray(self._sum @ per_layer)

    def all(self, per_layer: np.ndarray) -> np.ndarray:
        """Per-group conjunction of a boolean ``(layers, options)`` array."""
        if self._sum is None:
            return per_layer
        return np.asarray(self._sum @ (~per_layer).astype(np.float64)) == 0

    def layer_choice(self, group_choice: np.ndarray) -> np.ndarray:
        return group_choice if self.labels is None else group_choice[self.labels]

    def members(self, group: int) -> np.ndarray:
        return np.array([group]) if self.labels is None else np.flatnonzero(self.labels == group)


def tie_groups(table: SensitivityTable, ties: Sequence[Sequence[str]]) -> Groups:
    """Connected components of the tie groups (each a sequence of layer names)."""
    if isinstance(ties, (str, bytes)) or not isinstance(ties, Sequence | tuple | list):
        raise AllocationArgumentError(f"ties must be a sequence of sequences of layer names, got {ties!r}")
    index = _layer_index(table) if len(ties) else {}
    heads, tails = [], []
    for tie in ties:
        if isinstance(tie, (str, bytes)) or not isinstance(tie, Sequence | tuple | list):
            raise AllocationArgumentError(f"each tie group must be a sequence of layer names, got {tie!r}")
        missing = [name for name in tie if not isinstance(name, str) or name not in index]
        if missing:
            raise UnknownLayerError(f"tie group names layers not in the table: {missing}")
        ids = [index[name] for name in tie]
        heads += ids[:-1]
        tails += ids[1:]
    if not heads:
        return Groups(None, table.num_layers)
    n = table.num_layers
    graph = sp.coo_matrix((np.ones(len(heads)), (heads, tails)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    first = np.full(count, n)
    np.minimum.at(first, labels, np.arange(n))
    rank = np.empty(count, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(count)
    return Groups(rank[labels], n)
