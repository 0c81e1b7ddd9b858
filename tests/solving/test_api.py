import threading

import numpy as np
import pytest

import cetopt
from cetopt.errors import ProblemError, SolverUnavailableError
from cetopt.testing.solver_contract import market_split, multiple_choice_knapsack


def knapsack(seed=0, groups=20, options=5):
    rng = np.random.default_rng(seed)
    w = rng.integers(1, 20, (groups, options)).astype(float)
    v = rng.uniform(0, 10, (groups, options))
    return multiple_choice_knapsack(v, w, w.min(1).sum() + 30)


class Crashing(cetopt.Solver):
    name = "crashing"

    def solve(self, problem, time_limit=None, mip_gap=None):
        raise RuntimeError("segfault in the solver, simulated")


class WrongReturn(cetopt.Solver):
    name = "wrong-return"

    def solve(self, problem, time_limit=None, mip_gap=None):
        return {"status": "optimal"}


class LpOnly(cetopt.Solver):
    name = "lp-only"
    capabilities = cetopt.Capabilities(mip=False)

    def solve(self, problem, time_limit=None, mip_gap=None):
        raise AssertionError("must not be called on a MIP")


class Missing(LpOnly):
    name = "missing-dependency"

    @classmethod
    def available(cls):
        return False


def test_crashing_solver_gives_error_status_with_its_message():
    sol = cetopt.solve(knapsack(), Crashing)
    assert sol.status == "error" and "segfault in the solver" in sol.message and sol.x is None


def test_non_solution_return_is_an_error_status():
    sol = cetopt.solve(knapsack(), WrongReturn)
    assert sol.status == "error" and "not a cetopt.Solution" in sol.message


def test_capabilities_are_checked_before_the_call():
    with pytest.raises(SolverUnavailableError, match="LPs only"):
        cetopt.solve(knapsack(), LpOnly)
    with pytest.raises(SolverUnavailableError, match="cannot run here"):
        cetopt.solve(knapsack(), Missing)
    with pytest.raises(SolverUnavailableError, match="no native options"):
        cetopt.solve(knapsack(), Crashing, options={"threads": 1})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(time_limit=0), "time_limit"),
        (dict(time_limit=float("nan")), "time_limit"),
        (dict(mip_gap=-1), "mip_gap"),
        (dict(start=np.zeros(3)), "start has shape"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        cetopt.solve(knapsack(), **kwargs)


def test_problem_type_is_checked():
    with pytest.raises(ProblemError, match=r"cetopt\.MILP"):
        cetopt.solve({"c": [1]})


def test_unknown_highs_option_is_reported_as_error():
    sol = cetopt.solve(knapsack(), "highs", options={"no_such_option": 1})
    assert sol.status == "error" and "no_such_option" in sol.message


def test_warm_start_reaches_highs_and_keeps_the_optimum():
    p = knapsack(seed=3)
    cold = cetopt.solve(p, mip_gap=0)
    warm = cetopt.solve(p, mip_gap=0, start=cold.x)
    assert warm.status == "optimal" and warm.objective == pytest.approx(cold.objective)


def test_solve_many_matches_serial_and_keeps_order():
    problems = [knapsack(seed=s) for s in range(6)]
    seen = []
    lock = threading.Lock()

    def done(i, sol):
        with lock:
            seen.append(i)

    parallel = cetopt.solve_many(problems, mip_gap=0, workers=2, on_done=done)
    serial = [cetopt.solve(p, mip_gap=0) for p in problems]
    assert sorted(seen) == list(range(6))
    assert [s.objective for s in parallel] == pytest.approx([s.objective for s in serial])


def test_time_limit_never_reports_optimal_on_highs():
    sol = cetopt.solve(market_split(5), "highs", time_limit=0.3)
    assert sol.status == "time_limit" and sol.bound is not None and sol.x is not None
    assert sol.bound <= sol.objective
