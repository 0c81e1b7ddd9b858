"""Seeded property fuzz of cetopt.MILP and cetopt.solve (issue 16, must show).

Every input either works or raises a cetopt.errors type; no other exception, no hang, and no
``optimal`` that an independent enumeration (or SciPy's milp, called directly) contradicts.
"""

import itertools
import time

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

import cetopt
from cetopt.errors import CetoptError

BAD_SCALARS = [np.nan, np.inf, -np.inf, "1", None, [1.0, 2.0], 1 + 1j, True]


def _maybe_corrupt(rng, value, shape):
    """Usually ``value``; sometimes a NaN/inf entry, a wrong shape, strings or objects."""
    roll = rng.random()
    if roll > 0.08:
        return value
    kind = rng.integers(0, 6)
    arr = np.array(value, dtype=float, copy=True)
    if kind == 0 and arr.size:
        arr.flat[rng.integers(arr.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return arr
    if kind == 1:
        return np.zeros(tuple(s + 1 for s in shape))
    if kind == 2:
        return ["x"] * (shape[0] if shape else 1)
    if kind == 3:
        return rng.choice(np.array(BAD_SCALARS, dtype=object))
    if kind == 4:
        return arr.astype(complex) + 1j
    return [object()] * (shape[0] if shape else 1)


def _fields(rng):
    n, m = int(rng.integers(1, 4)), int(rng.integers(0, 3))
    lo = rng.integers(-3, 2, n).astype(float)
    up = lo + rng.integers(0, 4, n)
    A = rng.integers(-3, 4, (m, n)).astype(float)
    mid = A @ ((lo + up) / 2)
    rlo = np.where(rng.random(m) < 0.3, -np.inf, mid - rng.integers(0, 4, m))
    rup = np.where(rng.random(m) < 0.3, np.inf, mid + rng.integers(-1, 4, m))
    fields = {
        "c": rng.integers(-5, 6, n).astype(float),
        "A": A,
        "row_lower": rlo,
        "row_upper": rup,
        "col_lower": lo,
        "col_upper": up,
        "integrality": rng.random(n) < 0.7,
        "sense": str(rng.choice(["min", "max"])),
        "offset": float(rng.integers(-3, 4)),
    }
    for key in ("c", "A", "row_lower", "row_upper", "col_lower", "col_upper", "integrality"):
        fields[key] = _maybe_corrupt(rng, fields[key], np.shape(fields[key]))
    if rng.random() < 0.05:
        fields["sense"] = rng.choice(["MIN", "minimize", 1])
    if rng.random() < 0.05:
        fields["offset"] = rng.choice(np.array(BAD_SCALARS, dtype=object))
    return fields


def _enumerated_optimum(problem):
    """Best objective over the integer grid (pure-integer problems only), or None if infeasible."""
    grid = [np.arange(np.ceil(lo), np.floor(up) + 1) for lo, up in zip(problem.col_lower, problem.col_upper)]
    values = [
        problem.objective_value(np.array(p))
        for p in itertools.product(*grid)
        if problem.violation(np.array(p, dtype=float)) <= 1e-9
    ]
    if not values:
        return None
    return max(values) if problem.sense == "max" else min(values)


def _scipy_optimum(problem):
    """SciPy's milp, called directly (not through cetopt): (status, objective)."""
    sign = -1.0 if problem.sense == "max" else 1.0
    cons = [LinearConstraint(problem.A, problem.row_lower, problem.row_upper)] if problem.num_rows else []
    res = milp(
        sign * problem.c,
        integrality=problem.integrality.astype(int),
        bounds=Bounds(problem.col_lower, problem.col_upper),
        constraints=cons,
    )
    return res.status, None if res.x is None else problem.objective_value(res.x)


def _reference(problem):
    bounded = np.isfinite(problem.col_lower).all() and np.isfinite(problem.col_upper).all()
    if problem.integrality.all() and bounded:
        return _enumerated_optimum(problem)
    status, objective = _scipy_optimum(problem)
    return objective if status == 0 else None


def _check_answer(problem, sol):
    assert sol.status in set(cetopt.Status)
    expected = _reference(problem)
    if sol.status == "optimal":
        assert expected is not None, f"{sol.solver} says optimal, the reference says infeasible"
        assert problem.violation(sol.x) <= 1e-5
        assert abs(sol.objective - expected) <= 1e-6 * max(1.0, abs(expected)), (sol, expected)
    if sol.status == "infeasible":
        assert expected is None, f"{sol.solver} says infeasible, the reference finds {expected}"


@pytest.mark.parametrize("seed", range(6))
def test_milp_and_solve_either_work_or_raise_a_named_error(seed):
    rng = np.random.default_rng(1000 + seed)
    built = solved = 0
    t0 = time.perf_counter()
    for case in range(80):
        fields = _fields(rng)
        try:
            problem = cetopt.MILP(**fields)
        except CetoptError:
            continue
        built += 1
        solver = "cbc" if case % 6 == 0 else "highs"
        kwargs = {"time_limit": 10.0}
        if rng.random() < 0.1:
            kwargs[str(rng.choice(["time_limit", "mip_gap"]))] = rng.choice(
                np.array(BAD_SCALARS, dtype=object)
            )
        try:
            sol = cetopt.solve(problem, solver, **kwargs)
        except CetoptError:
            continue
        solved += 1
        _check_answer(problem, sol)
    assert built > 20 and solved > 20  # the fuzz is not vacuous
    assert time.perf_counter() - t0 < 120
