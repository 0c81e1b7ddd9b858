"""The FCPE benchmark's evaluation helpers (no torchfcpe needed: it is never a test dependency)."""

import importlib.util

import numpy as np
import pytest

from benchmarks import bench_fcpe as bench
from cetopt.analysis import SensitivityTable


def test_calibration_frequencies_lie_between_test_frequencies():
    test = bench.grid(256)
    calib = bench.calibration_frequencies(256, 32)
    assert len(calib) == 32 and len(set(np.round(calib, 9))) == 32
    assert bench.RANGE_HZ[0] < calib.min() and calib.max() < bench.RANGE_HZ[1]
    # every calibration tone sits halfway (in log frequency) between two neighbouring test tones
    position = np.searchsorted(test, calib)
    assert (position > 0).all() and (position < len(test)).all()
    below, above = np.log(test[position - 1]), np.log(test[position])
    assert np.allclose(np.log(calib), (below + above) / 2)
    # and the calibration tones cover the range, not only its start
    assert calib.max() > bench.grid(256)[-16]


def test_accuracy_row_pairs_tones_and_bounds_the_drop():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 1.0, 200)
    hits = base.copy()
    hits[:20] -= 0.5  # 20 tones lose half their frames
    snr = np.repeat([-12.0, -15.0], 100)
    row = bench.accuracy_row(hits, base, snr)
    assert np.isclose(row["rpa_drop_pp"], 100 * 0.5 * 20 / 200)
    lo, hi = row["rpa_drop_pp_ci95"]
    assert 0 < lo < row["rpa_drop_pp"] < hi
    assert row["tones_changed"] == 20
    assert np.isclose(row["rpa_by_snr_db"]["-12"], hits[:100].mean())
    assert bench.accuracy_row(hits, base, snr) == row  # deterministic
    same = bench.accuracy_row(base, base, snr)
    assert same["rpa_drop_pp"] == 0 and same["rpa_drop_pp_ci95"] == [0.0, 0.0]


def test_per_channel_columns_keeps_only_per_channel_options():
    values = np.arange(8, dtype=float).reshape(2, 4)
    table = SensitivityTable(
        layers=["a", "b"],
        bits=[3, 3, 4, 4],
        values=values,
        params=np.array([10, 10]),
        groups=[None, 32, None, 32],
    )
    sub = bench.per_channel_columns(table)
    assert list(sub.bits) == [3, 4] and sub.groups is None
    assert np.array_equal(sub.values, values[:, [0, 2]])


def test_missing_torchfcpe_is_a_reason_not_an_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchfcpe" else real(name, *a)
    )
    assert "not installed" in bench.import_fcpe()
    assert "not installed" in bench.run(quick=True)["skipped"]


def test_joint_rows_run_the_joint_menu_on_every_layer_of_a_depthwise_model():
    """The benchmark's joint section on a tiny stand-in with a depthwise conv (quantized only)."""
    import torch

    import cetopt
    from tests.lowrank.models import tiny_depthwise

    model, x = tiny_depthwise(1)
    with torch.no_grad():
        data = [(x[:32], model(x[:32]).argmax(1)), (x[32:], model(x[32:]).argmax(1))]
    table = cetopt.sensitivity(model, data, (2, 3, 4, 8), "measured", progress=False)
    layers = list(table.layers)
    fp32 = 4.0 * float(table.params.sum())
    out: dict = {}
    saves = []

    def score(q):
        with torch.no_grad():
            return {"rpa_drop_pp": float((q(x) - model(x)).pow(2).mean())}

    small = {"rank_fractions": (1 / 4,), "prune_densities": (0.3,), "ls_rank_fractions": (1 / 4,)}
    bench.joint_rows(
        out, model, data, table, layers, fp32, score, lambda: saves.append(1),
        budgets=("5x", "7x", "10x", "1000x"), menu_options={**small, "ls_densities": (0.1,), "iterations": 3},
        loss_fn=torch.nn.functional.cross_entropy,
    )  # fmt: skip
    assert out["quantized_only"] == ["depthwise", "same"] and len(saves) == 4
    # at 10x bits only is infeasible (2-bit codes and their scales exceed it); the menu is not
    tenfold = out["budgets"]["10x"]
    assert "infeasible" in tenfold["bits_only_as_compress"] and "bits" in tenfold["infeasible"]
    assert tenfold["returned"]["quantized_weight_bytes"] <= fp32 / 10
    assert "joint_infeasible" in out["budgets"]["1000x"]
    for budget in ("5x", "7x"):
        cell = out["budgets"][budget]
        bits, joint = cell["candidates"]["bits"], cell["candidates"]["joint"]
        # the search's bits-only candidate is the model compress makes from the same table
        assert bits["rpa_drop_pp"] == cell["bits_only_as_compress"]["rpa_drop_pp"]
        assert bits["bytes"] == cell["bits_only_as_compress"]["planned_bytes"]
        chosen = cell["candidates"][cell["returned"]["chosen"]]
        assert chosen["measured_loss"] == min(c["measured_loss"] for c in cell["candidates"].values())
        assert cell["returned"]["rpa_drop_pp"] == pytest.approx(chosen["rpa_drop_pp"])
        assert cell["returned"]["quantized_weight_bytes"] <= fp32 / float(budget[:-1])
        assert "rpa_drop_pp" in joint
    assert out["forward_backward_seconds"]["cpu"] > 0
    assert out["budgets"]["5x"]["cost_in_forward_backward_passes"]["joint"] > 1
    assert out["budgets"]["5x"]["peak_rss_mb"] > 0
    assert out["budgets"]["5x"]["cpu_seconds"]["joint_includes_menu"]
    assert not out["budgets"]["7x"]["cpu_seconds"]["joint_includes_menu"]
