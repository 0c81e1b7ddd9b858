import numpy as np
import pytest
import scipy.sparse as sp

import cetopt
from cetopt.testing.solver_contract import market_split
from solvers.highs import parse_solving_report

REPORT = """
Solving report
  Status            Optimal
  Timing            0.65
                    0.10 (Presolve)
                        MIP    time [calls] = 0.03 [1]
                        subMIP time [calls] = 0.07 [11]
                    0.54 (Solve)
                        MIP    time [calls] = 0.17 [1]
                        subMIP time [calls] = 0.37 [10]
                    0.00 (Postsolve)
                        MIP    time [calls] = 0.00 [1]
                        subMIP time [calls] = 0.00 [11]
  Max sub-MIP depth 14
  Nodes             1
  Repair LPs        0
  LP iterations     1764
                    0 (strong br.)
                    13 (separation)
                    326 (heuristics)
"""


def test_parse_solving_report():
    r = parse_solving_report("noise\n" + REPORT)
    assert r["timing"] == {
        "total": 0.65,
        "presolve": 0.10,
        "presolve_submip": 0.07,
        "solve": 0.54,
        "solve_submip": 0.37,
        "postsolve": 0.0,
        "postsolve_submip": 0.0,
    }
    assert r["lp_iterations"] == {"total": 1764, "strong_branching": 0, "separation": 13, "heuristics": 326}
    assert r["nodes"] == 1
    assert parse_solving_report("no report here") == {}


def test_real_solve_fills_the_report():
    sol = cetopt.solve(market_split(4), "highs", time_limit=0.3)
    assert sol.stats["timing"]["total"] > 0 and "lp_iterations" in sol.stats
    assert sol.stats["native_status"] == "Time limit reached"


def test_tiny_matrix_entries_are_counted_not_hidden():
    A = sp.csr_matrix([[1.0, 1e-12]])
    sol = cetopt.solve(cetopt.MILP(c=[1.0, 1.0], A=A, row_lower=[1.0]), "highs")
    assert sol.stats["dropped_small_entries"] == 1


def test_unbounded_or_infeasible_is_resolved():
    # Presolve sees the empty-row conflict and unbounded column together; the backend must pick one.
    A = sp.csr_matrix([[1.0, 0.0], [1.0, 0.0]])
    p = cetopt.MILP(c=[0.0, -1.0], A=A, row_lower=[2.0, -np.inf], row_upper=[np.inf, 1.0])
    assert cetopt.solve(p, "highs").status == "infeasible"
    q = cetopt.MILP(c=[0.0, -1.0], A=A, row_lower=[0.0, -np.inf], row_upper=[np.inf, 1.0])
    assert cetopt.solve(q, "highs").status == "unbounded"


def test_empty_model():
    sol = cetopt.solve(cetopt.MILP(c=np.zeros(0), offset=3.0), "highs")
    assert sol.status == "optimal" and sol.objective == 3.0


def test_dropped_small_entries_is_reported_when_zero():
    import scipy.sparse as sp

    import cetopt

    problem = cetopt.MILP(c=[1.0], A=sp.csr_matrix([[1.0]]), row_lower=[1.0], integrality=[True])
    assert cetopt.solve(problem, "highs").stats["dropped_small_entries"] == 0


def _knapsack(c, size, allowed, limit, chosen):
    """A bit-allocation core MILP: one option per group (rows of ``c``), one byte row, a start."""
    groups, options = np.shape(c)
    problem = cetopt.MILP(
        c=np.ravel(c),
        A=sp.csr_matrix(np.vstack([np.kron(np.eye(groups), np.ones(options)), np.ravel(size)])),
        row_lower=[1.0] * groups + [-np.inf],
        row_upper=[1.0] * groups + [limit],
        col_upper=np.ravel(allowed).astype(np.float64),
        integrality=np.ones(groups * options, dtype=bool),
    )
    start = np.zeros(groups * options)
    start[np.arange(groups) * options + np.asarray(chosen)] = 1.0
    return problem, start


# Core MILPs of cetopt.allocate (12x and 11x on perturbed mnist1d-cnn tables) on which HiGHS 1.16,
# given the feasible start, carried it into presolve's reduced space wrong (after Sparsify, resp.
# Probing) and answered "optimal" with x = the start and an objective that is not the start's:
# 1.00803 for a start costing 1.00907 (optimum 1.00887), resp. 0.55747 for one costing 1.0.
MISPRICED_STARTS = {
    "sparsify": lambda: _knapsack(
        [[0.53699014, 0.019911129, 0.0010432210, 0.00083719610, 0.00046332321, -1.1890956e-06],
         [1.0, 0.061113882, 0.0086685533, 0.0011625754, 0.00024378115, 0.00021502201],
         [2.5871055, 0.18880748, 0.022632464, 0.0080315318, 1.5119592e-05, 0.00020201430]],
        [[400, 440, 480, 520, 560, 640], [3392, 4928, 6464, 8000, 9536, 12608],
         [850, 1250, 1650, 2050, 2450, 3250]],
        [[0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]],
        5973.333333333334,
        [2, 0, 3],
    ),
    "probing": lambda: _knapsack(
        [[5.94661308, 0.112726024, 0.00240980441, 0.00137207133, 0.00175367240, -2.09726410e-06],
         [1.0, 0.557469184, 0.0740663655, 0.0619953543, 2.34339831e-05, 0.00133497544]],
        [[400, 440, 480, 520, 560, 640], [850, 1250, 1650, 2050, 2450, 3250]],
        [[0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 0]],
        1896.727272727272,
        [5, 0],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MISPRICED_STARTS))
def test_mip_start_mispriced_by_presolve_is_discarded(case):
    problem, start = MISPRICED_STARTS[case]()
    without = cetopt.solve(problem, "highs", mip_gap=1e-4)
    assert without.status == "optimal" and without.verified
    sol = cetopt.solve(problem, "highs", mip_gap=1e-4, start=start)
    assert sol.status == "optimal", sol.message
    assert sol.verified and np.isclose(sol.objective, without.objective, rtol=1e-12, atol=0)
    assert problem.objective_value(start) > sol.objective + 1e-4  # the start is not the optimum
    assert "solved again without the start" in sol.stats["mip_start_discarded"]


def test_a_good_mip_start_is_kept():
    problem, _ = MISPRICED_STARTS["sparsify"]()
    best = cetopt.solve(problem, "highs", mip_gap=0.0)
    sol = cetopt.solve(problem, "highs", mip_gap=0.0, start=best.x)
    assert sol.status == "optimal" and sol.verified and "mip_start_discarded" not in sol.stats
    assert sol.objective == pytest.approx(best.objective, rel=1e-12)
