import numpy as np
import pytest

from cetopt.analysis.table import SensitivityTable
from cetopt.deploy.allocation import allocate_wa


def _table():
    return SensitivityTable(
        layers=["a", "b", "c"],
        bits=(2, 4, 8),
        values=np.array([[4.0, 1.0, 0.1], [2.0, 0.5, 0.05], [8.0, 2.0, 0.2]]),
        params=np.array([1000, 2000, 1000]),
        method="measured",
        channels=np.array([10, 10, 10]),
        macs=np.array([1e6, 4e6, 1e6]),
    )


def test_bytes_alone_keep_float_activations_and_the_weight_plan():
    act = np.array([[0.3, 0.01], [0.2, 0.02], [0.5, 0.03]])
    plan = allocate_wa(_table(), act, 3000)
    assert set(plan.activation_bits.values()) == {32}  # float activations cost no bytes and no loss
    assert plan.bytes <= 3000


def test_bops_budget_forces_quantized_activations_where_cheapest():
    table, act = _table(), np.array([[0.3, 0.01], [0.2, 0.02], [0.5, 0.03]])
    w8a8 = float((table.macs * 8 * 8).sum())
    plan = allocate_wa(table, act, 8000, bops_budget=0.5 * w8a8)
    assert plan.bops <= 0.5 * w8a8
    assert all(a in (4, 8) for a in plan.activation_bits.values())
    # brute force over all 3 × 3 options per layer
    best = np.inf
    options = [(w, a) for w in range(3) for a in (4, 8, 32)]
    from itertools import product

    from cetopt.allocation import option_bytes

    size = option_bytes(table)
    for combo in product(options, repeat=3):
        cost = sum(
            table.values[i, w] + (0 if a == 32 else act[i, (4, 8).index(a)]) for i, (w, a) in enumerate(combo)
        )
        byt = sum(size[i, w] for i, (w, _) in enumerate(combo))
        bops = sum(table.macs[i] * table.bits[w] * a for i, (w, a) in enumerate(combo))
        if byt <= 8000 and bops <= 0.5 * w8a8:
            best = min(best, cost)
    assert plan.predicted_loss == pytest.approx(best, rel=1e-6)
