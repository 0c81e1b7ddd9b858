"""The HiGHS backend's early-stop options used by LEO: stop on the dual bound or on an incumbent."""

import numpy as np
import pytest

import cetopt
from cetopt import MILP


def _knapsack(n: int = 60, seed: int = 0) -> MILP:
    rng = np.random.default_rng(seed)
    w = rng.uniform(1, 10, n)
    v = w + rng.uniform(-1, 1, n)
    return MILP(
        c=v,
        A=w[None, :],
        row_upper=[w.sum() / 3],
        col_lower=np.zeros(n),
        col_upper=np.ones(n),
        integrality=np.ones(n, bool),
        sense="max",
    )


@pytest.fixture(scope="module")
def optimum():
    sol = cetopt.solve(_knapsack(), "highs")
    assert sol.status == "optimal"
    return sol.objective


def test_stops_once_the_bound_proves_the_threshold(optimum):
    threshold = optimum + 5.0  # the root bound is already below it
    sol = cetopt.solve(_knapsack(), "highs", options={"interrupt_on_bound": threshold})
    assert sol.status == "stopped"
    assert sol.bound < threshold


def test_stops_at_the_first_good_enough_incumbent(optimum):
    threshold = optimum - 20.0
    sol = cetopt.solve(_knapsack(), "highs", options={"interrupt_on_objective": threshold})
    assert sol.status == "stopped"
    assert sol.objective > threshold and sol.bound >= optimum - 1e-6


def test_minimisation_uses_the_mirrored_tests(optimum):
    p = _knapsack()
    flipped = MILP(
        c=-p.c,
        A=p.A,
        row_upper=p.row_upper,
        col_lower=p.col_lower,
        col_upper=p.col_upper,
        integrality=p.integrality,
        sense="min",
    )
    sol = cetopt.solve(flipped, "highs", options={"interrupt_on_bound": -optimum - 5.0})
    assert sol.status == "stopped" and sol.bound > -optimum - 5.0


def test_parallel_workers_give_the_same_decisions():
    from tests.leo.nets import tiny_mlp

    model = tiny_mlp(1, widths=(6, 6, 6, 6))
    one = cetopt.find_stable_units(model, (-1.0, 1.0), stages=("interval", "milp"), workers=1)
    two = cetopt.find_stable_units(model, (-1.0, 1.0), stages=("interval", "milp"), workers=2)
    assert all(np.array_equal(a.state, b.state) for a, b in zip(one.layers, two.layers))
