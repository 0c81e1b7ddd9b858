"""Defect 1: every public entry point leaves the user's model exactly as it found it.

Each entry point runs on a model in train mode, in eval mode, and mixed (an eval-mode BatchNorm
inside a train-mode model, a frozen parameter); afterwards the state_dict is bitwise equal, and
every submodule's ``training`` flag and every parameter's ``requires_grad`` are unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cetopt
from cetopt.leo import Domain
from cetopt.lowrank import build_menu


class Net(nn.Module):
    """conv → BN → ReLU → pool → fc → ReLU → dropout → fc, for 1×8×8 inputs, 10 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 16, 12)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(self.drop(torch.relu(self.fc1(torch.flatten(x, 1)))))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)
    )


def _prepare(model: nn.Module, mode: str) -> nn.Module:
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    if mode == "train":
        model.train()
    elif mode == "eval":
        model.eval()
    else:  # a frozen eval-mode BatchNorm inside a train-mode model, and a frozen parameter
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        frozen = model.get_submodule(_frozen(model))
        frozen.bias.requires_grad_(False)
        frozen.weight.grad = torch.ones_like(frozen.weight)  # a gradient the user accumulated
    return model


def _frozen(model: nn.Module) -> str:
    return "fc1" if isinstance(model, Net) else "3"


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    }


def _assert_untouched(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(after["grad"][n] is g for n, g in before["grad"].items())
    assert all(g is None or torch.equal(g, before["grad_values"][n]) for n, g in after["grad"].items())
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    assert changed == []


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (40,), generator=gen)
    return x, y, [(x[:20], y[:20]), (x[20:], y[20:])]


PLAN = {"conv": 4, "fc1": 3, "fc2": 4}


def _menu(model, x):
    return build_menu(
        model,
        x,
        kinds=("quant", "svd", "admm"),
        bits=(4,),
        factor_bits=(),
        rank_fractions=(1 / 4,),
        ls_rank_fractions=(1 / 4,),
        ls_densities=(0.1,),
        iterations=2,
    )


def _refit(model, x):
    menu = _menu(model, x)
    plan = menu.choose(menu.dense_params / 2, kinds=("admm", "svd"))
    return menu.refit_sequential(model, plan, x, iterations=2)


def _apply(model, x):
    menu = _menu(model, x)
    return menu.apply(model, menu.choose(menu.dense_params / 2))


def _save(model, x, tmp_path):
    cetopt.save(cetopt.quantize(model, PLAN), tmp_path / "m.safetensors")
    cetopt.save(model, tmp_path / "float.safetensors")


def _load(model, x, tmp_path):
    cetopt.save(cetopt.quantize(model, PLAN), tmp_path / "m.safetensors")
    return cetopt.load(tmp_path / "m.safetensors", model=model)


quiet = {"progress": False}
ENTRY_POINTS = {
    "sensitivity-measured": lambda m, x, b, t: cetopt.sensitivity(m, b, (2, 4), "measured", **quiet),
    "sensitivity-cet": lambda m, x, b, t: cetopt.sensitivity(m, b, (2, 4), "cet", probes=4, **quiet),
    "sensitivity-hutchinson": lambda m, x, b, t: cetopt.sensitivity(
        m, b, (2, 4), "hutchinson", max_probes=4, **quiet
    ),
    "sensitivity-fisher": lambda m, x, b, t: cetopt.sensitivity(m, b, (2, 4), "fisher", **quiet),
    "channel_sensitivity-cet": lambda m, x, b, t: cetopt.channel_sensitivity(m, b, (2, 4), probes=4, **quiet),
    "channel_sensitivity-measured": lambda m, x, b, t: cetopt.channel_sensitivity(
        m, b, (2, 4), "measured", **quiet
    ),
    "compress": lambda m, x, b, t: cetopt.compress(m, b, "6x", bits=(2, 4, 8), probes=4, **quiet),
    "compress-measured-one-pass": lambda m, x, b, t: cetopt.compress(
        m, b, "6x", method="measured", bits=(2, 4, 8), sequential=False, **quiet
    ),
    "quantize-gptq-bias": lambda m, x, b, t: cetopt.quantize(m, PLAN, gptq=b, bias_correction=b),
    "quantize-sequential": lambda m, x, b, t: cetopt.quantize(
        m, PLAN, gptq=b, bias_correction=b, sequential=True
    ),
    "decompose-admm": lambda m, x, b, t: cetopt.decompose(m, x, rank=2, nnz=0.1, iterations=2),
    "decompose-weight_space": lambda m, x, b, t: cetopt.decompose(m, x, rank=2, method="weight_space"),
    "build_menu": lambda m, x, b, t: _menu(m, x),
    "menu.apply": lambda m, x, b, t: _apply(m, x),
    "menu.refit_sequential": lambda m, x, b, t: _refit(m, x),
    "self_compress": lambda m, x, b, t: cetopt.self_compress(
        m, (x, torch.cat([b[0][1], b[1][1]])), steps=3, preservation_size=8, check_every=1
    ),
    "save": lambda m, x, b, t: _save(m, x, t),
    "load": lambda m, x, b, t: _load(m, x, t),
}
MODES = ("train", "eval", "mixed")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point_leaves_the_model_untouched(entry, mode, tmp_path):
    torch.manual_seed(0)
    model = _prepare(Net(), mode)
    x, _, batches = _data()
    before = _snapshot(model)
    ENTRY_POINTS[entry](model, x, batches, tmp_path)
    _assert_untouched(model, before)


def _leo_find(model, x):
    return cetopt.find_stable_units(model, Domain.box(-1.0, 1.0, features=4), data=x, time_limit=5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", ["find_stable_units", "remove_stable_units"])
def test_leo_leaves_the_model_untouched(entry, mode):
    torch.manual_seed(0)
    model = _prepare(_mlp(), mode)
    x = torch.rand(32, 4) * 2 - 1
    if entry == "remove_stable_units":
        with torch.no_grad():
            reference = _prepare(_mlp(), "eval")
            reference.load_state_dict(model.state_dict())
        report = _leo_find(reference, x)
        before = _snapshot(model)
        cetopt.remove_stable_units(model, report)
    else:
        before = _snapshot(model)
        _leo_find(model, x)
    _assert_untouched(model, before)


def test_measured_on_a_train_mode_model_with_dropout_is_repeatable():
    torch.manual_seed(0)
    model = _prepare(Net(), "train")
    _, _, batches = _data()
    first = cetopt.sensitivity(model, batches, (2, 4), "measured", progress=False)
    second = cetopt.sensitivity(model, batches, (2, 4), "measured", progress=False)
    np.testing.assert_array_equal(first.values, second.values)


def test_the_analysis_sees_the_eval_mode_model():
    """A train-mode model is measured as if in eval mode: the same table as its eval-mode twin."""
    torch.manual_seed(0)
    model = _prepare(Net(), "train")
    twin = _prepare(Net(), "eval")
    twin.load_state_dict(model.state_dict())
    _, _, batches = _data()
    a = cetopt.sensitivity(model, batches, (2, 4), "measured", progress=False)
    b = cetopt.sensitivity(twin, batches, (2, 4), "measured", progress=False)
    np.testing.assert_array_equal(a.values, b.values)
