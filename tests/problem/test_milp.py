import numpy as np
import pytest
import scipy.sparse as sp

from cetopt import MILP
from cetopt.errors import ProblemError


def small(**overrides):
    fields = dict(c=[1.0, 2.0], A=sp.csr_matrix([[1.0, 1.0]]), row_lower=[1.0], row_upper=[3.0])
    fields.update(overrides)
    return MILP(**fields)


def test_defaults_and_storage():
    p = MILP(c=[1, 2, 3])
    assert p.num_cols == 3 and p.num_rows == 0
    assert np.array_equal(p.col_lower, np.zeros(3)) and np.all(np.isinf(p.col_upper))
    assert not p.is_mip and p.sense == "min"
    q = small(integrality=[True, False])
    assert isinstance(q.A, sp.csr_matrix) and q.A.dtype == np.float64 and q.is_mip


def test_keyword_only():
    with pytest.raises(TypeError):
        MILP([1.0, 2.0])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (dict(c=[1.0, np.nan]), "c[1]"),
        (dict(c=[1.0, np.inf]), "c[1]"),
        (dict(A=sp.csr_matrix([[1.0, np.nan]])), "A[0, 1]"),
        (dict(A=sp.csr_matrix([[1.0, 1.0, 1.0]])), "3 columns"),
        (dict(row_lower=[1.0, 2.0]), "row_lower"),
        (dict(row_lower=[np.nan]), "row_lower[0]"),
        (dict(row_lower=[4.0]), "row 0"),
        (dict(col_lower=[0.0, 5.0], col_upper=[1.0, 2.0]), "column 1"),
        (dict(integrality=[True]), "integrality"),
        (dict(sense="maximize"), "sense"),
        (dict(offset=np.nan), "offset"),
    ],
)
def test_bad_input_names_the_culprit(overrides, fragment):
    with pytest.raises(ProblemError, match=__import__("re").escape(fragment)):
        small(**overrides)


def test_error_uses_names_when_given():
    with pytest.raises(ProblemError, match="'budget'"):
        small(row_lower=[5.0], row_names=["budget"])


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        small(c=[np.nan, 1.0])


def test_duplicate_entries_are_summed():
    A = sp.coo_matrix(([1.0, 2.0], ([0, 0], [1, 1])), shape=(1, 2))
    assert small(A=A).A[0, 1] == 3.0


def test_violation_and_objective():
    p = small(integrality=[True, False], offset=5.0)
    assert p.violation([1.0, 0.5]) == 0.0
    assert p.violation([0.0, 0.5]) == pytest.approx(0.5)  # row 0.5 < 1
    assert p.violation([0.5, 1.0]) == pytest.approx(0.5)  # integrality
    assert p.objective_value(np.array([1.0, 1.0])) == 8.0


def test_relaxation_drops_integrality_only():
    p = small(integrality=[True, True], sense="max", offset=1.0)
    r = p.relaxation()
    assert not r.is_mip and r.sense == "max" and r.offset == 1.0 and r.A is p.A
