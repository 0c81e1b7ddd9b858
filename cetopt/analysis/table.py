"""``SensitivityTable``: predicted loss increase per (layer, bit width), as plain arrays."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cetopt.errors import DataShapeError, NonFiniteError

__all__ = ["SensitivityTable"]


def _float_array(name: str, value) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataShapeError(f"{name} must be an array of numbers: {exc}") from None


def _int_vector(name: str, value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = _float_array(name, value)
    if arr.shape != (n,):
        raise DataShapeError(f"{name} has shape {arr.shape}, expected ({n},)")
    # 2**53: beyond it float64 sums of sizes are inexact, and int64 casts of huge floats wrap around
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr >= 2.0**53):
        raise NonFiniteError(f"{name} must hold finite non-negative numbers below 2**53")
    if np.any(arr != np.round(arr)):
        raise DataShapeError(f"{name} must hold whole numbers")
    return arr.astype(np.int64)


def _names(value) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise DataShapeError(f"layers must be a sequence of names, got {type(value).__name__}")
    if type(value) is tuple and set(map(type, value)) <= {str}:
        return value  # already a tuple of str: nothing to convert
    return tuple(map(str, value))  # one C-level pass, no Python frame per name


def _bit_widths(value) -> tuple[int, ...]:
    try:
        bits = tuple(value)
        if all(float(b) == int(b) for b in bits):
            return tuple(int(b) for b in bits)
    except (TypeError, ValueError, OverflowError):
        pass
    raise DataShapeError(f"bits must be whole numbers, got {value!r}")


@dataclass(frozen=True, eq=False, kw_only=True)
class SensitivityTable:
    """Predicted loss increase of quantizing each layer (alone) to each bit width.

    Build one with :func:`cetopt.sensitivity`, or from your own scores with the same keywords.

    Attributes
    ----------
    layers : sequence of str
        Layer names, as in ``model.named_modules()``.
    bits : sequence of int
        Candidate bit widths (columns of ``values``), strictly increasing; with ``groups``,
        non-decreasing, each column an option ``(bits[k], groups[k])``.
    values : ndarray, shape (len(layers), len(bits))
        Predicted loss increase per (layer, option). May be negative (a second-order estimate can
        predict a gain); must be finite.
    params : ndarray of int, shape (len(layers),)
        Weight count per layer.
    method : str
        What produced the values (``"cet"``, ``"hutchinson"``, ``"fisher"``, ``"measured"``, or
        anything for user scores).
    stderr : ndarray, optional
        Standard error of each value, for stochastic estimators.
    channels : ndarray of int, optional
        Output channels per layer (each gets its own scale when quantized). Default: 1 per layer.
    macs : ndarray of int, optional
        Multiply-accumulates per layer for one input, for BOPs budgets.
    fixed_bytes : ndarray of int, optional
        Bytes per layer stored whatever the bit width (biases kept in float32). Default 0.
    groups : sequence of int or None, optional
        Group size of each column's option (a scale per that many input columns; ``None`` or 0:
        per output channel). Default: every column per channel. The ``(bits, group)`` pairs must
        be distinct.
    meta : dict
        Free-form provenance (probes used, loss at the start, ...).
    """

    layers: Sequence[str]
    bits: Sequence[int]
    values: np.ndarray
    params: np.ndarray
    method: str = "user"
    stderr: np.ndarray | None = None
    channels: np.ndarray | None = None
    macs: np.ndarray | None = None
    fixed_bytes: np.ndarray | None = None
    groups: Sequence[int | None] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = _names(self.layers)
        if len(set(layers)) != len(layers):
            raise DataShapeError("layer names must be unique")
        bits = _bit_widths(self.bits)
        groups = _group_sizes(self.groups, bits)
        if groups is None:
            if not bits or any(b2 <= b1 for b1, b2 in itertools.pairwise(bits)) or bits[0] < 1:
                raise DataShapeError(f"bits must be positive and strictly increasing, got {bits}")
        elif not bits or any(b2 < b1 for b1, b2 in itertools.pairwise(bits)) or bits[0] < 1:
            raise DataShapeError(f"bits must be positive and non-decreasing, got {bits}")
        object.__setattr__(self, "groups", groups)
        values = _float_array("values", self.values)
        if values.shape != (len(layers), len(bits)):
            raise DataShapeError(f"values has shape {values.shape}, expected ({len(layers)}, {len(bits)})")
        bad = ~np.isfinite(values)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise NonFiniteError(
                f"sensitivity of layer {layers[i]!r} at {self.option_label(j)} is {values[i, j]!r}; "
                "values must be finite"
            )
        n = len(layers)
        if self.params is None:
            raise DataShapeError("params (the weight count of each layer) is required")
        params = _int_vector("params", self.params, n)
        if np.any(params == 0):
            raise DataShapeError(f"layer {layers[int(np.flatnonzero(params == 0)[0])]!r} has zero parameters")
        stderr = None
        if self.stderr is not None:
            stderr = _float_array("stderr", self.stderr)
            if stderr.shape != values.shape:
                raise DataShapeError(f"stderr has shape {stderr.shape}, expected {values.shape}")
            if np.any(stderr < 0):  # NaN (one round, no spread) is allowed
                raise NonFiniteError("stderr must not be negative")
        for name, value in (
            ("layers", layers),
            ("bits", bits),
            ("values", values),
            ("params", params),
            ("stderr", stderr),
            ("channels", _int_vector("channels", self.channels, n)),
            ("macs", _int_vector("macs", self.macs, n)),
            ("fixed_bytes", _int_vector("fixed_bytes", self.fixed_bytes, n)),
        ):
            object.__setattr__(self, name, value)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Group size of each column, 0 where the option is per channel."""
        return tuple(0 if g is None else g for g in self.groups) if self.groups else (0,) * len(self.bits)

    def option_label(self, j: int) -> str:
        """``"3 bits"`` or ``"3 bits, group 128"`` for column ``j``."""
        g = self.group_sizes[j] if j < len(self.group_sizes) else 0
        return f"{self.bits[j]} bits" + (f", group {g}" if g else "")

    def subset(self, layers: Sequence[str]) -> SensitivityTable:
        """The rows of the named layers, in the given order."""
        index = {name: i for i, name in enumerate(self.layers)}
        missing = [name for name in layers if name not in index]
        if missing:
            raise KeyError(f"layers not in the table: {missing}")
        rows = np.array([index[name] for name in layers], dtype=int)

        def pick(a):
            return None if a is None else a[rows]

        return SensitivityTable(
            layers=list(layers),
            bits=self.bits,
            values=self.values[rows],
            params=self.params[rows],
            method=self.method,
            stderr=pick(self.stderr),
            channels=pick(self.channels),
            macs=pick(self.macs),
            fixed_bytes=pick(self.fixed_bytes),
            groups=self.groups,
            meta=dict(self.meta),
        )

    def finer_options(self) -> np.ndarray:
        """``finer[i, j, k]``: whether option ``k`` keeps layer ``i`` at least as exactly as option
        ``j`` does (at least as many bits and scale groups no wider), shape ``(layers, options,
        options)``.

        A per-channel option's group is the layer's whole row (``params / channels`` columns),
        and a group at least as wide as the row is the row too.
        """
        channels = np.ones(self.num_layers, dtype=np.int64) if self.channels is None else self.channels
        cols = self.params / np.maximum(channels, 1)
        sizes = np.array(self.group_sizes, dtype=np.float64)
        width = np.where(sizes[None, :] > 0, np.minimum(sizes[None, :], cols[:, None]), cols[:, None])
        bits = np.asarray(self.bits)
        more_bits = bits[None, :, None] <= bits[None, None, :]
        narrower = width[:, None, :] <= width[:, :, None]
        return more_bits & narrower

    def monotone(self, envelope: str = "mean") -> SensitivityTable:
        """A copy whose values never rise with more bits or narrower groups for the same layer.

        Measured or estimated values can rank options of a layer against the order they are in
        (noise, or a second-order estimate's error); the allocation then buys the coarser option
        for its lower score. Per layer, with ``finer`` as in :meth:`finer_options`:

        * ``"upper"``: each option scores the highest of itself and every finer option (a coarse
          option is at least as costly as any finer one);
        * ``"lower"``: the lowest of itself and every coarser option;
        * ``"mean"`` (default): the mean of the two, also monotone, and equal to the values
          wherever they already are.

        ``stderr`` is kept; ``meta["monotone"]`` records the envelope.
        """
        if envelope not in ("mean", "upper", "lower"):
            raise DataShapeError(f"envelope must be 'mean', 'upper' or 'lower', got {envelope!r}")
        finer = self.finer_options()
        v = self.values[:, None, :]  # v[i, 0, k]
        upper = np.where(finer, v, -np.inf).max(axis=2)
        lower = np.where(finer.transpose(0, 2, 1), v, np.inf).min(axis=2)
        values = {"upper": upper, "lower": lower, "mean": 0.5 * (upper + lower)}[envelope]
        return dataclasses.replace(self, values=values, meta={**self.meta, "monotone": envelope})

    def to_dict(self) -> dict:
        """Plain-data form (lists and numbers), e.g. for JSON."""
        out = {
            "layers": list(self.layers),
            "bits": list(self.bits),
            "values": self.values.tolist(),
            "params": self.params.tolist(),
            "method": self.method,
            "meta": self.meta,
        }
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.tolist()
        if self.groups is not None:
            out["groups"] = list(self.groups)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> SensitivityTable:
        """The table :meth:`to_dict` wrote (checked as any new table is)."""
        keys = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - keys)
        if unknown:
            raise DataShapeError(f"a sensitivity table has no fields {unknown}; known: {sorted(keys)}")
        arrays = {k: np.asarray(data[k]) for k in ("values", "params", *_OPTIONAL) if data.get(k) is not None}
        return cls(**{**dict(data), **arrays})

    def __repr__(self) -> str:
        groups = "" if self.groups is None else f", groups={list(self.groups)}"
        head = f"SensitivityTable(method={self.method!r}, layers={self.num_layers}"
        return f"{head}, bits={list(self.bits)}{groups})"


_OPTIONAL = ("stderr", "channels", "macs", "fixed_bytes")


def _group_sizes(value, bits: tuple[int, ...]) -> tuple[int | None, ...] | None:
    """The table's group sizes (``None`` per channel), checked against the bit widths."""
    if value is None:
        return None
    try:
        groups = tuple(value)
    except TypeError:
        raise DataShapeError(f"groups must be a sequence of group sizes, got {value!r}") from None
    if len(groups) != len(bits):
        raise DataShapeError(f"groups has {len(groups)} entries for {len(bits)} bit-width columns")
    out = []
    for g in groups:
        if g is None or (isinstance(g, (int, np.integer)) and not isinstance(g, bool) and int(g) == 0):
            out.append(None)
        elif isinstance(g, (int, np.integer)) and not isinstance(g, bool) and int(g) > 0:
            out.append(int(g))
        else:
            raise DataShapeError(f"a group size must be a positive integer or None, got {g!r}")
    pairs = list(zip(bits, out))
    if len(set(pairs)) != len(pairs):
        raise DataShapeError(f"the (bits, group) options must be distinct, got {pairs}")
    return tuple(out)
