"""``Plan``: the bit width chosen for each layer, with what the solver proved about it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from cetopt.analysis.channels import split_channel_row
from cetopt.graph.decisions import Quantize

__all__ = ["LayerValues", "Plan"]


class LayerValues(Mapping):
    """A read-only layer name → number mapping backed by an array.

    ``allocate`` hands the per-layer bytes, losses and weight counts out this way: building three
    Python dicts of a million entries would cost more than the allocation itself. It compares equal
    to the dict with the same items; ``dict(values)`` makes one.
    """

    def __init__(self, names: Sequence[str], values: np.ndarray):
        self._names = names
        self._values = np.asarray(values)
        self._index: dict[str, int] | None = None

    def __getitem__(self, name: str):
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self._names)}
        return self._values[self._index[name]].item()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def values(self):
        return self._values.tolist()

    def items(self):
        return zip(self._names, self._values.tolist())

    def total(self) -> float:
        """Sum of the values."""
        return float(self._values.sum())

    def __repr__(self) -> str:
        return f"LayerValues({len(self)} layers)"


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

    ``allocate`` fills the last three with :class:`LayerValues` (read-only, array-backed).
    """

    bits: dict[str, int]
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
    layer_params: Mapping[str, int] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes over planned bytes."""
        return self.fp32_bytes / self.bytes

    @property
    def average_bits(self) -> float:
        """Bits per weight, weighted by layer size (codes only, without the per-channel overhead)."""
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
        return [Quantize(layer, bits) for layer, bits in self.bits.items()]

    def to_dict(self) -> dict:
        """Plain data, for JSON."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in out.items():
            if isinstance(value, Mapping):
                out[name] = dict(value.items())
        out["compression_ratio"] = self.compression_ratio
        out["average_bits"] = self.average_bits
        return out

    def summary(self) -> str:
        """A table of the plan, one row per layer.

        A per-channel plan's rows (``"layer[c]"``) are grouped by layer; its bits column counts the
        channels at each width, e.g. ``2×10 3×54`` (10 channels at 2 bits, 54 at 3).
        """
        rows = [("layer", "bits", "bytes", "predicted Δloss")]
        rows += [
            (name, bits, f"{size:.0f}", f"{loss:.3g}")
            for name, (bits, size, loss) in self._layer_rows().items()
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        gap = "n/a" if self.gap is None else f"{self.gap:.2g}"
        lines.append(
            f"total: {self.bytes:.0f} of {self.budget_bytes:.0f} budget bytes ({self.compression_ratio:.2f}x "
            f"smaller than fp32), predicted Δloss {self.predicted_loss:.4g}, status {self.status}, "
            f"gap {gap}, solved by {self.solver} in {self.solve_time:.3f} s"
        )
        return "\n".join(lines)

    def _layer_rows(self) -> dict[str, tuple[str, float, float]]:
        """Layer → (bits text, bytes, predicted loss), per-channel rows summed over their layer."""
        widths: dict[str, Counter] = {}
        totals: dict[str, list[float]] = {}
        for row, b in self.bits.items():
            split = split_channel_row(row)
            layer = row if split is None else split[0]
            widths.setdefault(layer, Counter())[int(b)] += 1
            total = totals.setdefault(layer, [0.0, 0.0])
            total[0] += self.layer_bytes.get(row, 0)
            total[1] += self.layer_loss.get(row, 0)
        return {layer: (self._bits_text(layer, count), *totals[layer]) for layer, count in widths.items()}

    def _bits_text(self, layer: str, count: Counter) -> str:
        if layer in self.bits:  # a per-layer row
            return str(self.bits[layer])
        return " ".join(f"{b}×{n}" for b, n in sorted(count.items()))
