"""What stability detection found, per layer and per stage, as plain data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["STAGES", "LayerReport", "StabilityReport", "weights_fingerprint"]

# Stages in the order they run; "timeout", "failed" (a solve task failed twice) and "skipped" mark
# units left unstable without a proof.
STAGES = ("data", "samples", "interval", "linear", "attack", "lp", "milp")
_ALL_STAGES = (*STAGES, "timeout", "failed", "skipped")


@dataclass
class LayerReport:
    """Stability of the units of one ReLU layer (a unit is a feature, or a channel of a convolution).

    Attributes
    ----------
    name : str
        The producing Linear/Conv module (or the ReLU node when no single module produces it).
    node : str
        The ReLU node in the traced graph.
    producer, batchnorm : str or None
        The module that feeds the ReLU (through ``batchnorm``, if any); ``None`` if not removable.
    kind : str
        ``"linear"`` or ``"conv"``.
    units, positions : int
        Units (features or channels), and positions per unit (1 for a Linear).
    state : ndarray of int8
        Per unit: ``-1`` stably inactive, ``1`` stably active, ``0`` unstable.
    stage : list of str
        Per unit, the stage that decided it (see :data:`STAGES`; ``timeout``/``skipped``: kept as
        unstable without a decision).
    constant : ndarray of float
        Per unit, the constant value it outputs on the whole domain (zero weights), else NaN.
    milps, lps : int
        Solves run for this layer.
    milp_time, lp_time, time : float
        Seconds in MILP solves, in LP solves, and in total for this layer.
    """

    name: str
    node: str
    producer: str | None
    batchnorm: str | None
    kind: str
    units: int
    positions: int
    state: np.ndarray
    stage: list[str]
    constant: np.ndarray
    milps: int = 0
    lps: int = 0
    milp_time: float = 0.0
    lp_time: float = 0.0
    time: float = 0.0

    @property
    def inactive(self) -> np.ndarray:
        """Indices of stably inactive units."""
        return np.flatnonzero(self.state == -1)

    @property
    def active(self) -> np.ndarray:
        """Indices of stably active units."""
        return np.flatnonzero(self.state == 1)

    @property
    def unstable(self) -> np.ndarray:
        """Indices of unstable units."""
        return np.flatnonzero(self.state == 0)

    def stage_counts(self) -> dict[str, int]:
        """How many units each stage decided."""
        return {s: int(sum(1 for t in self.stage if t == s)) for s in _ALL_STAGES}

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "node": self.node,
            "kind": self.kind,
            "units": self.units,
            "positions": self.positions,
            "inactive": len(self.inactive),
            "active": len(self.active),
            "unstable": len(self.unstable),
            "constant": int(np.isfinite(self.constant).sum()),
            "decided_by": self.stage_counts(),
            "milps": self.milps,
            "lps": self.lps,
            "milp_time": self.milp_time,
            "lp_time": self.lp_time,
            "time": self.time,
        }


@dataclass
class StabilityReport:
    """The result of :func:`cetopt.find_stable_units`.

    Attributes
    ----------
    layers : list of LayerReport
        In topological order.
    input_shape : tuple
    domain : dict
        Summary of the domain (kind, boxes, features).
    margin : float
        The soundness margin: a unit is stable only if a solver's dual bound clears zero by it.
    time : float
        Total seconds.
    fingerprint : str, optional
        :func:`weights_fingerprint` of the model the report was computed on; removal refuses a
        model whose weights differ. ``None`` (a report built by hand) skips that check.
    """

    layers: list[LayerReport]
    input_shape: tuple[int, ...]
    domain: dict
    margin: float
    time: float = 0.0
    extra: dict = field(default_factory=dict)
    network: object = field(default=None, repr=False)  # the extracted ReluNetwork, for removal
    fingerprint: str | None = None

    @property
    def constant(self) -> bool:
        """Whether some layer is entirely stably inactive: the network is constant on the domain."""
        return any(len(layer.inactive) == layer.units for layer in self.layers)

    def layer(self, name: str) -> LayerReport:
        """The report of the layer called ``name`` (its module or ReLU node name)."""
        for layer in self.layers:
            if name in (layer.name, layer.node):
                return layer
        raise KeyError(f"no ReLU layer {name!r}; layers: {[layer.name for layer in self.layers]}")

    def stage_counts(self) -> dict[str, int]:
        """Units decided by each stage, over all layers."""
        total = dict.fromkeys(_ALL_STAGES, 0)
        for layer in self.layers:
            for key, value in layer.stage_counts().items():
                total[key] += value
        return total

    @property
    def milps(self) -> int:
        return sum(layer.milps for layer in self.layers)

    @property
    def milp_time(self) -> float:
        return sum(layer.milp_time for layer in self.layers)

    def summary(self) -> str:
        """A one-line-per-layer text table."""
        head = ("layer", "units", "inactive", "active", "unstable", "MILPs", "time")
        lines = ["{:<20} {:>6} {:>8} {:>7} {:>8} {:>6} {:>8}".format(*head)]
        for r in self.layers:
            lines.append(
                f"{r.name:<20} {r.units:>6} {len(r.inactive):>8} {len(r.active):>7} "
                f"{len(r.unstable):>8} {r.milps:>6} {r.time:>7.2f}s"
            )
        if self.constant:
            lines.append("the network is constant on this domain (a layer is entirely inactive)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "domain": self.domain,
            "margin": self.margin,
            "fingerprint": self.fingerprint,
            "time": self.time,
            "constant": self.constant,
            "decided_by": self.stage_counts(),
            "layers": [layer.to_dict() for layer in self.layers],
            **self.extra,
        }


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state_dict entry's name, dtype, shape and bytes (parameters and buffers).

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    str
        A hex digest: equal for models whose weights and buffers are bitwise equal.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
