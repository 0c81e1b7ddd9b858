"""Issue 16, defect 2: a solver's answer is never used unchecked (one check in cetopt.solve)."""

import numpy as np
import pytest

import cetopt
from cetopt.errors import SolverFailedError
from cetopt.testing.misbehaving import MISBEHAVIOURS, wrap
from cetopt.testing.solver_contract import multiple_choice_knapsack


def knapsack():
    rng = np.random.default_rng(0)
    w = rng.integers(1, 20, (6, 4)).astype(float)
    v = rng.uniform(0, 10, (6, 4))
    return multiple_choice_knapsack(v, w, w.min(1).sum() + 10)


class Liar(cetopt.Solver):
    """A plugin that returns whatever `answer(problem, honest)` says, with status optimal."""

    name = "liar"
    capabilities = cetopt.Capabilities(mip=True, dual_bound=True)
    answer = staticmethod(lambda problem, honest: {})

    def solve(self, problem, time_limit=None, mip_gap=None):
        honest = cetopt.solve(problem, "highs", mip_gap=0.0)
        fields = {"x": honest.x, "objective": honest.objective, "bound": honest.bound}
        fields.update(self.answer(problem, honest))
        return cetopt.Solution(status="optimal", solver=self.name, **fields)


def liar(answer):
    return type("Liar", (Liar,), {"answer": staticmethod(answer)})


LIES = {
    "wrong-shape": lambda p, h: {"x": h.x[:-1]},
    "nan": lambda p, h: {"x": np.where(np.arange(p.num_cols) == 0, np.nan, h.x)},
    "objective": lambda p, h: {"objective": h.objective + 3.0},
    "infeasible": lambda p, h: {"x": np.ones(p.num_cols), "objective": float(p.c.sum())},
    "bound-side": lambda p, h: {"bound": h.objective - 5.0},  # a max problem: bound below the point
    "fractional": lambda p, h: {"x": h.x * 0.5, "objective": 0.5 * h.objective},
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_answer_becomes_error_with_the_raw_answer_kept(lie):
    problem = knapsack()
    sol = cetopt.solve(problem, liar(LIES[lie]))
    assert sol.status == "error", (lie, sol.message)
    assert sol.x is None and "rejected" in sol.message
    assert sol.raw is not None and sol.raw.status == "optimal"


def test_an_honest_answer_is_verified_and_its_objective_recomputed():
    problem = knapsack()
    sol = cetopt.solve(problem, liar(lambda p, h: {"objective": h.objective * (1 + 1e-13)}))
    assert sol.status == "optimal" and sol.verified
    assert sol.objective == problem.objective_value(sol.x)


@pytest.mark.parametrize("case", MISBEHAVIOURS, ids=lambda c: c.cls.__name__)
def test_every_misbehaving_fixture_gets_its_documented_status(case):
    limit = 0.2 if case.cls.__name__ == "Slow" else None
    sol = cetopt.solve(knapsack(), wrap(case.cls, "highs"), time_limit=limit, mip_gap=0.0)
    assert sol.status == case.status and case.message.lower() in sol.message.lower()


class RaisesInInit(cetopt.Solver):
    name = "raises-in-init"

    def __init__(self):
        raise RuntimeError("licence server unreachable")

    def solve(self, problem, time_limit=None, mip_gap=None):
        raise AssertionError


class RaisesInAvailable(cetopt.Solver):
    name = "raises-in-available"

    @classmethod
    def available(cls):
        raise OSError("library not loadable")

    def solve(self, problem, time_limit=None, mip_gap=None):
        raise AssertionError


@pytest.mark.parametrize("backend", [RaisesInInit, RaisesInAvailable])
def test_a_backend_that_raises_before_solving_gives_status_error(backend):
    sol = cetopt.solve(knapsack(), backend)
    assert sol.status == "error" and ("licence" in sol.message or "not loadable" in sol.message)


def test_an_optimal_mip_with_a_gap_above_the_requested_one_is_stopped():
    # the bound is valid (max problem, bound above the point) but 5 % away
    wide = liar(lambda p, h: {"bound": h.objective * 1.05})
    sol = cetopt.solve(knapsack(), wide, mip_gap=1e-4)
    assert sol.status == "stopped" and "gap" in sol.message and sol.raw.status == "optimal"
    assert cetopt.solve(knapsack(), wide, mip_gap=0.1).status == "optimal"


def test_an_over_budget_point_never_becomes_a_plan():
    from cetopt.analysis import SensitivityTable

    table = SensitivityTable(
        layers=["a", "b", "c"],
        bits=[2, 4, 8],
        values=np.array([[3.0, 1.0, 0.1], [5.0, 2.0, 0.2], [4.0, 1.5, 0.3]]),
        params=np.array([1000, 2000, 1500]),
    )
    greedy_all_8 = liar(lambda p, h: {"x": np.tile([0.0, 0.0, 1.0], 3), "objective": None, "bound": None})
    with pytest.raises(SolverFailedError):
        cetopt.allocate(table, budget=1500, solver=greedy_all_8, use_greedy=False)
