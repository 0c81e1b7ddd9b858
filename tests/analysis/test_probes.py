"""The sign designs behind the ``cet`` estimator's Hessian-vector probes."""

from __future__ import annotations

import numpy as np
import pytest

from cetopt.analysis.probes import probe_design


@pytest.mark.parametrize("units", [1, 3, 8, 13])
def test_an_affordable_design_is_one_orthogonal_round(units):
    design = probe_design(units, probes=16, rounds=2, rng=np.random.default_rng(0))
    signs = design.signs.double().numpy()
    assert design.exact and design.probes == 1 << max(units - 1, 0).bit_length()
    # Σ_p s_pu s_pm = 0 for u ≠ m: every cross term cancels
    np.testing.assert_array_equal(signs.T @ signs, design.probes * np.eye(units))


def test_a_design_below_exactness_uses_independent_rounds_of_a_power_of_two():
    design = probe_design(200, probes=64, rounds=2, rng=np.random.default_rng(1))
    assert not design.exact and design.probes == 64
    assert np.bincount(design.rounds).tolist() == [32, 32]
    signs = design.signs.double().numpy()
    for r in range(2):
        block = signs[design.rounds == r]
        gram = np.abs(block.T @ block)
        # within a round units are either in one group (fully correlated) or orthogonal
        assert set(np.unique(gram)) == {0.0, 32.0}
        # round robin: 200 units over 32 groups puts at most 7 units in a group
        assert (gram == 32).sum(axis=1).max() == 7


def test_units_a_round_robin_keeps_apart_never_share_a_group():
    design = probe_design(100, probes=32, rounds=1, rng=np.random.default_rng(2))
    signs = design.signs.double().numpy()
    gram = signs.T @ signs
    for u in range(100 - 31):
        np.testing.assert_array_equal(gram[u, u + 1 : u + 32], 0)


def test_the_design_is_reproducible_from_its_generator():
    a = probe_design(50, 16, 2, np.random.default_rng(3)).signs
    b = probe_design(50, 16, 2, np.random.default_rng(3)).signs
    assert bool((a == b).all())
