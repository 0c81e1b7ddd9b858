"""Suffix-only measured sensitivities, chunked probes and ``method="auto"``, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cetopt
from cetopt.analysis import LossObjective, quantizable_layers, sensitivity
from cetopt.analysis.replay import PrefixReplay
from cetopt.quant.quantizer import fake_quantize


class _Block(nn.Module):
    """A residual block with the in-place habits of torchvision's: ``out += identity``, inplace ReLU."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch)
        self.conv2, self.bn2 = nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.block = _Block(4)
        self.shared = nn.Linear(4, 4)  # called twice per forward
        self.head = nn.Linear(4, 3)
        for bn in (self.block.bn1, self.block.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.block(self.stem(x)).mean((2, 3))
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


class _IgnoresReturn(nn.Module):
    """Relies on an in-place module changing its input: the replay must notice and run whole passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.relu, self.b = nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        self.relu(h)
        return self.b(h)


def _data(shape, n=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=g), torch.randint(0, 3, (batch,), generator=g))
        for _ in range(n)
    ]


def _plain_measured(model, data, bits):
    """The loss increase of each layer alone, by one whole forward pass per (layer, bits)."""
    names = quantizable_layers(model)
    obj = LossObjective(model, data, names)
    base = obj.loss()
    return np.array(
        [[obj.loss({k: w + (fake_quantize(w, b) - w)}) - base for b in bits] for k, w in obj.weights.items()]
    )


@pytest.mark.parametrize(("model", "shape"), [(_Net().eval(), (2, 5, 5)), (_IgnoresReturn().eval(), (3,))])
def test_suffix_measured_equals_whole_passes(model, shape):
    data = _data(shape)
    table = sensitivity(model, data, (2, 3, 8), "measured", progress=False)
    np.testing.assert_allclose(table.values, _plain_measured(model, data, (2, 3, 8)), rtol=1e-6, atol=1e-9)


def test_a_replay_runs_only_the_suffix_and_gives_the_plain_output():
    model = _Net().eval()
    x = torch.randn(4, 2, 5, 5)
    replay = PrefixReplay(model)
    out = replay.record(x)
    calls = []
    for name in ("stem.0", "block.conv2", "shared", "head"):
        module = replay.modules[name]
        hook = module.register_forward_hook(lambda m, a, o: calls.append(1))
        trial = module.weight.data * 0.9
        again = replay.replay(x, name, trial)
        hook.remove()
        with torch.no_grad():
            original = dict(model.named_modules())[name].weight.data.clone()
            dict(model.named_modules())[name].weight.data = trial
            expected = model(x)
            dict(model.named_modules())[name].weight.data = original
        assert torch.equal(again, expected)
    assert torch.equal(replay.record(x), out)
    assert len(calls) == 4 + 1  # each trial layer ran once, "shared" twice; nothing before it re-ran


def test_chunked_probes_give_the_same_table(monkeypatch):
    from cetopt.analysis import estimators

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    data = _data((3,), n=2)
    whole = {m: sensitivity(model, data, (2, 4), m, probes=4, progress=False) for m in ("cet", "fisher")}
    monkeypatch.setattr(estimators, "probe_chunk", lambda obj, limit=16: 1)
    monkeypatch.setattr(estimators, "sample_chunk", lambda obj, limit=128: 3)
    for method, table in whole.items():
        chunked = sensitivity(model, data, (2, 4), method, probes=4, progress=False)
        np.testing.assert_allclose(chunked.values, table.values, rtol=1e-5, atol=1e-9)


def test_auto_records_its_choice_and_why():
    model, data = _Net().eval(), _data((2, 5, 5))
    table = sensitivity(model, data, (2, 4), progress=False)
    choice = table.meta["auto"]
    assert table.method == choice["chose"] == "measured"
    assert set(choice["estimated_forward_passes"]) == {"measured", "cet"}
    assert "cheaper" in choice["reason"]
    np.testing.assert_array_equal(
        table.values, sensitivity(model, data, (2, 4), "measured", progress=False).values
    )
    channels = cetopt.channel_sensitivity(model, data, (2, 4), progress=False)
    assert channels.meta["auto"]["chose"] in ("measured", "cet")
    assert channels.method == f"{channels.meta['auto']['chose']}-channel"


def test_auto_takes_cet_when_measured_would_cost_more(monkeypatch):
    from cetopt.analysis import auto

    monkeypatch.setattr(auto, "HVP_PASSES", 1e-3)
    model, data = _Net().eval(), _data((2, 5, 5))
    table = sensitivity(model, data, (2, 4), progress=False)
    assert table.method == table.meta["auto"]["chose"] == "cet"


def test_auto_stops_adding_examples_once_the_ranking_is_stable(monkeypatch):
    from cetopt.analysis import estimators

    monkeypatch.setattr(estimators, "MIN_STABLE_EXAMPLES", 64)
    model, data = _Net().eval(), _data((2, 5, 5), n=16, batch=32)
    table = sensitivity(model, data, (2, 3, 4), progress=False)
    used = table.meta["examples_used"]
    assert 64 <= used < 16 * 32 and table.meta["auto"]["stable_ranking"] == 0.95
    head = data[: used // 32]
    expected = sensitivity(model, head, (2, 3, 4), "measured", progress=False)
    np.testing.assert_allclose(table.values, expected.values, rtol=1e-5, atol=1e-8)
    assert sensitivity(model, data, (2, 3, 4), "measured", progress=False).meta["examples_used"] == 16 * 32


def test_auto_uses_every_example_of_a_small_calibration_set():
    model, data = _Net().eval(), _data((2, 5, 5), n=16, batch=32)
    table = sensitivity(model, data, (2, 3, 4), progress=False)
    assert table.meta["examples_used"] == 16 * 32
    assert table.meta["auto"]["min_examples_before_stopping"] == 4096


def test_later_batches_are_recorded_in_one_pass_with_the_same_outputs():
    model = _Net().eval()
    data = _data((2, 5, 5), n=2)
    replay = PrefixReplay(model)
    calls = []
    hook = replay.modules["head"].register_forward_hook(lambda m, a, o: calls.append(1))
    replay.record(data[0][0])
    assert len(calls) == 2  # the first batch: one pass to find the in-place changes, one to record
    replay._reset()
    out = replay.record(data[1][0])
    hook.remove()
    assert len(calls) == 3  # a later batch: one pass
    with torch.no_grad():
        assert torch.equal(out, model(data[1][0]))
    for name in ("block.conv2", "head"):  # the kept outputs replay exactly as a plain pass
        assert torch.equal(replay.replay(data[1][0], name, replay.modules[name].weight.data), out)
