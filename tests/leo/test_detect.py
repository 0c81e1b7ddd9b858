import copy

import numpy as np
import pytest
import torch

import cetopt
from cetopt.leo import STAGES, Domain
from cetopt.leo.exhaustive import exhaustive_states
from cetopt.leo.network import extract
from tests.leo.nets import Residual, TinyConv, seeded, tiny_mlp

BASELINE = {"stages": ("milp",), "early_stop": False, "propagate": False}
SCREENED = {"stages": STAGES}
NO_WITNESS = {"stages": ("interval", "lp", "milp")}


def _states(report):
    return [layer.state for layer in report.layers]


def _agree(report, truth):
    return all(np.array_equal(a, b) for a, b in zip(_states(report), truth))


CASES = [
    (lambda: tiny_mlp(0), (2,), -1.0, 1.0),
    (lambda: tiny_mlp(1, widths=(6, 6, 6, 6)), (2,), -1.0, 1.0),
    (lambda: tiny_mlp(2, inputs=1, widths=(10, 10)), (1,), -2.0, 2.0),
    (lambda: seeded(Residual, 3), (3,), -1.0, 1.0),
    (lambda: seeded(TinyConv, 6, scale=0.5), (1, 4), -1.0, 1.0),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize(
    "config", [SCREENED, NO_WITNESS, BASELINE], ids=["screened", "no-witness", "baseline"]
)
def test_decisions_equal_the_exhaustive_check(case, config):
    build, shape, lo, hi = CASES[case]
    model = build()
    before = copy.deepcopy(model.state_dict())
    truth = exhaustive_states(
        extract(model, shape), np.full(int(np.prod(shape)), lo), np.full(int(np.prod(shape)), hi)
    )
    report = cetopt.find_stable_units(model, (lo, hi), input_shape=shape, workers=1, **config)
    assert _agree(report, truth), (_states(report), truth)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the test is not vacuous: each case has stable and unstable units
    flat = np.concatenate(truth)
    assert (flat == 0).any() and (flat != 0).any()


def test_milp_stage_decides_when_it_must():
    model = tiny_mlp(1, widths=(6, 6, 6, 6))
    report = cetopt.find_stable_units(model, (-1.0, 1.0), stages=("interval", "milp"), workers=1)
    assert report.stage_counts()["milp"] > 0 and report.milps > 0
    truth = exhaustive_states(extract(model, (2,)), -np.ones(2), np.ones(2))
    assert _agree(report, truth)


def test_cbc_backend_agrees():
    model = tiny_mlp(0)
    truth = exhaustive_states(extract(model, (2,)), -np.ones(2), np.ones(2))
    report = cetopt.find_stable_units(
        model, (-1.0, 1.0), solver="cbc", stages=("interval", "milp"), workers=1
    )
    assert _agree(report, truth)


def test_data_pass_and_report():
    model = tiny_mlp(0)
    x = torch.rand(200, 2) * 2 - 1
    report = cetopt.find_stable_units(model, Domain.from_data(x), data=x, workers=1)
    counts = report.stage_counts()
    assert counts["data"] > 0
    assert sum(counts.values()) == sum(layer.units for layer in report.layers)
    d = report.to_dict()
    assert d["layers"][0]["units"] == 8 and "decided_by" in d
    assert "layer" in report.summary()


def test_multi_box_domain_is_the_union():
    model = tiny_mlp(0)
    a = cetopt.find_stable_units(model, Domain.ball(np.array([[-0.5, -0.5], [0.5, 0.5]]), 0.5), workers=1)
    truths = [
        exhaustive_states(extract(model, (2,)), c - 0.5, c + 0.5)
        for c in (-0.5 * np.ones(2), 0.5 * np.ones(2))
    ]
    for layer, t1, t2 in zip(a.layers, *truths):
        want = np.where(t1 == t2, t1, 0)
        assert np.array_equal(layer.state, want)


def test_progress_can_be_disabled_and_does_not_change_the_decisions(capsys):
    build, shape, lo, hi = CASES[0]
    runs = []
    for progress in (False, True):
        runs.append(
            cetopt.find_stable_units(build(), (lo, hi), input_shape=shape, workers=1, progress=progress)
        )
        err = capsys.readouterr().err
        assert ("leo" in err) == progress
    assert all(np.array_equal(a, b) for a, b in zip(_states(runs[0]), _states(runs[1])))
