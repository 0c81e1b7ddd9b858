"""Sign designs for the ``cet`` estimator's Hessian-vector probes.

The quadratic term of unit ``u`` (a layer, or one output channel) is ``Δ_uᵀ H_uu Δ_u``. One HVP
along ``Σ_u s_u Δ_u`` gives every unit ``s_u Δ_uᵀ (H Σ_m s_m Δ_m) = Δ_uᵀH_uuΔ_u + Σ_{m≠u} s_u s_m
Δ_uᵀH_umΔ_m``, and averaging over probes cancels the cross terms when ``Σ_p s_pu s_pm = 0``.

Independent random signs cancel them only on average. Here each round of ``G`` probes (``G`` a
power of two) puts the units into ``G`` groups, round-robin from a random offset, and gives unit
``u`` the signs ``d_u · Hadamard_G[:, group(u)]`` with a random ``d_u = ±1``: the Hadamard columns
are orthogonal, so the cross terms between groups cancel exactly, and those inside a group (units
a round-robin puts ``G`` apart, so never two channels of a layer with at most ``G`` channels) have
zero mean over ``d``. When ``G`` reaches the number of units every unit has its own group and one
round is exact. Otherwise several independent rounds give the standard error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import hadamard

__all__ = ["ProbeDesign", "probe_design"]


@dataclass(frozen=True)
class ProbeDesign:
    """Signs of every probe (rows) for every unit (columns), and the round each probe belongs to."""

    signs: torch.Tensor
    rounds: np.ndarray
    exact: bool

    @property
    def probes(self) -> int:
        return int(self.signs.shape[0])


def _floor_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _ceil_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def probe_design(units: int, probes: int, rounds: int, rng: np.random.Generator) -> ProbeDesign:
    """Signs for at most ``probes`` HVPs over ``units`` units.

    Parameters
    ----------
    units : int
        Number of units whose quadratic terms are wanted.
    probes : int
        HVP budget.
    rounds : int
        Independent rounds when the budget cannot make the estimate exact (at least 2 gives a
        standard error).
    rng : numpy.random.Generator

    Returns
    -------
    ProbeDesign
        One exact round of ``2^⌈log2 units⌉`` probes when that fits in ``probes``; otherwise
        ``rounds`` rounds of ``G`` probes each, ``G`` the largest power of two with
        ``rounds · G ≤ probes`` (``G = 1`` is the plain independent-sign estimator).
    """
    if _ceil_pow2(units) <= probes:
        size, rounds, exact = _ceil_pow2(units), 1, True
    else:
        rounds = max(min(int(rounds), int(probes)), 1)
        size, exact = _floor_pow2(probes // rounds), False
    table = hadamard(size)
    blocks = []
    for _ in range(rounds):
        groups = (np.arange(units) + rng.integers(size)) % size
        blocks.append(table[:, groups] * rng.choice([-1, 1], size=units))
    signs = torch.as_tensor(np.concatenate(blocks), dtype=torch.float32)
    return ProbeDesign(signs, np.repeat(np.arange(rounds), size), exact)
