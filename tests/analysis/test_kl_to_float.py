"""Scoring by the divergence from the float model (``loss_fn="kl_to_float"``) and monotone tables."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cetopt
from cetopt.allocation.costs import option_bytes
from cetopt.analysis.objective import kl_to_float, resolve_loss
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import CetoptError, DataShapeError
from cetopt.pipeline import check_against_uniform


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 7)).eval()
    x = torch.randn(192, 16)
    y = torch.randint(0, 7, (192,))  # targets kl_to_float never reads
    return model, [(x[:64], y[:64]), (x[64:96], y[64:96])], [(x[96:], y[96:])]


def _kl(model, quantized, batches) -> float:
    total = sum(len(x) for x, _ in batches)
    with torch.no_grad():
        out = 0.0
        for x, _ in batches:
            p, q = F.log_softmax(model(x).double(), -1), F.log_softmax(quantized(x).double(), -1)
            out += float(F.kl_div(q, p, log_target=True, reduction="batchmean")) * len(x) / total
    return out


def test_kl_to_float_is_zero_at_the_reference_and_matches_kl_div():
    g = torch.Generator().manual_seed(1)
    ref, other = torch.randn(4, 5, 9, generator=g), torch.randn(4, 5, 9, generator=g)
    assert float(kl_to_float(ref, ref)) == pytest.approx(0.0, abs=1e-7)
    expected = (
        F.kl_div(F.log_softmax(other, -1), F.log_softmax(ref, -1), log_target=True, reduction="sum") / 20
    )
    assert float(kl_to_float({"logits": other}, ref)) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(DataShapeError, match="differ in shape"):
        kl_to_float(other[:, :4], ref)
    with pytest.raises(CetoptError, match="kl_to_float"):
        resolve_loss("kl_to_floatt")


def test_measured_kl_is_the_divergence_of_each_layer_quantized_alone():
    model, data, _ = _model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = cetopt.sensitivity(
        model,
        data,
        bits=(2, 3, 8),
        method="measured",
        loss_fn="kl_to_float",
        group_sizes=(None, 8),
        progress=False,
    )
    assert table.meta["loss"] == "kl_to_float"
    assert table.meta["base_loss"] == pytest.approx(0.0, abs=1e-6)
    assert np.all(table.values > 0)  # never a "gain", unlike a task loss on few examples
    for i, name in enumerate(table.layers):
        for j, (b, g) in enumerate(zip(table.bits, table.groups)):
            q = cetopt.quantize(model, {name: int(b)}, group_size=g)
            assert table.values[i, j] == pytest.approx(_kl(model, q, data), rel=1e-4, abs=1e-8)
    # inputs alone are enough: the targets are the float model's own outputs
    alone = cetopt.sensitivity(
        model, [x for x, _ in data], bits=(2, 3, 8), method="measured", loss_fn="kl_to_float", progress=False
    )
    assert np.allclose(alone.values, table.values[:, [0, 2, 4]])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cet_on_kl_is_the_fisher_quadratic_form_and_fisher_refuses():
    model, data, _ = _model_and_data()
    cet = cetopt.sensitivity(model, data, bits=(4, 8), method="cet", loss_fn="kl_to_float", progress=False)
    measured = cetopt.sensitivity(
        model, data, bits=(4, 8), method="measured", loss_fn="kl_to_float", progress=False
    )
    first = np.asarray(cet.meta["first_order"])
    assert np.abs(first).max() < 1e-4 * np.abs(cet.values).max()  # the gradient vanishes at the float weights
    assert np.all(cet.values >= 0)  # exact probes: Δᵀ F Δ of a positive semi-definite F
    # second order is exact in the limit of small changes: 8 bits within a few percent
    assert np.allclose(cet.values[:, 1], measured.values[:, 1], rtol=0.05)
    with pytest.raises(CetoptError, match="fisher"):
        cetopt.sensitivity(model, data, bits=(4, 8), method="fisher", loss_fn="kl_to_float", progress=False)


def test_check_against_uniform_compares_plans_by_their_divergence():
    model, data, holdout = _model_and_data()
    table = cetopt.sensitivity(
        model, data, bits=(2, 3, 4), method="measured", loss_fn="kl_to_float", progress=False
    )
    totals = option_bytes(table).sum(axis=0)
    budget = 0.5 * (totals[1] + totals[2])  # between uniform 3 and 4 bits
    plan = cetopt.allocate(table, budget)
    assert len({int(b) for b in plan.bits.values()}) > 1  # a mixed plan to check
    q, chosen, check = check_against_uniform(model, table, plan, holdout, loss_fn="kl_to_float")
    assert check.loss == "kl_to_float" and check.base_loss == pytest.approx(0.0, abs=1e-6)
    flat = cetopt.quantize(model, {n: 3 for n in table.layers})
    mixed = cetopt.quantize(model, plan)
    assert check.plan_loss == pytest.approx(_kl(model, mixed, holdout), rel=1e-5)
    assert check.uniform_loss == pytest.approx(_kl(model, flat, holdout), rel=1e-5)
    assert check.chosen == ("uniform" if check.uniform_loss < check.plan_loss else "plan")
    winner = flat if check.chosen == "uniform" else mixed
    assert torch.equal(q(holdout[0][0]), winner(holdout[0][0]))
    assert (chosen is plan) == (check.chosen == "plan")
    result = cetopt.compress(
        model, data, budget, bits=(2, 3, 4), method="measured", loss_fn="kl_to_float", gptq=False,
        bias_correction=False, holdout=holdout, progress=False,
    )  # fmt: skip
    assert result.check.loss == "kl_to_float" and result.table.meta["loss"] == "kl_to_float"


def test_the_joint_menu_scores_and_compares_plans_by_kl_to_float():
    model, data, _ = _model_and_data(3)
    options = {"holdout": 0, "refine": 1, "menu_options": {"iterations": 4, "max_examples": 64}}
    kw = {"bits": (2, 3, 4, 8), "method": "measured", "progress": False}
    joint = cetopt.compress(model, data, "6x", loss_fn="kl_to_float", joint=True, joint_options=options, **kw)
    plain = cetopt.compress(model, data, "6x", loss_fn="kl_to_float", **kw)
    search = joint.joint
    bits = search.candidate("bits")
    assert {n: o.bits for n, o in bits.options.items()} == dict(plain.plan.bits)
    assert search.base_loss == pytest.approx(0.0, abs=1e-9)  # the float model against itself
    for candidate in search.candidates:
        assert candidate.measured_loss >= -1e-9
    assert bits.measured_loss == pytest.approx(_kl(model, plain.model, data), rel=1e-5)
    assert search.best.measured_loss <= bits.measured_loss
    assert search.best.measured_loss == pytest.approx(_kl(model, joint.model, data), rel=1e-5, abs=1e-9)
    # the options were scored in the same units: every quant option's loss is a divergence
    menu = search.menu
    assert all(o.loss >= -1e-9 for n in menu.layers for o in menu.options[n] if o.kind == "quant")
    # score_menu takes the name too, with the float model's own outputs as the targets
    from cetopt.lowrank import score_menu
    from cetopt.lowrank.menu import option_matrix

    rescored = score_menu(model, menu, data, loss_fn="kl_to_float")
    option = next(o for o in rescored.options["2"] if o.kind == "svd")
    changed = copy.deepcopy(model)
    changed[2].weight.data = option_matrix(option, model[2].weight.detach()).float()
    assert option.loss == pytest.approx(_kl(model, changed, data), rel=1e-4)


def _table(values, groups=(None, 8, None, 8, None)) -> SensitivityTable:
    return SensitivityTable(
        layers=["a", "b"],
        bits=[2, 2, 3, 3, 8],
        groups=list(groups),
        values=np.asarray(values, dtype=float),
        params=[64, 64],
        channels=[4, 4],  # rows of 16 columns
    )


def test_monotone_envelopes_never_rise_with_more_bits_or_finer_groups():
    # options (2, ch), (2, 8), (3, ch), (3, 8), (8, ch); layer a is already monotone, layer b's
    # (3, 8) scores above (2, 8) and (3, ch), both coarser ((2, 8) and (3, ch) are not ordered)
    values = [[9.0, 7.0, 3.0, 2.0, 0.1], [9.0, 5.0, 4.0, 6.0, 0.1]]
    table = _table(values)
    finer = table.finer_options()
    assert finer[0, 0, 1] and not finer[0, 1, 0] and finer[0, 1, 3] and not finer[0, 1, 2]
    for envelope in ("upper", "lower", "mean"):
        m = table.monotone(envelope)
        assert m.meta["monotone"] == envelope
        assert np.array_equal(m.values[0], table.values[0])
        for i in range(2):
            for j in range(5):
                for k in range(5):
                    if finer[i, j, k]:
                        assert m.values[i, k] <= m.values[i, j]
    assert list(table.monotone("upper").values[1]) == [9.0, 6.0, 6.0, 6.0, 0.1]
    assert list(table.monotone("lower").values[1]) == [9.0, 5.0, 4.0, 4.0, 0.1]
    assert list(table.monotone().values[1]) == [9.0, 5.5, 5.0, 5.0, 0.1]
    # a group as wide as the row is the row: (2, 16) and (2, per channel) are the same option
    wide = _table(values, groups=(None, 16, None, 8, None))
    assert wide.finer_options()[1, 0, 1] and wide.finer_options()[1, 1, 0]
    assert wide.monotone("upper").values[1, 0] == wide.monotone("upper").values[1, 1] == 9.0
    with pytest.raises(DataShapeError, match="envelope"):
        table.monotone("median")
