import numpy as np
import pytest
import scipy.sparse as sp

import cetopt
from solvers.cbc import cbc_path, write_mps

pytestmark = pytest.mark.skipif(cbc_path() is None, reason="PuLP's CBC is not installed")


def mixed_problem(sense="min"):
    # Ranged, equality, >= and <= rows; free, fixed, negative and integer columns.
    A = sp.csr_matrix(
        np.array([[1.0, 2.0, 0.0, 1.0], [1.0, -1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    )
    return cetopt.MILP(
        c=[1.5, -2.0, 0.5, 1.0],
        A=A,
        row_lower=[-3.0, 1.5, -np.inf, -np.inf],
        row_upper=[4.0, 1.5, 6.0, np.inf],
        col_lower=[-np.inf, -2.0, 0.5, 3.0],
        col_upper=[np.inf, 3.5, 0.5, 3.0],
        integrality=[True, True, False, False],
        sense=sense,
        offset=2.0,
    )


@pytest.mark.parametrize("sense", ["min", "max"])
def test_mps_writer_matches_the_array_problem(tmp_path, sense):
    # Independent check: HiGHS reads our MPS file and must find the same optimum as from the arrays.
    import highspy

    p = mixed_problem(sense)
    path = str(tmp_path / "m.mps")
    write_mps(p, path, negate=(sense == "max"))
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.readModel(path)
    h.run()
    from_file = h.getInfo().objective_function_value
    from_file = (-from_file if sense == "max" else from_file) + p.offset
    direct = cetopt.solve(p, "highs", mip_gap=0)
    assert from_file == pytest.approx(direct.objective)
    assert cetopt.solve(p, "cbc").objective == pytest.approx(direct.objective)


def test_status_comes_from_cbc_not_from_pulp():
    # PuLP maps a stopped CBC run to "Optimal"; our status must say time_limit.
    from cetopt.testing.solver_contract import market_split

    sol = cetopt.solve(market_split(5), "cbc", time_limit=0.3)
    assert sol.status == "time_limit" and sol.stats["native_status"].startswith("Stopped on time")
    assert sol.bound is not None and sol.bound <= sol.objective


def test_cbc_options_are_passed_on_the_command_line():
    sol = cetopt.solve(mixed_problem(), "cbc", options={"cuts": "off"})
    assert sol.status == "optimal"
    bad = cetopt.solve(mixed_problem(), "cbc", options={"noSuchSwitch": 1})
    assert bad.status in ("optimal", "error")  # CBC ignores unknown switches with a warning


def test_printed_bound_is_made_sound():
    from solvers.cbc import _printed_lower_bound

    assert _printed_lower_bound("13.254") == pytest.approx(13.2535)
    assert _printed_lower_bound("13.254") <= 13.25405
    assert _printed_lower_bound("-2") == pytest.approx(-2.5)
    assert _printed_lower_bound("1.5e3") == pytest.approx(1450.0)


def test_reported_bound_never_exceeds_the_objective_of_a_min_problem():
    from benchmarks.bench_knapsack import instance
    from cetopt.testing.solver_contract import multiple_choice_knapsack

    cost, weight, budget = instance(300)
    sol = cetopt.solve(multiple_choice_knapsack(cost, weight, budget, sense="min"), "cbc", mip_gap=1e-3)
    assert sol.status == "optimal"
    if sol.bound is not None:
        assert sol.bound <= sol.objective
