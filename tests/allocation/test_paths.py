"""The greedy, Lagrangian and core-MILP paths against exact answers, and the status rule."""

import itertools

import numpy as np
import pytest

import cetopt
from cetopt.allocation import allocate, choose_options, mck_greedy, option_bytes
from cetopt.allocation.lagrange import lagrangian_mck
from cetopt.errors import SolverFailedError
from tests.allocation.conftest import random_table


def _brute(cost, resources, limits):
    groups, options = cost.shape
    best, arg = np.inf, None
    rows = np.arange(groups)
    for choice in itertools.product(range(options), repeat=groups):
        c = np.array(choice)
        if all(r[rows, c].sum() <= b * (1 + 1e-12) for r, b in zip(resources, limits)):
            total = cost[rows, c].sum()
            if total < best:
                best, arg = total, c
    return best, arg


def _degenerate_table(seed):
    rng = np.random.default_rng(seed)
    table = random_table(layers=5, seed=seed)
    values = table.values.copy()
    kind = seed % 4
    if kind == 0:
        values[0] = values[0, 0]  # equal costs in a row
    elif kind == 1:
        values[1] = np.round(values[1] * 1e3) / 1e3  # near-ties
    elif kind == 2:
        values[2, 1:] = values[2, 0] + 1.0  # every option dominated by the lightest
    params = table.params.copy()
    if kind == 3:
        params[3] = 1  # equal sizes: ceil(1 * bits / 8) == 1 for every width
    return cetopt.SensitivityTable(
        layers=table.layers,
        bits=table.bits,
        values=values + rng.normal(0, 1e-9, values.shape) * (kind == 1),
        params=params,
        channels=table.channels,
        macs=table.macs,
    )


def _extra(table, seed):
    bits = np.array(table.bits, dtype=float)
    bops = table.macs[:, None] * bits[None, :] * 32
    latency = np.random.default_rng(seed).uniform(0.5, 2.0, table.values.shape) * bits[None, :]
    return [(bops, 0.55 * bops[:, -1].sum()), (latency, 0.6 * latency[:, -1].sum())]


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("rows", ["bytes", "bytes+bops+latency"])
def test_every_path_is_within_its_certified_gap_of_brute_force(seed, rows):
    table = _degenerate_table(seed)
    extra = _extra(table, seed) if rows != "bytes" else []
    kwargs = {}
    if extra:
        kwargs = dict(bops_budget=extra[0][1], latency=extra[1][0], latency_budget=extra[1][1])
    min_bits = {"l4": 3} if seed % 3 == 0 else None
    max_bits = 6 if seed % 5 == 0 else None
    budget = ["9x", "6x", "4.5bits"][seed % 3]
    plan = allocate(table, budget, min_bits=min_bits, max_bits=max_bits, **kwargs)
    allowed = cetopt.allocation.inputs.bit_limits(table, min_bits, max_bits)
    cost = np.where(allowed, table.values, 1e9)
    best, _ = _brute(
        cost, [option_bytes(table), *[a for a, _ in extra]], [plan.budget_bytes, *[b for _, b in extra]]
    )
    assert plan.bytes <= plan.budget_bytes
    for (_, limit), total in zip(extra, [plan.bops, plan.latency]):
        assert total <= limit * (1 + 1e-12)
    assert plan.bound <= best + 1e-12 * abs(best)
    assert plan.predicted_loss >= best - 1e-12 * abs(best)
    assert plan.predicted_loss - best <= plan.gap * abs(plan.predicted_loss) + 1e-15
    assert (plan.status == "optimal") == (plan.gap <= 1e-4 + 1e-9)
    assert plan.status == "optimal"  # small problems: the core MILP closes the gap


@pytest.mark.parametrize("seed", range(4))
def test_ties_hold_on_the_lagrangian_path(seed):
    table = random_table(layers=300, seed=seed)
    (_, bl), (lat, ll) = _extra(table, seed)
    ties = [["l0", "l7", "l9"], ["l9", "l12"], ["l20", "l21"]]
    kw = dict(bops_budget=bl, latency=lat, latency_budget=ll, ties=ties, min_bits={"l3": 5})
    plan = allocate(table, "7x", mip_gap=1e-3, **kw)
    exact = allocate(table, "7x", use_greedy=False, mip_gap=1e-9, **kw)
    assert plan.bits["l0"] == plan.bits["l7"] == plan.bits["l9"] == plan.bits["l12"]
    assert plan.bits["l20"] == plan.bits["l21"] and plan.bits["l3"] >= 5
    assert plan.bound <= exact.predicted_loss * (1 + 1e-9)
    assert plan.predicted_loss <= exact.predicted_loss * (1 + 1e-3) + 1e-15
    assert plan.bytes <= plan.budget_bytes and plan.bops <= bl and plan.latency <= ll * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_bound_is_the_lp_relaxation_and_its_plan_is_feasible(seed):
    table = random_table(layers=60, seed=seed)
    extra = _extra(table, seed)
    size = option_bytes(table)
    budget = 4 * table.params.sum() / 7
    resources, limits = [size, *[a for a, _ in extra]], [budget, *[b for _, b in extra]]
    allowed = np.ones(size.shape, dtype=bool)
    result = lagrangian_mck(table.values, resources, limits, allowed, target_gap=0.0, max_evaluations=200)
    from cetopt.allocation.search import _milp

    lp = cetopt.solve(_milp(table.values, resources, np.array(limits), allowed).relaxation())
    assert result.bound <= lp.objective + 1e-9 * abs(lp.objective)
    assert result.bound >= lp.objective - 1e-6 * abs(lp.objective)
    rows = np.arange(size.shape[0])
    assert all(r[rows, result.choice].sum() <= b * (1 + 1e-12) for r, b in zip(resources, limits))


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_greedy_matches_the_milp_on_big_random_tables(seed):
    rng = np.random.default_rng(seed)
    groups, options = 500, 6
    weight = np.sort(rng.integers(1, 50, (groups, options)), axis=1).astype(float)
    cost = np.sort(rng.random((groups, options)), axis=1)[:, ::-1].copy()
    if seed % 2:
        cost = np.round(cost, 1)  # many ties
    allowed = rng.random((groups, options)) < 0.85
    allowed[:, 0] = True
    budget = float(weight[:, 0].sum() + 0.5 * (weight[:, -1] - weight[:, 0]).sum())
    greedy = mck_greedy(cost, weight, budget, allowed)
    exact = choose_options(cost, weight, budget, allowed=allowed, use_greedy=False, mip_gap=0.0)
    best = cost[np.arange(groups), exact.choice].sum()
    assert greedy.lp_bound <= best + 1e-9 and greedy.cost >= best - 1e-9
    assert greedy.weight <= budget and allowed[np.arange(groups), greedy.choice].all()
    fast = choose_options(cost, weight, budget, allowed=allowed, mip_gap=0.0)
    assert cost[np.arange(groups), fast.choice].sum() == pytest.approx(best, rel=1e-9)


class _Wrapped(cetopt.Solver):
    """HiGHS underneath, with its answer bent by ``mode``."""

    name = "bent"
    capabilities = cetopt.Capabilities(mip=True, time_limit=True, dual_bound=True)

    def __init__(self, mode):
        self.mode, self.calls = mode, 0

    def solve(self, problem, time_limit=None, mip_gap=None):
        self.calls += 1
        true = cetopt.solve(problem, "highs", time_limit, mip_gap)
        groups = int(np.count_nonzero(problem.row_lower == 1))  # the one-hot rows
        if self.mode == "loose":
            return cetopt.Solution(
                status="optimal",
                x=true.x,
                objective=true.objective,
                bound=true.objective - 0.5 * abs(true.objective),
                solver=self.name,
            )
        if self.mode == "stopped":
            return cetopt.Solution(status="stopped", x=true.x, objective=true.objective, solver=self.name)
        if self.mode == "error":
            return cetopt.Solution(status="error", message="bent", solver=self.name)
        x = np.zeros(problem.num_cols).reshape(groups, -1)
        allowed = problem.col_upper.reshape(groups, -1) > 0
        if self.mode == "two_hot":
            x[:, :] = allowed
        else:  # "over": the most expensive allowed option everywhere (breaks the byte budget)
            x[np.arange(groups), allowed.shape[1] - 1 - np.argmax(allowed[:, ::-1], axis=1)] = 1
        return cetopt.Solution(
            status="optimal", x=x.ravel(), objective=problem.objective_value(x.ravel()), solver=self.name
        )


def _uncertified_table():
    table = random_table(layers=6, seed=11)
    assert mck_greedy(table.values, option_bytes(table), 4 * table.params.sum() / 7).gap > 1e-4
    return table


def test_a_loose_optimal_is_not_optimal():
    solver = _Wrapped("loose")
    plan = allocate(_uncertified_table(), "7x", solver=solver, use_greedy=False)
    assert solver.calls == 1
    # the greedy's own bound may still certify it; otherwise the plan must say stopped
    assert (plan.status == "optimal") == (plan.gap <= 1e-4 + 1e-9)


def test_a_stopped_solve_comes_back_stopped_with_its_gap():
    solver = _Wrapped("stopped")
    plan = allocate(_uncertified_table(), "7x", solver=solver, use_greedy=False, mip_gap=0.0)
    assert solver.calls == 1
    assert plan.status in ("stopped", "optimal") and plan.gap is not None
    assert (plan.status == "optimal") == (plan.gap <= 1e-9)


def test_an_error_raises():
    with pytest.raises(SolverFailedError):
        allocate(_uncertified_table(), "7x", solver=_Wrapped("error"), use_greedy=False)


def test_an_x_that_is_not_one_hot_raises():
    with pytest.raises(SolverFailedError, match=r"one-hot|row 0: A x"):
        allocate(_uncertified_table(), "7x", solver=_Wrapped("two_hot"), use_greedy=False)


def test_an_over_budget_x_is_never_returned():
    # cetopt.solve's answer check rejects the over-budget point before allocate sees it
    with pytest.raises(SolverFailedError, match="outside"):
        allocate(_uncertified_table(), "7x", solver=_Wrapped("over"), use_greedy=False)


def test_pareto_reuses_one_setup_and_matches_single_allocations():
    table = random_table(layers=200, seed=3)
    (_, bl), (lat, ll) = _extra(table, 3)
    kw = dict(bops_budget=bl, latency=lat, latency_budget=ll)
    budgets = ["12x", "9x", "7x", "5x"]
    front = cetopt.pareto(table, budgets, **kw)
    singles = sorted((allocate(table, b, **kw) for b in budgets), key=lambda p: p.budget_bytes)
    for p, q in zip(front.plans, singles):
        assert p.budget_bytes == q.budget_bytes and p.bytes <= p.budget_bytes
        assert p.predicted_loss == pytest.approx(q.predicted_loss, rel=2e-4)
        assert p.status == "optimal" and p.gap <= 1e-4 + 1e-9
