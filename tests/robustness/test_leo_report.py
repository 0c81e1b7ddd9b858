"""Defect 5: a stability report is only applied to the model (the weights) it was computed on."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cetopt
from cetopt.errors import ReportMismatchError
from cetopt.leo import Domain


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias.add_(torch.linspace(-2, 2, 8))  # some units stably on, some off
    return model.eval()


def _report(model: nn.Module):
    x = torch.rand(64, 4) * 2 - 1
    return cetopt.find_stable_units(model, Domain.box(-1.0, 1.0, features=4), data=x, time_limit=5)


def test_removal_refuses_a_model_with_other_weights():
    model, other = _mlp(0), _mlp(1)
    report = _report(model)
    with pytest.raises(ReportMismatchError, match="other weights"):
        cetopt.remove_stable_units(other, report)
    small = cetopt.remove_stable_units(model, report)
    x = torch.rand(256, 4) * 2 - 1
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5


def test_one_changed_buffer_or_weight_is_a_mismatch():
    model = _mlp(0)
    report = _report(model)
    with torch.no_grad():
        model[2].weight[0, 0] += 1e-3
    with pytest.raises(ReportMismatchError):
        cetopt.remove_stable_units(model, report)


def test_the_fingerprint_is_in_the_reports_dict():
    model = _mlp(0)
    report = _report(model)
    record = json.loads(json.dumps(report.to_dict()))
    assert record["fingerprint"] == report.fingerprint and len(report.fingerprint) == 64
    assert _report(_mlp(0)).fingerprint == report.fingerprint  # same weights, same fingerprint
