import numpy as np

from cetopt import Solution, Status
from cetopt.problem import relative_gap


def test_status_compares_to_strings():
    s = Solution(status="optimal", x=[1, 2], objective=3.0, bound=3.0)
    assert s.status == "optimal" and s.status is Status.OPTIMAL and str(s.status) == "optimal"
    assert s.x.dtype == np.float64 and s.has_solution


def test_gap_is_derived_from_bound():
    s = Solution(status="time_limit", x=[0.0], objective=10.0, bound=8.0)
    assert s.gap == 0.2
    assert relative_gap(0.0, 1e-9) == 1e-9  # denominator floors at 1
    assert relative_gap(None, 1.0) is None


def test_infeasible_has_no_point():
    s = Solution(status="infeasible")
    assert not s.has_solution and s.gap is None
    assert "infeasible" in repr(s)
