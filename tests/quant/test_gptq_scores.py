"""Options scored on GPTQ-rounded weights, and the allocated plan checked against its uniform point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cetopt
from cetopt.allocation.costs import option_bytes
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import CetoptError
from cetopt.pipeline import check_against_uniform, uniform_plan
from cetopt.quant import gptq_option_weights


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)
    ).eval()
    # correlated inputs: GPTQ then rounds differently from round-to-nearest
    x = torch.randn(384, 8) @ torch.randn(8, 32) + 0.1 * torch.randn(384, 32)
    y = model(x).argmax(1)
    return model, [(x[:128], y[:128])], [(x[128:256], y[128:256])], [(x[256:], y[256:])]


def test_gptq_option_weights_are_the_codes_quantize_writes():
    model, calib, _, _ = _model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = gptq_option_weights(model, ["0", "2"], [(3, None), (2, 16)], calib)
    for (bits, group), per_layer in weights.items():
        q = cetopt.quantize(model, {"0": bits, "2": bits}, gptq=calib, group_size=group)
        for name in ("0", "2"):
            assert torch.equal(per_layer[name], dict(q.named_modules())[name].weight)
        # GPTQ moved the codes away from round to nearest
        rtn = cetopt.quantize(model, {"0": bits}, group_size=group)
        assert not torch.equal(per_layer["0"], rtn[0].weight)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_sensitivity_with_gptq_measures_the_gptq_rounded_layer_alone():
    model, calib, scoring, _ = _model_and_data()
    table = cetopt.sensitivity(
        model, scoring, bits=(2, 3, 8), method="measured", group_sizes=(None, 16), gptq=calib, progress=False
    )
    rtn = cetopt.sensitivity(
        model, scoring, bits=(2, 3, 8), method="measured", group_sizes=(None, 16), progress=False
    )
    assert table.meta["gptq"] is True and rtn.meta["gptq"] is False
    assert not np.allclose(table.values, rtn.values)
    with torch.no_grad():
        x, y = scoring[0]
        base = float(nn.functional.cross_entropy(model(x), y))
        weights = gptq_option_weights(model, table.layers, [(2, 16)], calib)[(2, 16)]
        j = next(k for k, (b, g) in enumerate(zip(table.bits, table.groups)) if (b, g) == (2, 16))
        for i, name in enumerate(table.layers):
            trial = cetopt.quantize(model, {})  # a copy
            dict(trial.named_modules())[name].weight.data = weights[name]
            expected = float(nn.functional.cross_entropy(trial(x), y)) - base
            assert table.values[i, j] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # GPTQ-rounded 2-bit layers lose less than round-to-nearest ones on the whole
    two = [k for k, b in enumerate(table.bits) if b == 2]
    assert table.values[:, two].sum() < rtn.values[:, two].sum()


def _table(values, params=(1536, 2304, 480), channels=(48, 48, 10)) -> SensitivityTable:
    return SensitivityTable(
        layers=["0", "2", "4"],
        bits=[2, 3, 4, 8],
        values=np.asarray(values, dtype=float),
        params=list(params),
        channels=list(channels),
        method="user",
    )


def test_uniform_plan_is_the_largest_uniform_column_within_the_budget():
    table = _table(np.ones((3, 4)))
    totals = option_bytes(table).sum(axis=0)
    plan = uniform_plan(table, totals[2] + 1)
    assert {int(b) for b in plan.bits.values()} == {4} and plan.bytes == totals[2]
    plan = uniform_plan(table, totals[2] - 1)
    assert {int(b) for b in plan.bits.values()} == {3}
    assert uniform_plan(table, totals[0] - 1) is None


def test_check_returns_the_uniform_plan_when_the_allocation_was_misled():
    model, calib, _, holdout = _model_and_data()
    # scores that lie: the first layer "free" at 2 bits, the others costly below 4
    lies = _table([[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 0.0, 0.0], [9.0, 9.0, 0.0, 0.0]])
    budget = option_bytes(lies).sum(axis=0)[1]  # uniform 3 bits
    plan = cetopt.allocate(lies, budget)
    assert int(plan.bits["0"]) == 2
    options = {"gptq": calib, "sequential": True}
    q, chosen, check = check_against_uniform(model, lies, plan, holdout, quantize_options=options)
    assert check.plan_bytes <= budget and check.uniform_bytes <= budget
    assert check.uniform_option == "3 bits"
    x, y = holdout[0]
    flat = cetopt.quantize(model, {n: 3 for n in ("0", "2", "4")}, **options)
    mixed = cetopt.quantize(model, plan, **options)
    losses = {k: float(nn.functional.cross_entropy(m(x), y)) for k, m in (("plan", mixed), ("uniform", flat))}
    assert check.plan_loss == pytest.approx(losses["plan"]) and check.uniform_loss == pytest.approx(
        losses["uniform"]
    )
    winner = min(losses, key=losses.get)
    assert check.chosen == winner
    assert torch.equal(q(x), (flat if winner == "uniform" else mixed)(x))
    again = check_against_uniform(
        model, lies, plan, holdout, quantize_options=options, applied={"plan": mixed, "uniform": flat}
    )
    assert again[2] == check and again[0] is (flat if winner == "uniform" else mixed)
    if winner == "plan":
        assert chosen is plan
    else:
        assert {int(b) for b in chosen.bits.values()} == {3}


def test_check_keeps_a_plan_that_is_the_uniform_one():
    model, _calib, _, holdout = _model_and_data()
    table = _table(np.ones((3, 4)))
    budget = option_bytes(table).sum(axis=0)[2]
    plan = uniform_plan(table, budget)
    _, chosen, check = check_against_uniform(model, table, plan, holdout)
    assert check.chosen == "plan" and check.uniform_loss is None and chosen is plan


def test_compress_scores_on_gptq_and_checks_on_holdout():
    model, calib, _, holdout = _model_and_data()
    result = cetopt.compress(
        model,
        calib,
        "3bits",
        bits=(2, 3, 4),
        method="measured",
        group_sizes=(None, 16),
        score_gptq=True,
        holdout=holdout,
        progress=False,
    )
    assert result.table.meta["gptq"] is True
    assert result.check is not None and result.check.chosen in ("plan", "uniform")
    assert result.plan.bytes <= result.plan.budget_bytes
    if result.check.uniform_loss is not None:
        assert min(result.check.plan_loss, result.check.uniform_loss) == pytest.approx(
            result.check.plan_loss if result.check.chosen == "plan" else result.check.uniform_loss
        )
    with pytest.raises(CetoptError, match="per-layer"):
        cetopt.compress(model, calib, "3bits", per_channel=True, holdout=holdout, progress=False)
