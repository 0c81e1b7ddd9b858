import itertools

import numpy as np
import pytest

from cetopt.allocation import option_bytes
from cetopt.analysis import SensitivityTable

BITS = (2, 3, 4, 5, 6, 8)


def random_table(layers=6, seed=0, bits=BITS):
    rng = np.random.default_rng(seed)
    params = rng.integers(100, 5000, layers)
    values = (
        rng.lognormal(0, 1, layers)[:, None]
        * 4.0 ** -np.array(bits)[None, :]
        * rng.uniform(0.7, 1.3, (layers, len(bits)))
    )
    return SensitivityTable(
        layers=[f"l{i}" for i in range(layers)],
        bits=bits,
        values=values,
        params=params,
        channels=rng.integers(4, 64, layers),
        macs=params * rng.integers(1, 50, layers),
    )


def brute_force(table, budget_bytes, extra=()):
    """Best choice by enumeration. ``extra``: (per-option array, limit) pairs."""
    size = option_bytes(table)
    best = (np.inf, None)
    rows = np.arange(table.num_layers)
    for choice in itertools.product(range(len(table.bits)), repeat=table.num_layers):
        c = np.array(choice)
        if size[rows, c].sum() > budget_bytes + 1e-9:
            continue
        if any(arr[rows, c].sum() > limit + 1e-9 for arr, limit in extra):
            continue
        loss = table.values[rows, c].sum()
        if loss < best[0]:
            best = (loss, c)
    return best


@pytest.fixture
def table():
    return random_table()
