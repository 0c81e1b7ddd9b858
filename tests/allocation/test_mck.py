import numpy as np
import pytest

import cetopt
from cetopt.allocation import mck_greedy
from cetopt.testing.solver_contract import multiple_choice_knapsack


@pytest.mark.parametrize("seed", range(40))
def test_lp_bound_equals_the_lp_relaxation_and_choice_is_feasible(seed):
    rng = np.random.default_rng(seed)
    groups, options = rng.integers(1, 10), rng.integers(1, 7)
    weight = rng.integers(1, 20, (groups, options)).astype(float)
    cost = rng.uniform(-2, 10, (groups, options))
    if seed % 3 == 0:
        cost = np.round(cost)  # ties
    allowed = rng.random((groups, options)) < 0.8
    allowed[np.arange(groups), rng.integers(0, options, groups)] = True
    budget = float(np.where(allowed, weight, np.inf).min(axis=1).sum() + rng.integers(0, 40))
    result = mck_greedy(cost, weight, budget, allowed)
    problem = multiple_choice_knapsack(cost, weight, budget, sense="min")
    problem = cetopt.MILP(
        c=problem.c,
        A=problem.A,
        row_lower=problem.row_lower,
        row_upper=problem.row_upper,
        col_upper=allowed.ravel().astype(float),
        integrality=problem.integrality,
    )
    lp = cetopt.solve(problem.relaxation())
    ip = cetopt.solve(problem, mip_gap=0)
    assert result.feasible
    assert result.lp_bound == pytest.approx(lp.objective, abs=1e-7)
    assert result.weight <= budget + 1e-9 and allowed[np.arange(groups), result.choice].all()
    assert result.cost >= ip.objective - 1e-9 >= result.lp_bound - 1e-7


def test_infeasible_budget_is_reported():
    result = mck_greedy(np.ones((2, 2)), np.array([[3.0, 4.0], [5.0, 6.0]]), 7.0)
    assert not result.feasible and result.min_weight == 8.0
