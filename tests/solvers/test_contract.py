"""Every backend — the built-ins and a user's own — meets the same public contract."""

import pytest

import cetopt
from cetopt.testing import CONTRACT_CHECKS
from tests.solvers.scipy_user_solver import ScipyMilpSolver

BACKENDS = ["highs", "cbc", "cvxpy", ScipyMilpSolver]


def backend_id(backend):
    return backend if isinstance(backend, str) else backend.name


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_backend_meets_contract(backend, check):
    if isinstance(backend, str):
        info = {i.name: i for i in cetopt.available_solvers()}[backend]
        if not info.available:
            pytest.skip(f"{backend} is not installed here")
    check(backend)


def test_every_builtin_is_available_in_the_test_environment():
    # The test extras install PuLP and cvxpy, so no contract test above may be skipped silently.
    assert {i.name for i in cetopt.available_solvers() if i.available} >= {"highs", "cbc", "cvxpy"}
