"""The contract every solver backend must meet, as plain check functions.

Each check takes a backend (a registered name, a :class:`cetopt.Solver` class or instance) and
raises ``AssertionError`` when the backend breaks the contract. cetopt runs them against every
built-in backend; a plugin author runs them against their own::

    import pytest
    from cetopt.testing import CONTRACT_CHECKS

    @pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda c: c.__name__)
    def test_my_solver_meets_the_contract(check):
        check(MySolver)

The reference answers come from independent computations (dynamic programming, enumeration), not
from another solver.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.sparse as sp

from cetopt.problem import MILP, Status
from cetopt.solving import get_solver, solve
from cetopt.testing.misbehaving import check_misbehaviour_is_caught

__all__ = [
    "CONTRACT_CHECKS",
    "check_bounds_respected",
    "check_dual_bound_valid",
    "check_infeasible",
    "check_lp_optimum",
    "check_maximize_and_offset",
    "check_misbehaviour_is_caught",
    "check_multiple_choice_knapsack",
    "check_time_limit_on_hard_instance",
    "check_unbounded",
    "check_warm_start",
    "market_split",
    "mck_by_dynamic_programming",
    "multiple_choice_knapsack",
]

TOL = 1e-6


def multiple_choice_knapsack(
    values: np.ndarray, weights: np.ndarray, budget: float, *, sense: str = "max"
) -> MILP:
    """Pick one option per group (rows of ``values``/``weights``) with total weight ≤ ``budget``."""
    groups, options = values.shape
    n = groups * options
    one_hot = sp.csr_matrix(
        (np.ones(n), (np.repeat(np.arange(groups), options), np.arange(n))), shape=(groups, n)
    )
    A = sp.vstack([one_hot, sp.csr_matrix(weights.reshape(1, n))]).tocsr()
    row_lower = np.concatenate([np.ones(groups), [-np.inf]])
    row_upper = np.concatenate([np.ones(groups), [budget]])
    return MILP(
        c=values.ravel(),
        A=A,
        row_lower=row_lower,
        row_upper=row_upper,
        col_upper=np.ones(n),
        integrality=np.ones(n, dtype=bool),
        sense=sense,
    )


def mck_by_dynamic_programming(values: np.ndarray, weights: np.ndarray, budget: int) -> float:
    """Exact optimum of a max multiple-choice knapsack with non-negative integer weights (or −inf)."""
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    for v_row, w_row in zip(values, weights.astype(int)):
        nxt = np.full(budget + 1, -np.inf)
        for v, w in zip(v_row, w_row):
            if w <= budget:
                nxt[w:] = np.maximum(nxt[w:], best[: budget + 1 - w] + v)
        best = nxt
    return float(best.max())


def market_split(rows: int = 5, seed: int = 0) -> MILP:
    """Cornuéjols–Dawande market split, optimization form: min total slack of Σ a_ij x_j = d_i.

    Any 0/1 point is feasible, but proving the optimum takes branch and bound far longer than a
    second, so it exercises the time-limit path with an incumbent attached.
    """
    rng = np.random.default_rng(seed)
    n = 10 * (rows - 1)
    a = rng.integers(0, 100, (rows, n)).astype(float)
    d = np.floor(a.sum(axis=1) / 2)
    A = sp.hstack([sp.csr_matrix(a), sp.eye(rows), -sp.eye(rows)]).tocsr()
    c = np.concatenate([np.zeros(n), np.ones(2 * rows)])
    upper = np.concatenate([np.ones(n), np.full(2 * rows, np.inf)])
    integer = np.concatenate([np.ones(n, dtype=bool), np.zeros(2 * rows, dtype=bool)])
    return MILP(c=c, A=A, row_lower=d, row_upper=d, col_upper=upper, integrality=integer)


def _assert_feasible(problem: MILP, solution, tol: float = 1e-5) -> None:
    assert solution.x is not None, (
        f"{solution.solver}: no point attached to a {solution.status.value} solution"
    )
    assert solution.x.shape == (problem.num_cols,), f"x has shape {solution.x.shape}"
    worst = problem.violation(solution.x)
    assert worst <= tol, f"{solution.solver}: solution violates the problem by {worst:g}"
    assert abs(problem.objective_value(solution.x) - solution.objective) <= 1e-6 * max(
        1, abs(solution.objective)
    )


def _assert_bound_side(problem: MILP, solution) -> None:
    if solution.bound is None or solution.objective is None:
        return
    slack = 1e-6 * max(1.0, abs(solution.objective))
    if problem.sense == "min":
        assert solution.bound <= solution.objective + slack, (
            f"bound {solution.bound} > objective {solution.objective}"
        )
    else:
        assert solution.bound >= solution.objective - slack, (
            f"bound {solution.bound} < objective {solution.objective}"
        )


def check_multiple_choice_knapsack(solver) -> None:
    """Random multiple-choice knapsacks: the optimum equals dynamic programming's."""
    rng = np.random.default_rng(7)
    for trial in range(6):
        groups, options = rng.integers(3, 9), rng.integers(2, 6)
        weights = rng.integers(1, 20, (groups, options)).astype(float)
        values = np.round(rng.uniform(0, 10, (groups, options)), 3)
        budget = int(weights.min(axis=1).sum() + rng.integers(0, 30))
        problem = multiple_choice_knapsack(values, weights, budget)
        solution = solve(problem, solver, mip_gap=0.0)
        expected = mck_by_dynamic_programming(values, weights, budget)
        assert solution.status == Status.OPTIMAL, f"trial {trial}: status {solution.status.value}"
        _assert_feasible(problem, solution)
        assert abs(solution.objective - expected) <= TOL * max(1, abs(expected)), (
            f"trial {trial}: objective {solution.objective} but dynamic programming gives {expected}"
        )


def check_bounds_respected(solver) -> None:
    """General integers with negative and fractional bounds: the point respects every bound."""
    rng = np.random.default_rng(3)
    for _ in range(4):
        n, m = 5, 3
        lower = np.round(rng.uniform(-5, 0, n), 1)
        upper = lower + np.round(rng.uniform(0.5, 4, n), 1)
        integer = rng.random(n) < 0.6
        A = sp.csr_matrix(np.round(rng.uniform(-3, 3, (m, n)), 2))
        mid = A @ ((lower + upper) / 2)
        problem = MILP(
            c=np.round(rng.uniform(-2, 2, n), 2),
            A=A,
            row_lower=mid - 3,
            row_upper=mid + 3,
            col_lower=lower,
            col_upper=upper,
            integrality=integer,
        )
        solution = solve(problem, solver, mip_gap=0.0)
        assert solution.status == Status.OPTIMAL, f"status {solution.status.value}"
        _assert_feasible(problem, solution)
        expected = _enumerate_optimum(problem)
        if expected is not None:
            assert solution.objective <= expected + 1e-6


def _enumerate_optimum(problem: MILP) -> float | None:
    """Best grid point (integers enumerated, continuous columns at a bound): an upper bound on the min."""
    cols = [
        np.arange(np.ceil(lo), np.floor(up) + 1) if is_int else np.array([lo, up])
        for lo, up, is_int in zip(problem.col_lower, problem.col_upper, problem.integrality)
    ]
    best = None
    for point in itertools.product(*cols):
        x = np.array(point, dtype=float)
        if problem.violation(x) <= 1e-9:
            value = problem.objective_value(x)
            best = value if best is None else min(best, value)
    return best


def check_infeasible(solver) -> None:
    """x + y ≥ 3 with x, y ∈ {0, 1}: status ``infeasible``, as a MIP and as an LP."""
    for integer in (True, False):
        problem = MILP(
            c=[1.0, 1.0],
            A=sp.csr_matrix([[1.0, 1.0]]),
            row_lower=[3.0],
            row_upper=[np.inf],
            col_upper=[1.0, 1.0],
            integrality=[integer, integer],
        )
        solution = solve(problem, solver)
        assert solution.status == Status.INFEASIBLE, f"integer={integer}: status {solution.status.value}"


def check_unbounded(solver) -> None:
    """max x + y with x − y ≤ 1, x, y ≥ 0: status ``unbounded``, as a MIP and as an LP."""
    for integer in (True, False):
        problem = MILP(
            c=[1.0, 1.0],
            A=sp.csr_matrix([[1.0, -1.0]]),
            row_upper=[1.0],
            integrality=[integer, False],
            sense="max",
        )
        solution = solve(problem, solver)
        assert solution.status == Status.UNBOUNDED, f"integer={integer}: status {solution.status.value}"


def check_lp_optimum(solver) -> None:
    """A small LP with a known vertex optimum (x = 2, y = 2, objective −10)."""
    problem = MILP(c=[-2.0, -3.0], A=sp.csr_matrix([[1.0, 1.0], [1.0, 3.0]]), row_upper=[4.0, 8.0])
    solution = solve(problem, solver)
    assert solution.status == Status.OPTIMAL, f"status {solution.status.value}"
    _assert_feasible(problem, solution)
    assert abs(solution.objective - (-10.0)) <= 1e-6
    assert np.allclose(solution.x, [2.0, 2.0], atol=1e-6)


def check_maximize_and_offset(solver) -> None:
    """Sense ``max`` and the objective offset are honoured."""
    values = np.array([[1.0, 4.0, 6.0], [2.0, 3.0, 7.0]])
    weights = np.array([[1.0, 3.0, 5.0], [1.0, 2.0, 6.0]])
    base = multiple_choice_knapsack(values, weights, 7)
    problem = MILP(
        c=base.c,
        A=base.A,
        row_lower=base.row_lower,
        row_upper=base.row_upper,
        col_upper=base.col_upper,
        integrality=base.integrality,
        sense="max",
        offset=10.0,
    )
    solution = solve(problem, solver, mip_gap=0.0)
    assert solution.status == Status.OPTIMAL
    _assert_feasible(problem, solution)
    assert abs(solution.objective - (10.0 + mck_by_dynamic_programming(values, weights, 7))) <= 1e-6
    _assert_bound_side(problem, solution)


def check_time_limit_on_hard_instance(solver) -> None:
    """A market-split instance under a 0.5 s limit: ``time_limit``, never ``optimal``, incumbent feasible."""
    problem = market_split(rows=5)
    solution = solve(problem, solver, time_limit=0.5)
    assert solution.status == Status.TIME_LIMIT, f"status {solution.status.value} ({solution.message})"
    if solution.x is not None:
        _assert_feasible(problem, solution)
        _assert_bound_side(problem, solution)
    assert solution.time < 30, f"the 0.5 s time limit was ignored (took {solution.time:.1f} s)"


def check_dual_bound_valid(solver) -> None:
    """Where a bound is reported, no feasible point beats it (checked against the DP optimum)."""
    rng = np.random.default_rng(11)
    weights = rng.integers(1, 15, (8, 4)).astype(float)
    values = np.round(rng.uniform(0, 10, (8, 4)), 2)
    budget = int(weights.min(axis=1).sum() + 12)
    problem = multiple_choice_knapsack(values, weights, budget)
    solution = solve(problem, solver, mip_gap=0.05)
    assert solution.status == Status.OPTIMAL
    expected = mck_by_dynamic_programming(values, weights, budget)
    _assert_feasible(problem, solution)
    if solution.bound is not None:
        assert solution.bound >= expected - 1e-6, f"bound {solution.bound} cuts off the optimum {expected}"
        assert solution.objective >= (1 - 0.05) * expected - 1e-6
    if get_solver(solver).capabilities.dual_bound:
        assert solution.bound is not None, "the backend declares dual_bound but reported none"


def check_warm_start(solver) -> None:
    """A feasible start is accepted (or ignored by backends without warm starts); the optimum is unchanged."""
    rng = np.random.default_rng(5)
    weights = rng.integers(1, 15, (10, 5)).astype(float)
    values = np.round(rng.uniform(0, 10, (10, 5)), 2)
    budget = int(weights.min(axis=1).sum() + 10)
    problem = multiple_choice_knapsack(values, weights, budget)
    start = np.zeros(problem.num_cols)
    start[np.arange(10) * 5 + weights.argmin(axis=1)] = 1.0
    assert problem.violation(start) == 0.0
    solution = solve(problem, solver, mip_gap=0.0, start=start)
    assert solution.status == Status.OPTIMAL
    _assert_feasible(problem, solution)
    assert abs(solution.objective - mck_by_dynamic_programming(values, weights, budget)) <= 1e-6


CONTRACT_CHECKS = [
    check_multiple_choice_knapsack,
    check_bounds_respected,
    check_infeasible,
    check_unbounded,
    check_lp_optimum,
    check_maximize_and_offset,
    check_time_limit_on_hard_instance,
    check_dual_bound_valid,
    check_warm_start,
    check_misbehaviour_is_caught,
]
