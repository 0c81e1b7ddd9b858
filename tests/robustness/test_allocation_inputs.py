"""Issue 16, allocation side: every malformed budget or argument gets a named ``cetopt.errors`` error."""

import math

import numpy as np
import pytest

import cetopt
from cetopt import errors
from cetopt.allocation import allocate, parse_budget
from tests.allocation.conftest import random_table


@pytest.fixture(scope="module")
def table():
    return random_table(layers=8, seed=0)


@pytest.mark.parametrize(
    "budget",
    [
        "0x",
        "0.5x",
        "0",
        "-3",
        "nan",
        "inf",
        float("nan"),
        -1.0,
        0,
        "",
        "ten",
        None,
        [1],
        True,
        "1e400",
        "5 parsecs",
    ],
)
def test_bad_budgets_raise_a_budget_error_naming_the_argument(table, budget):
    with pytest.raises(errors.BudgetError, match="budget"):
        allocate(table, budget)


def test_a_ratio_below_one_is_rejected_with_its_reason(table):
    with pytest.raises(errors.BudgetError, match="at least 1"):
        parse_budget("0.5x", table)
    assert parse_budget("1x", table) == pytest.approx(4 * table.params.sum())


@pytest.mark.parametrize("name", ["bops_budget", "latency_budget"])
@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0, float("inf"), "10", None])
def test_bad_extra_budgets_name_themselves(table, name, value):
    kwargs = {"latency": np.ones(table.values.shape)} if name == "latency_budget" else {}
    if value is None:
        return  # None means "no such budget"
    with pytest.raises(errors.BudgetError, match=name):
        allocate(table, "8x", **{name: value}, **kwargs)


def test_huge_params_are_refused_not_wrapped_to_negative():
    with pytest.raises(errors.NonFiniteError, match="params"):
        cetopt.SensitivityTable(layers=["a"], bits=[2, 4], values=[[1.0, 0.5]], params=[1e20])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"time_limit": "10"}, errors.AllocationArgumentError),
        ({"time_limit": -1}, errors.AllocationArgumentError),
        ({"mip_gap": float("nan")}, errors.AllocationArgumentError),
        ({"mip_gap": -0.1}, errors.AllocationArgumentError),
        ({"activation_bits": 0}, errors.AllocationArgumentError),
        ({"min_bits": {"nope": 4}}, errors.UnknownLayerError),
        ({"max_bits": "eight"}, errors.AllocationArgumentError),
        ({"min_bits": 9}, errors.AllocationArgumentError),
        ({"ties": [["l0", "zz"]]}, errors.UnknownLayerError),
        ({"ties": "l0"}, errors.AllocationArgumentError),
        ({"latency": np.ones(3), "latency_budget": 5.0}, errors.DataShapeError),
    ],
)
def test_bad_arguments_raise_named_errors(table, kwargs, error):
    with pytest.raises(error):
        allocate(table, "8x", **kwargs)


def test_unknown_layer_error_is_still_a_key_error(table):
    with pytest.raises(KeyError):
        allocate(table, "8x", min_bits={"nope": 4})


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _random_budget(rng, table):
    kind = rng.integers(0, 7)
    number = float(_pick(rng, [0, -1, 0.3, 1, 2.5, 8, 31, 1e3, 1e9, 1e30, math.nan, math.inf]))
    if kind == 0:
        return number
    if kind == 1:
        return f"{number}x"
    if kind == 2:
        return f"{number}bits"
    if kind == 3:
        return f"{number}{_pick(rng, ['kb', 'mb', 'KiB', 'b', 'bytes', 'parsec'])}"
    if kind == 4:
        return _pick(rng, ["", "x", "bits", "8 x", " 8x ", "3.5 bit", "1e3", "--1", None])
    if kind == 5:
        return float(4 * table.params.sum() / rng.uniform(0.5, 20))
    return int(rng.integers(-10, 10**7))


def _random_kwargs(rng, table):
    kwargs = {}
    bits = np.array(table.bits, dtype=float)
    if rng.random() < 0.4:
        top = float((table.macs * bits[-1] * 32).sum())
        kwargs["bops_budget"] = _pick(rng, [top * rng.uniform(0.1, 1.2), math.nan, -top, "x", 0.0])
    if rng.random() < 0.4:
        lat = rng.uniform(0.5, 2, table.values.shape) * bits[None, :]
        kwargs["latency"] = lat if rng.random() < 0.9 else lat[:, :2]
        kwargs["latency_budget"] = _pick(rng, [float(lat[:, -1].sum() * rng.uniform(0.2, 1.1)), math.nan])
    if rng.random() < 0.3:
        kwargs["min_bits"] = _pick(rng, [2, 3, 8, 9, {"l1": 4}, {"zz": 3}, math.nan])
    if rng.random() < 0.3:
        kwargs["max_bits"] = _pick(rng, [2, 4, 6, 1, {"l2": 3}])
    if rng.random() < 0.3:
        kwargs["ties"] = _pick(rng, [[["l0", "l1"]], [["l3", "l4", "l5"], ["l5", "l6"]], [["l0", "q"]], "l0"])
    if rng.random() < 0.3:
        kwargs["mip_gap"] = _pick(rng, [0.0, 1e-3, 0.5, -1.0, math.inf])
    if rng.random() < 0.2:
        kwargs["time_limit"] = _pick(rng, [1e-4, 5.0, 0, "3", math.nan])
    return kwargs


@pytest.mark.parametrize("seed", range(300))
def test_fuzz_allocate_works_or_raises_a_named_error(seed, table):
    rng = np.random.default_rng(seed)
    budget = _random_budget(rng, table)
    kwargs = _random_kwargs(rng, table)
    try:
        plan = allocate(table, budget, **kwargs)
    except errors.CetoptError:
        return
    limits = {
        "bytes": plan.budget_bytes,
        "bops": kwargs.get("bops_budget"),
        "latency": kwargs.get("latency_budget"),
    }
    assert plan.bytes <= limits["bytes"]
    if limits["bops"] is not None:
        assert plan.bops <= limits["bops"]
    if limits["latency"] is not None:
        assert plan.latency <= limits["latency"] * (1 + 1e-12)
    gap = kwargs.get("mip_gap", 1e-4)
    assert plan.status != "optimal" or plan.gap <= gap + 1e-9
