"""``method="auto"``: the cheapest estimator whose plans match ``measured``'s on the zoo.

Two estimators qualify. ``measured`` is the ground truth itself; ``cet`` gave the same 10× plan as
``measured`` on 5 of the 6 zoo runs of ``benchmarks/results/bit_allocation.json`` (rank
correlation 0.96–0.998), which ``hutchinson`` (2 of 6) and ``fisher`` (3 of 6) did not. Their
costs are estimated in forward passes over the calibration data:

* ``measured``: two recording passes, then one pass of the network suffix from each layer on per
  (layer, bit width) — the share of the multiply-accumulates from that layer on, in execution
  order (:mod:`cetopt.analysis.replay`);
* ``cet``: a gradient (about 3 passes), then ``bits × probes`` Hessian-vector products at about
  6 passes each (forward-over-reverse); ``probes`` stops at the next power of two above the unit
  count, where the estimate is exact.

With exact probes ``cet`` needs at least as many HVPs as ``measured`` needs suffix passes, so
``measured`` wins on every model of up to a few hundred layers; past that, ``cet``'s capped probe
count makes it the cheaper.
"""

from __future__ import annotations

import numpy as np

from cetopt.analysis.objective import LossObjective
from cetopt.analysis.probes import _ceil_pow2, _floor_pow2

__all__ = ["HVP_PASSES", "choose_method"]

HVP_PASSES = 6.0  # forward-pass equivalents of one Hessian-vector product
GRADIENT_PASSES = 3.0


def _suffix_shares(obj: LossObjective) -> np.ndarray:
    """Share of the network's multiply-accumulates from each layer on (registration order)."""
    macs = np.array([max(info.macs, 1) for info in obj.layers], dtype=float)
    return np.cumsum(macs[::-1])[::-1] / macs.sum()


def _cet_probes(units: int, probes: int, rounds: int) -> int:
    if _ceil_pow2(units) <= probes:
        return _ceil_pow2(units)
    rounds = max(min(rounds, probes), 1)
    return rounds * _floor_pow2(probes // rounds)


def choose_method(
    obj: LossObjective, bits: int, probes: int, rounds: int, *, per_channel: bool = False
) -> tuple[str, dict]:
    """The estimator ``auto`` runs on ``obj``'s model and data, and a record of why.

    Returns
    -------
    method : str
        ``"measured"`` or ``"cet"``.
    record : dict
        ``chose``, ``reason`` and the ``estimated_forward_passes`` of both candidates.
    """
    shares = _suffix_shares(obj)
    channels = np.array([info.channels for info in obj.layers], dtype=float)
    weight = channels if per_channel else np.ones_like(shares)
    units = int(weight.sum())
    measured = 2.0 + bits * float((weight * shares).sum())
    used = _cet_probes(units, probes, rounds)
    cet = GRADIENT_PASSES + bits * used * HVP_PASSES
    method = "measured" if measured <= cet else "cet"
    what = "channels" if per_channel else "layers"
    reason = (
        f"{method}: about {min(measured, cet):.0f} forward passes against "
        f"{max(measured, cet):.0f} for {'cet' if method == 'measured' else 'measured'} "
        f"({units} {what} x {bits} bit widths; cet at {used} probes); of the estimators whose "
        "plans match measured's on the zoo (measured, cet) it is the cheaper"
    )
    record = {
        "chose": method,
        "reason": reason,
        "estimated_forward_passes": {"measured": measured, "cet": cet},
        "cet_probes": used,
    }
    return method, record
