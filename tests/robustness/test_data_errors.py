"""Bad data raises the named error, up front, naming the culprit; SensitivityTable takes any input
and either works or raises a cetopt error."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import cetopt
from cetopt.analysis import SensitivityTable
from cetopt.errors import CetoptError, NonFiniteError
from tests.robustness.test_model_untouched import PLAN, Net, _data, _menu, _prepare


@pytest.fixture(scope="module")
def bad():
    """A model, NaN-poisoned inputs (one value of example 23), their batches and labels."""
    torch.manual_seed(0)
    x, y, _ = _data()
    x = x.clone()
    x[23, 0, 2, 2] = float("nan")
    return _prepare(Net(), "eval"), x, [(x[:20], y[:20]), (x[20:], y[20:])], y


CASES = {
    "sensitivity": (lambda m, x, b, y: cetopt.sensitivity(m, b, (2, 4), "measured", progress=False), "data"),
    "compress": (lambda m, x, b, y: cetopt.compress(m, b, "6x", bits=(2, 4, 8), progress=False), "data"),
    "quantize-gptq": (lambda m, x, b, y: cetopt.quantize(m, PLAN, gptq=b), "calibration data"),
    "quantize-bias": (lambda m, x, b, y: cetopt.quantize(m, PLAN, bias_correction=b), "calibration data"),
    "quantize-sequential": (
        lambda m, x, b, y: cetopt.quantize(m, PLAN, gptq=b, bias_correction=b, sequential=True),
        "calibration data",
    ),
    "decompose": (lambda m, x, b, y: cetopt.decompose(m, x, rank=2, iterations=2), "calibration batch 0"),
    "decompose-loader": (
        lambda m, x, b, y: cetopt.decompose(m, b, rank=2, iterations=2),
        "calibration batch 1",
    ),
    "build_menu": (lambda m, x, b, y: _menu(m, x), "calibration batch"),
    "self_compress": (lambda m, x, b, y: cetopt.self_compress(m, (x, y), steps=2), "train_data inputs"),
}


@pytest.mark.parametrize("entry", list(CASES))
def test_non_finite_data_is_refused_up_front(entry, bad):
    model, x, batches, y = bad
    run, culprit = CASES[entry]
    start = time.perf_counter()
    with pytest.raises(NonFiniteError, match=culprit):
        run(model, x, batches, y)
    assert time.perf_counter() - start < 5


def test_self_compress_names_the_example():
    torch.manual_seed(0)
    x, y, _ = _data()
    x = x.clone()
    x[31] = float("inf")
    with pytest.raises(NonFiniteError, match="example 31"):
        cetopt.self_compress(_prepare(Net(), "eval"), (x, y), steps=2, preservation=False)


def _field(rng: np.random.Generator, n: int, shape=None):
    """A random value for an array field: right or wrong shape, NaN, negative, huge, strings, None."""
    shape = shape or (n,)
    kind = int(rng.integers(0, 10))
    if kind == 0:
        return None
    if kind == 1:
        return rng.integers(1, 1000, shape)
    if kind == 2:
        return rng.normal(size=shape) * 1e3
    if kind == 3:
        a = rng.random(shape)
        if a.size:
            a.flat[int(rng.integers(0, a.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
        return a
    if kind == 4:
        return -rng.integers(1, 10, shape)
    if kind == 5:
        return rng.random((n + int(rng.integers(1, 3)),))
    if kind == 6:
        return [1e20] * n
    if kind == 7:
        return ["a"] * n
    if kind == 8:
        return [[1, 2], [3]]  # ragged
    return rng.random(shape).tolist()


def _table_kwargs(rng: np.random.Generator) -> dict:
    n = int(rng.integers(0, 4))
    layers = [f"l{i}" for i in range(n)]
    if rng.random() < 0.15:
        layers = layers + layers[:1]
    bits = [2, 4, 8][: int(rng.integers(0, 4))]
    if rng.random() < 0.2:
        bits = [[8, 4], [0, 2], [2.5, 3], ["x"], [-1, 2], None][int(rng.integers(0, 6))]
    k = len(bits) if isinstance(bits, list) else 0
    kwargs = {
        "layers": layers if rng.random() < 0.9 else [None, 3, object()][int(rng.integers(0, 3))],
        "bits": bits,
        "values": _field(rng, n, (n, k)),
        "params": _field(rng, n),
    }
    for name in ("stderr", "channels", "macs", "fixed_bytes"):
        if rng.random() < 0.5:
            kwargs[name] = _field(rng, n, (n, k) if name == "stderr" else None)
    if rng.random() < 0.1:
        kwargs["meta"] = None
    return kwargs


def test_fuzz_sensitivity_table_either_works_or_raises_a_named_error():
    rng = np.random.default_rng(16)
    outcomes = {"built": 0, "refused": 0}
    for _ in range(600):
        kwargs = _table_kwargs(rng)
        try:
            table = SensitivityTable(**kwargs)
        except CetoptError:
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # any other type is the failure this test looks for
            pytest.fail(f"SensitivityTable({kwargs!r}) raised {type(exc).__name__}: {exc}")
        outcomes["built"] += 1
        assert np.isfinite(table.values).all()
        assert table.values.shape == (len(table.layers), len(table.bits))
        assert (table.params > 0).all()
        for name in ("channels", "macs", "fixed_bytes"):
            value = getattr(table, name)
            assert value is None or (value >= 0).all()
    assert outcomes["built"] > 10 and outcomes["refused"] > 100
