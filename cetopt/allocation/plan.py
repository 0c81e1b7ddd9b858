"""``Plan``: the bit width chosen for each layer, with what the solver proved about it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from cetopt.analysis.channels import split_channel_row
from cetopt.graph.decisions import Quantize

__all__ = ["LayerValues", "Plan"]


class NameIndex:
    """Layer name → row, built on first use and shared by all the mappings of a plan (or a sweep)."""

    __slots__ = ("_index", "names")

    def __init__(self, names: Sequence[str]):
        self.names = names
        self._index: dict[str, int] | None = None

    def get(self) -> dict[str, int]:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.names)}
        return self._index


class LayerValues(Mapping):
    """A read-only layer name → number mapping backed by an array.

    ``allocate`` hands the bits, bytes, losses and weight counts per layer out this way: building
    Python dicts of a million entries would cost more than the allocation itself. The name → row
    index is built on the first lookup by name, once for all the mappings that share it; iterating,
    ``items()`` and ``values()`` never need it. It compares equal to the dict with the same items;
    ``dict(values)`` makes one.
    """

    def __init__(self, names: Sequence[str], values: np.ndarray, index: NameIndex | None = None):
        self._names = names
        self._values = np.asarray(values)
        if self._values.shape != (len(names),):
            raise ValueError(f"LayerValues needs one value per name, got shape {self._values.shape}")
        self._shared = index if index is not None and index.names is names else NameIndex(names)

    def __getitem__(self, name: str):
        return self._values[self._shared.get()[name]].item()

    def __contains__(self, name) -> bool:
        return name in self._shared.get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def values(self):
        return self._values.tolist()

    def items(self):
        return zip(self._names, self._values.tolist())

    def array(self) -> np.ndarray:
        """The values in name order, as a read-only array (no copy)."""
        view = self._values.view()
        view.flags.writeable = False
        return view

    def same_names(self, other: LayerValues) -> bool:
        """True when ``other`` holds values for the same names in the same order."""
        return other._names is self._names or tuple(other._names) == tuple(self._names)

    def total(self) -> float:
        """Sum of the values."""
        return float(self._values.sum())

    def __eq__(self, other):
        if isinstance(other, LayerValues) and self.same_names(other):
            return bool(np.array_equal(self._values, other._values))
        return super().__eq__(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"LayerValues({len(self)} layers)"


def _plain_layers(names: Sequence[str]) -> bool:
    """True when no row name looks like a per-channel row ``"layer[c]"`` (one C-level scan)."""
    return not names or "]\0" not in "\0".join(names) + "\0"


@dataclass(frozen=True)
class Plan:
    """A bit allocation.

    Attributes
    ----------
    bits : dict
        Layer name → bit width.
    predicted_loss : float
        Sum of the chosen sensitivities (the predicted loss increase).
    bytes : float
        Bytes of the quantized weights under the plan (codes + per-channel scale and bit width).
    budget_bytes : float
        The budget those bytes had to fit.
    fp32_bytes : float
        Bytes of the same weights in float32.
    status : str
        ``optimal`` (proven within ``mip_gap``), ``time_limit`` or ``stopped`` (best found so far).
    bound : float or None
        Proven lower bound on the predicted loss of any plan within the budget.
    gap : float or None
        Relative gap between ``predicted_loss`` and ``bound``.
    solve_time : float
        Seconds spent choosing.
    solver : str
        Who answered: a solver backend, or ``mck-greedy`` when the convex-hull greedy's certificate
        already met the gap.
    method : str
        Sensitivity method of the table.
    bops, latency : float or None
        Totals under the plan, when those budgets were used.
    layer_bytes : Mapping
        Layer name → bytes under the plan.
    layer_loss : Mapping
        Layer name → predicted loss increase under the plan.
    layer_params : Mapping
        Layer name → weight count.
    kept_float : tuple of str
        Weights (parameter names) of the model that no quantization handler covers: they stay in
        float32, outside the plan's bytes (with the reason in parentheses where a handler declined).
    groups : Mapping
        Layer name → group size (a scale per that many input columns; 0: per output channel).
        Empty when every layer is per channel (tables without group options).

    ``allocate`` fills ``bits`` and the last three with :class:`LayerValues` (read-only,
    array-backed mappings that compare equal to dicts); any mapping works when you build one.
    """

    bits: Mapping[str, int]
    predicted_loss: float
    bytes: float
    budget_bytes: float
    fp32_bytes: float
    status: str
    bound: float | None
    gap: float | None
    solve_time: float
    solver: str
    method: str = ""
    bops: float | None = None
    latency: float | None = None
    layer_bytes: Mapping[str, float] = field(default_factory=dict)
    layer_loss: Mapping[str, float] = field(default_factory=dict)
    kept_float: tuple[str, ...] = ()
    layer_params: Mapping[str, int] = field(default_factory=dict)
    groups: Mapping[str, int] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes over planned bytes."""
        return self.fp32_bytes / self.bytes

    @property
    def average_bits(self) -> float:
        """Bits per weight, weighted by layer size (codes only, without the per-channel overhead)."""
        if self._arrays():
            params = self.layer_params.array().astype(np.float64)
            total = float(params.sum())
            return float(self.bits.array().astype(np.float64) @ params) / total if total else 0.0
        names = list(self.layer_params)
        if not names:
            return 0.0
        params = np.fromiter(self.layer_params.values(), np.float64, len(names))
        if names == list(self.bits):
            bits = np.fromiter(self.bits.values(), np.float64, len(names))
        else:
            bits = np.array([self.bits[n] for n in names], dtype=np.float64)
        total = float(params.sum())
        return float(bits @ params) / total if total else 0.0

    def decisions(self) -> list[Quantize]:
        """The rewrite decisions that carry out the plan."""
        groups = self.groups
        return [
            Quantize(layer, bits, group_size=groups.get(layer) or None) for layer, bits in self.bits.items()
        ]

    def to_dict(self) -> dict:
        """Plain data, for JSON."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in out.items():
            if isinstance(value, Mapping):
                out[name] = dict(value.items())
        out["compression_ratio"] = self.compression_ratio
        out["average_bits"] = self.average_bits
        return out

    def _arrays(self, *extra: str) -> bool:
        """True when ``bits``, ``layer_params`` and ``extra`` are :class:`LayerValues` over the same names."""
        maps = [self.bits, self.layer_params] + [getattr(self, name) for name in extra]
        return all(isinstance(m, LayerValues) for m in maps) and all(
            self.bits.same_names(m) for m in maps[1:]
        )

    def summary(self, max_rows: int | None = 200) -> str:
        """A table of the plan, one row per layer.

        A per-channel plan's rows (``"layer[c]"``) are grouped by layer; its bits column counts the
        channels at each width, e.g. ``2×10 3×54`` (10 channels at 2 bits, 54 at 3). Past
        ``max_rows`` layers only the first ``max_rows`` are listed, followed by how many more there
        are and how many rows sit at each width (``max_rows=None`` lists every layer).

        ``bytes`` are quantized-weight bytes as :func:`cetopt.save` writes them: packed codes plus
        a float32 scale and a uint8 bit width per output channel. That is what every budget counts
        (``"10x"`` is the float32 size of these weights over 10; ``"3.2bits"`` is 3.2 bits of codes
        per weight plus the per-channel scales and widths); biases, BatchNorm and the file header
        come on top. ``predicted Δloss`` is the sum of the chosen options' sensitivities.
        """
        layers, texts, sizes, losses, count = self._layer_rows(max_rows)
        rows = [("layer", "bits", "bytes", "predicted Δloss")]
        rows += [(n, b, f"{x:.0f}", f"{y:.3g}") for n, b, x, y in zip(layers, texts, sizes, losses)]
        if self.groups:
            head, *body = rows
            rows = [(*head[:2], "group", *head[2:])]
            rows += [(r[0], r[1], str(self.groups.get(r[0]) or "channel"), *r[2:]) for r in body]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if len(layers) < count:
            per_width = " ".join(f"{b}×{n}" for b, n in self._width_counts())
            lines.append(
                f"... {count - len(layers)} more layers (summary(max_rows=None) lists them all); "
                f"rows per bit width: {per_width}"
            )
        gap = "n/a" if self.gap is None else f"{self.gap:.2g}"
        lines.append(
            f"total: {self.bytes:.0f} of {self.budget_bytes:.0f} budget bytes ({self.compression_ratio:.2f}x "
            f"smaller than fp32), predicted Δloss {self.predicted_loss:.4g}, status {self.status}, "
            f"gap {gap}, solved by {self.solver} in {self.solve_time:.3f} s"
        )
        if self.kept_float:
            lines.append(f"kept in float ({len(self.kept_float)}): {', '.join(self.kept_float)}")
        return "\n".join(lines)

    def _width_counts(self) -> list[tuple[int, int]]:
        """(bit width, rows at it), widths ascending."""
        if isinstance(self.bits, LayerValues):
            widths, counts = np.unique(self.bits.array(), return_counts=True)
            return list(zip(widths.tolist(), counts.tolist()))
        return sorted(Counter(int(b) for b in self.bits.values()).items())

    def _layer_rows(self, max_rows: int | None) -> tuple[list, list, list, list, int]:
        """The first ``max_rows`` layers (names, bits texts, bytes, predicted losses) and the layer count."""
        stop = None if max_rows is None else max(int(max_rows), 0)
        arrays = self._arrays("layer_bytes", "layer_loss")
        if arrays and _plain_layers(self.bits._names):
            # one row per layer: slice the arrays and format only the rows shown; + 0.0 as in the
            # per-row sums below (it turns -0.0 into 0.0)
            names = self.bits._names
            part = slice(0, len(names) if stop is None else stop)
            texts = [str(b) for b in self.bits.array()[part].tolist()]
            sizes = (self.layer_bytes.array()[part] + 0.0).tolist()
            losses = (self.layer_loss.array()[part] + 0.0).tolist()
            return list(names[part]), texts, sizes, losses, len(names)
        if arrays:
            per_row = zip(self.bits, self.bits.values(), self.layer_bytes.values(), self.layer_loss.values())
        else:
            sizes, losses = self.layer_bytes, self.layer_loss
            per_row = ((row, b, sizes.get(row, 0), losses.get(row, 0)) for row, b in self.bits.items())
        table = list(self._grouped(per_row).items())
        shown = table[:stop]
        return (
            [name for name, _ in shown],
            [row[0] for _, row in shown],
            [row[1] for _, row in shown],
            [row[2] for _, row in shown],
            len(table),
        )

    def _grouped(self, per_row) -> dict[str, tuple[str, float, float]]:
        """Layer → (bits text, bytes, predicted loss), per-channel rows summed over their layer."""
        widths: dict[str, Counter] = {}
        totals: dict[str, list[float]] = {}
        for row, b, size, loss in per_row:
            split = split_channel_row(row)
            layer = row if split is None else split[0]
            widths.setdefault(layer, Counter())[int(b)] += 1
            total = totals.setdefault(layer, [0.0, 0.0])
            total[0] += size
            total[1] += loss
        return {layer: (self._bits_text(layer, count), *totals[layer]) for layer, count in widths.items()}

    def _bits_text(self, layer: str, count: Counter) -> str:
        if layer in self.bits:  # a per-layer row
            return str(self.bits[layer])
        return " ".join(f"{b}×{n}" for b, n in sorted(count.items()))
