"""Issue 16, defect 3: CBC answers at full precision; cetopt.MILP rejects what no point satisfies."""

import numpy as np
import pytest

import cetopt
from cetopt.errors import ProblemError


def one_integer(upper, a, solver="cbc"):
    problem = cetopt.MILP(c=[1.0], A=np.array([[a]]), row_upper=[upper], integrality=[True], sense="max")
    return cetopt.solve(problem, solver)


@pytest.mark.parametrize(
    ("upper", "a", "expected"),
    [(123456789.0, 1.0, 123456789.0), (1e12, 3.0, 333333333333.0), (1e16, 3.0, 3333333333333333.0)],
)
def test_cbc_reads_large_integer_optima_exactly(upper, a, expected):
    sol = one_integer(upper, a)
    assert sol.status == "optimal", sol.message
    assert sol.x is not None and sol.x[0] == expected and sol.objective == expected


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("row_lower", [np.inf], "row_lower[0]"),
        ("row_upper", [-np.inf], "row_upper[0]"),
        ("col_lower", [np.inf], "col_lower[0]"),
        ("col_upper", [-np.inf], "col_upper[0]"),
        ("integrality", [2], "integrality[0]"),
        ("integrality", ["yes"], "integrality[0]"),
        ("c", ["a"], "c"),
        ("c", [1 + 2j], "c"),
        ("A", [["x"]], "A"),
        ("offset", "1", "offset"),
        ("sense", ["min"], "sense"),
    ],
)
def test_milp_rejects_entries_no_point_can_meet_or_that_are_not_numbers(field, value, where):
    fields = {"c": [1.0], "A": [[1.0]], field: value}
    with pytest.raises(ProblemError, match=where.replace("[", r"\[").replace("]", r"\]")):
        cetopt.MILP(**fields)


def test_milp_still_takes_zero_one_integrality_and_numeric_lists():
    problem = cetopt.MILP(c=[1, 2], A=[[1, 1]], row_upper=[3], integrality=[1, 0], col_upper=[5, 5])
    assert problem.integrality.tolist() == [True, False] and problem.c.dtype == np.float64
