"""Input domains for stability analysis: boxes (given or from data) and L∞ balls around points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cetopt.errors import DomainError

__all__ = ["Domain", "as_domain"]


def _as_array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DomainError(f"{name} is not numeric: {exc}") from None
    if np.isnan(arr).any():
        raise DomainError(f"{name} holds NaN at flat index {int(np.flatnonzero(np.isnan(arr))[0])}")
    return arr


@dataclass(frozen=True, eq=False)
class Domain:
    """A bounded input set: the union of boxes ``lo[b] ≤ x ≤ hi[b]`` over the flattened input.

    Build it with :meth:`box`, :meth:`from_data` or :meth:`ball`; :func:`as_domain` also accepts a
    ``(lo, hi)`` pair. A unit is stable on the domain when it is stable on every box.

    Attributes
    ----------
    lo, hi : ndarray, shape (boxes, features)
    kind : str
        ``"box"``, ``"data"`` or ``"ball"``.
    shape : tuple or None
        Shape of one input (without batch), where the bounds or data showed it.
    """

    lo: np.ndarray
    hi: np.ndarray
    kind: str = "box"
    shape: tuple[int, ...] | None = None

    @classmethod
    def box(cls, lo, hi, features: int | None = None) -> Domain:
        """A box, with ``lo``/``hi`` scalars or one value per feature (any shape with that many elements)."""
        lo_a, hi_a = _as_array(lo, "lo"), _as_array(hi, "hi")
        if features is None:
            features = max(lo_a.size, hi_a.size)
        shape = next((a.shape for a in (lo_a, hi_a) if a.ndim >= 1 and a.size == features), None)
        lo_a, hi_a = (_broadcast(a, features, name) for a, name in ((lo_a, "lo"), (hi_a, "hi")))
        return cls._checked(lo_a[None], hi_a[None], "box", shape)

    @classmethod
    def from_data(cls, x, margin: float = 0.0) -> Domain:
        """Per-feature ``[min, max]`` box of the data ``x`` (first axis: samples), widened by ``margin``."""
        arr = _as_array(x, "data")
        if arr.ndim < 2 or arr.shape[0] == 0:
            raise DomainError(
                f"data must have shape (samples, ...) with at least one sample, got {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise DomainError("data holds infinite values")
        flat = arr.reshape(arr.shape[0], -1)
        return cls._checked((flat.min(0) - margin)[None], (flat.max(0) + margin)[None], "data", arr.shape[1:])

    @classmethod
    def ball(cls, points, radius: float, clip: tuple[float, float] | None = None) -> Domain:
        """L∞ balls of ``radius`` around each of ``points`` (first axis: points), optionally clipped."""
        arr = _as_array(points, "points")
        if arr.ndim < 2:
            arr = arr[None]
        r = float(_as_array(radius, "radius"))
        if not (np.isfinite(r) and r >= 0):
            raise DomainError(f"radius must be a finite number ≥ 0, got {radius!r}")
        flat = arr.reshape(arr.shape[0], -1)
        lo, hi = flat - r, flat + r
        if clip is not None:
            lo, hi = np.maximum(lo, clip[0]), np.minimum(hi, clip[1])
        return cls._checked(lo, hi, "ball", arr.shape[1:])

    @classmethod
    def _checked(cls, lo: np.ndarray, hi: np.ndarray, kind: str, shape=None) -> Domain:
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise DomainError("domain bounds must be finite")
        bad = lo > hi
        if bad.any():
            b, i = (int(v[0]) for v in np.nonzero(bad))
            raise DomainError(f"lo > hi at feature {i} (box {b}): {lo[b, i]!r} > {hi[b, i]!r}")
        return cls(lo.copy(), hi.copy(), kind, None if shape is None else tuple(int(s) for s in shape))

    @property
    def features(self) -> int:
        """Number of (flattened) input features."""
        return int(self.lo.shape[1])

    @property
    def boxes(self) -> int:
        """Number of boxes in the union."""
        return int(self.lo.shape[0])

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` uniform random points of the domain (boxes chosen uniformly), shape (n, features)."""
        rng = np.random.default_rng(seed)
        which = rng.integers(0, self.boxes, n)
        u = rng.random((n, self.features))
        return self.lo[which] + u * (self.hi[which] - self.lo[which])

    def contains(self, x: np.ndarray, atol: float = 0.0) -> np.ndarray:
        """Boolean mask of the rows of ``x`` (flattened) that lie in the domain."""
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        inside = (flat[:, None, :] >= self.lo[None] - atol) & (flat[:, None, :] <= self.hi[None] + atol)
        return inside.all(axis=2).any(axis=1)

    def to_dict(self) -> dict:
        """A JSON-able summary."""
        return {"kind": self.kind, "boxes": self.boxes, "features": self.features}


def _broadcast(arr: np.ndarray, features: int, name: str) -> np.ndarray:
    if arr.size == 1:
        return np.full(features, float(arr.reshape(())))
    if arr.size != features:
        raise DomainError(f"{name} has {arr.size} values, expected 1 or {features} (one per input feature)")
    return arr.reshape(-1).copy()


def as_domain(domain, features: int) -> Domain:
    """Turn ``domain`` (a :class:`Domain` or a ``(lo, hi)`` pair) into a :class:`Domain` of ``features``.

    Raises
    ------
    DomainError
        Wrong dimension, lo > hi, NaN or infinite bounds, or an unreadable value.
    """
    if isinstance(domain, Domain):
        if domain.features != features:
            raise DomainError(f"the domain has {domain.features} features, but the model takes {features}")
        return domain
    if isinstance(domain, Sequence) and not isinstance(domain, str) and len(domain) == 2:
        return Domain.box(domain[0], domain[1], features)
    raise DomainError(f"domain must be a cetopt.leo.Domain or a (lo, hi) pair, got {type(domain).__name__}")
