import numpy as np
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
