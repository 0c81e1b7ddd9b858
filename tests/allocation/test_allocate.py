import json

import numpy as np
import pytest

import cetopt
from cetopt.allocation import allocate, option_bytes, pareto
from cetopt.errors import InfeasibleBudgetError
from tests.allocation.conftest import BITS, brute_force, random_table
from tests.solvers.scipy_user_solver import ScipyMilpSolver

SOLVERS = ["highs", "cbc", "cvxpy", ScipyMilpSolver]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s if isinstance(s, str) else s.name)
@pytest.mark.parametrize("budget", ["10x", "6x", "4bits"])
def test_ilp_optimum_equals_brute_force_for_every_backend(solver, budget):
    table = random_table(seed=1)
    plan = allocate(table, budget, solver=solver, use_greedy=False, mip_gap=0.0)
    best, _ = brute_force(table, plan.budget_bytes)
    assert plan.status == "optimal" and plan.predicted_loss == pytest.approx(best, rel=1e-9)
    assert plan.bytes <= plan.budget_bytes
    assert plan.bound is None or plan.bound <= plan.predicted_loss + 1e-12


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_loss_increases_far_below_the_solver_tolerances_still_get_the_optimal_plan(solver):
    # real sensitivities are often ~1e-6, below HiGHS's 1e-6 absolute MIP gap and 1e-7 dual tolerance
    rng = np.random.default_rng(0)
    layers, bits = 30, (2, 3, 4, 8)
    values = np.sort(rng.random((layers, len(bits))), axis=1)[:, ::-1].copy()
    tables = [
        cetopt.SensitivityTable(
            layers=[f"l{i}" for i in range(layers)], bits=bits, values=v, params=37 * np.arange(1, layers + 1)
        )
        for v in (values, 1e-6 * values)
    ]
    plans = [allocate(t, "5x", solver=solver, use_greedy=False) for t in tables]
    assert plans[1].bits == plans[0].bits
    assert plans[1].predicted_loss == pytest.approx(1e-6 * plans[0].predicted_loss, rel=1e-9)
    if plans[0].bound is not None:  # CBC reports none
        assert plans[1].bound == pytest.approx(1e-6 * plans[0].bound, rel=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_certificate_is_sound(seed):
    # many layers: the convex-hull greedy usually certifies itself; its plan must be within the gap.
    table = random_table(layers=400, seed=seed)
    plan = allocate(table, "7x", mip_gap=1e-3)
    exact = allocate(table, "7x", use_greedy=False, mip_gap=1e-9)
    assert plan.bound <= exact.predicted_loss + 1e-12
    assert plan.predicted_loss <= exact.predicted_loss * (1 + 1e-3) + 1e-12
    assert plan.bytes <= plan.budget_bytes


def test_greedy_shortcut_reports_itself():
    table = random_table(layers=3000, seed=2)
    plan = allocate(table, "8x")
    assert plan.solver == "mck-greedy" and plan.status == "optimal" and plan.gap <= 1e-4


def test_budget_forms_agree():
    table = random_table()
    fp32 = 4 * table.params.sum()
    assert allocate(table, "8x").budget_bytes == pytest.approx(fp32 / 8)
    assert allocate(table, float(fp32 / 8)).budget_bytes == pytest.approx(fp32 / 8)
    assert allocate(table, f"{fp32 / 8 / 1000}kb").budget_bytes == pytest.approx(fp32 / 8)
    plan = allocate(table, "3.5bits")
    assert plan.average_bits <= 3.5 + 1e-9


def test_budget_below_minimum_names_the_minimum():
    table = random_table()
    minimum = option_bytes(table)[:, 0].sum()
    with pytest.raises(InfeasibleBudgetError, match=f"{minimum:.6g}") as info:
        allocate(table, minimum - 1)
    assert info.value.minimum == pytest.approx(minimum)
    assert allocate(table, minimum).bits == {name: 2 for name in table.layers}


def test_min_bits_raise_the_minimum():
    table = random_table()
    with pytest.raises(InfeasibleBudgetError) as info:
        allocate(table, option_bytes(table)[:, 0].sum(), min_bits={"l0": 8})
    assert info.value.minimum == pytest.approx(option_bytes(table)[1:, 0].sum() + option_bytes(table)[0, -1])


def test_ties_force_equal_bits_and_stay_optimal():
    table = random_table(seed=4)
    plan = allocate(table, "7x", ties=[["l0", "l3"], ["l3", "l5"]], use_greedy=False, mip_gap=0.0)
    assert plan.bits["l0"] == plan.bits["l3"] == plan.bits["l5"]
    size = option_bytes(table)
    best = np.inf
    for c in __import__("itertools").product(range(len(BITS)), repeat=4):
        choice = np.array([c[0], c[1], c[2], c[0], c[3], c[0]])
        if size[np.arange(6), choice].sum() <= plan.budget_bytes:
            best = min(best, table.values[np.arange(6), choice].sum())
    assert plan.predicted_loss == pytest.approx(best, rel=1e-9)


def test_per_layer_bit_limits():
    plan = allocate(random_table(), "5x", min_bits={"l1": 5}, max_bits=6)
    assert plan.bits["l1"] >= 5 and max(plan.bits.values()) <= 6


def test_bops_and_latency_rows_hold_and_stay_optimal():
    table = random_table(seed=3)
    bits = np.array(BITS, dtype=float)
    bops = table.macs[:, None] * bits[None, :] * 32
    latency = np.random.default_rng(0).uniform(0.5, 2.0, table.values.shape) * bits[None, :]
    bops_limit, lat_limit = 0.5 * bops[:, -1].sum(), 0.55 * latency[:, -1].sum()
    plan = allocate(
        table, "5x", bops_budget=bops_limit, latency=latency, latency_budget=lat_limit, mip_gap=0.0
    )
    assert plan.bops <= bops_limit and plan.latency <= lat_limit + 1e-9
    best, _ = brute_force(table, plan.budget_bytes, extra=[(bops, bops_limit), (latency, lat_limit)])
    assert plan.predicted_loss == pytest.approx(best, rel=1e-9)


def test_time_limit_returns_the_best_plan_marked_as_such():
    table = random_table(layers=3000, seed=5)
    bops = float((table.macs * 4 * 32).sum())
    plan = allocate(table, "9x", bops_budget=bops, time_limit=1e-3, use_greedy=False)
    assert plan.status in ("time_limit", "optimal") and plan.bytes <= plan.budget_bytes
    if plan.status == "time_limit":
        assert plan.gap is None or plan.gap >= 0


def test_users_registered_solver_is_used(clean_registry):
    cetopt.register_solver(ScipyMilpSolver)
    plan = allocate(random_table(), "6x", solver="scipy-milp", use_greedy=False)
    assert plan.solver == "scipy-milp"


def test_pareto_sweep_and_plot(tmp_path):
    table = random_table(seed=6)
    front = pareto(table, ["12x", "4x", "8x", "1e9"], plot=tmp_path / "front.png")
    assert [p.budget_bytes for p in front.plans] == sorted(p.budget_bytes for p in front.plans)
    assert np.all(np.diff(front.predicted_loss) <= 1e-12)  # more bytes never predicts more loss
    assert (tmp_path / "front.png").stat().st_size > 1000
    json.dumps(front.to_dict())


def test_plan_is_plain_data():
    plan = allocate(random_table(), "6x")
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["bits"] == plan.bits and "compression_ratio" in data
    assert [d.layer for d in plan.decisions()] == list(plan.bits)
    assert "total:" in plan.summary()


def test_a_per_channel_plans_summary_has_one_row_per_layer_counting_channels_per_width():
    from cetopt.analysis import SensitivityTable

    rows = [f"conv[{c}]" for c in range(4)] + ["fc"]
    values = np.array([[3.0, 2.0, 1.0]] * 5) * np.arange(1, 6)[:, None]
    table = SensitivityTable(layers=rows, bits=(2, 3, 4), values=values, params=np.array([100] * 4 + [400]))
    plan = allocate(table, "9x")
    lines = plan.summary().splitlines()
    assert len(lines) == 2 + 2 + 1  # header, rule, two layers, total
    conv = next(ln.split() for ln in lines if ln.startswith("conv"))
    widths = [int(b) for b in plan.bits.values()][:4]
    assert conv[1:-2] == [f"{b}×{widths.count(b)}" for b in sorted(set(widths))]
    assert float(conv[-2]) == pytest.approx(sum(plan.layer_bytes[r] for r in rows[:4]), abs=0.5)
    assert next(ln.split() for ln in lines if ln.startswith("fc"))[1] == str(plan.bits["fc"])


def test_nan_sensitivity_is_a_named_error():
    from cetopt.analysis import SensitivityTable
    from cetopt.errors import NonFiniteError

    values = np.ones((2, 2))
    values[1, 0] = np.nan
    with pytest.raises(NonFiniteError, match="'b' at 2 bits"):
        SensitivityTable(layers=["a", "b"], bits=[2, 4], values=values, params=[10, 10])


def test_plan_bits_are_an_array_backed_mapping_equal_to_the_dict():
    from cetopt.allocation.plan import LayerValues

    table = random_table(layers=12)
    plan = allocate(table, "6x")
    as_dict = dict(plan.bits)
    assert isinstance(plan.bits, LayerValues) and plan.bits == as_dict and as_dict == plan.bits
    assert list(plan.bits) == list(table.layers) and all(type(b) is int for b in plan.bits.values())
    assert plan.bits["l3"] == as_dict["l3"] and "l3" in plan.bits and "nope" not in plan.bits
    assert allocate(table, "6x").bits == plan.bits
    with pytest.raises(TypeError):
        plan.bits["l3"] = 8  # read-only
    expected = sum(as_dict[n] * p for n, p in zip(table.layers, table.params)) / table.params.sum()
    assert plan.average_bits == pytest.approx(expected, rel=1e-12)


def test_a_long_summary_lists_the_first_rows_and_counts_the_rest():
    table = random_table(layers=30)
    plan = allocate(table, "6x")
    full = plan.summary(max_rows=None).splitlines()
    assert len(full) == 2 + 30 + 1 and plan.summary() == "\n".join(full)
    short = plan.summary(max_rows=5).splitlines()
    assert len(short) == 2 + 5 + 2
    assert [ln.split()[:2] for ln in short[2:7]] == [ln.split()[:2] for ln in full[2:7]]
    widths = [int(b) for b in plan.bits.values()]
    counts = " ".join(f"{b}×{widths.count(b)}" for b in sorted(set(widths)))
    assert short[-2].startswith("... 25 more layers") and short[-2].endswith(counts)
    assert short[-1] == full[-1]


def test_a_mip_start_highs_misprices_does_not_fail_the_allocation():
    # mnist1d-cnn's measured table, perturbed: at 12x HiGHS 1.16 priced the greedy start wrong in
    # presolve's reduced space and answered "optimal" with an objective that was not the start's;
    # verify_solution rejected it and allocate raised SolverFailedError.
    values = [
        [0.038015201, 0.001409571, 7.3853e-05, 5.9268e-05, 3.28e-05, -8.4e-08],
        [0.031058267, 0.003022591, 0.000422817, 0.000256212, 0.000138774, -3.63e-07],
        [0.070793108, 0.004326442, 0.000613674, 8.2302e-05, 1.7258e-05, 1.5222e-05],
        [0.183149237, 0.013366268, 0.001602222, 0.000568577, 1.07e-06, 1.4301e-05],
    ]
    table = cetopt.SensitivityTable(
        layers=["conv1", "conv2", "conv3", "fc"],
        bits=(2, 3, 4, 5, 6, 8),
        values=np.array(values),
        params=np.array([320, 12288, 12288, 3200]),
        channels=np.array([64, 64, 64, 10]),
        macs=np.array([6400, 122880, 61440, 3200]),
        fixed_bytes=np.array([256, 256, 256, 40]),
    )
    plan = allocate(table, "12x")
    best, _ = brute_force(table, plan.budget_bytes)
    assert plan.status == "optimal" and plan.solver == "highs"
    assert plan.predicted_loss <= best * (1 + 1e-4) and plan.bytes <= plan.budget_bytes
