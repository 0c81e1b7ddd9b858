"""Safety-guided self-compression: quantizer, layers, size term, removal, preservation set, restore."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

import cetopt
from cetopt.errors import DataShapeError, NoQuantizableLayerError
from cetopt.selfcompress import (
    build_preservation_set,
    quantize_ste,
    self_compress,
    self_compressing_from_float,
    storage_bytes,
)
from cetopt.selfcompress.compress import _optimizer, _Trainer
from cetopt.selfcompress.structure import mark_removable, sc_layers
from cetopt.zoo import load_dataset


class SmallCNN(nn.Module):
    """Conv → ReLU → pool → flatten → Linear → ReLU → Linear, for 1×8×8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 16, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models train fastest on one thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        idx = torch.randint(len(digits.x_train), (128,))
        loss = nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _fast(**kw):
    base = dict(steps=60, batch_size=64, bit_lr=0.2, size_weight=1.0, remove_every=20, removal_grace=10)
    return {**base, **kw}


# -- the quantizer --------------------------------------------------------------------------------


def test_q_returns_multiples_of_two_to_the_e_within_range():
    torch.manual_seed(0)
    x = torch.randn(5, 40) * 3
    b = torch.tensor([1.0, 2.0, 2.5, 4.0, 7.3])
    e = torch.tensor([-3.0, -1.0, 0.0, -2.0, -5.0])
    q = quantize_ste(x, b, e)
    k = q / torch.pow(2.0, e)[:, None]
    assert torch.equal(k, torch.round(k))
    lo, hi = -torch.pow(2.0, torch.ceil(b) - 1), torch.pow(2.0, torch.ceil(b) - 1) - 1
    assert bool((k >= lo[:, None]).all() and (k <= hi[:, None]).all())
    assert bool((k >= -torch.pow(2.0, b - 1)[:, None] - 0.5).all())
    assert not torch.equal(q, torch.zeros_like(q))


def test_b_at_or_below_zero_gives_zero_output():
    x = torch.randn(3, 10)
    q = quantize_ste(x, torch.tensor([0.0, -1.5, 3.0]), torch.tensor([-2.0, -2.0, -2.0]))
    assert torch.equal(q[:2], torch.zeros(2, 10))
    assert q[2].abs().sum() > 0


def test_straight_through_estimator_passes_gradients():
    x = (torch.randn(4, 16) * 2).requires_grad_()
    b = torch.tensor([2.0, 3.0, 4.0, 0.5], requires_grad=True)
    e = torch.tensor([-1.0, -1.0, -2.0, 0.0], requires_grad=True)
    (quantize_ste(x, b, e) * torch.randn(4, 16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # round() alone would give zero gradient
    assert b.grad is not None and b.grad.abs().sum() > 0  # through the clamp bounds
    assert e.grad is not None and e.grad.abs().sum() > 0


# -- layers, size term, saving ----------------------------------------------------------------------


def test_layer_starts_close_to_the_float_layer():
    conv = nn.Conv2d(2, 4, 3, padding=1)
    sc = self_compressing_from_float(conv, init_bits=12)
    x = torch.randn(3, 2, 5, 5)
    assert torch.allclose(sc(x), conv(x), atol=1e-2)
    with pytest.raises(TypeError, match="BatchNorm"):
        self_compressing_from_float(nn.BatchNorm2d(3))


def test_size_term_matches_the_saved_file(trained, digits, tmp_path):
    result = self_compress(trained, digits, **_fast(preservation=False))
    saved = cetopt.save(result.model, tmp_path / "m.safetensors")
    assert result.size_bytes == saved.quantized_bytes == storage_bytes(result.trained)
    bits, _ = cetopt.selfcompress.size_term(result.trained)
    # the differentiable term equals the stored bits up to each layer's last partly filled byte
    assert abs(bits.item() / 8 - saved.quantized_bytes) < len(saved.layers)
    for name, layer in sc_layers(result.trained).items():
        assert (
            saved.layers[name]["packed"] + saved.layers[name]["scale"] + saved.layers[name]["bits"]
            == layer.storage_bytes()
        )
    loaded = cetopt.load(tmp_path / "m.safetensors", model=SmallCNN())
    x = digits.x_test[:64]
    assert torch.equal(loaded(x), result.model(x))
    assert torch.equal(result.model(x), result.trained(x))


def test_zero_bit_channels_are_removed_with_their_inputs_and_optimizer_state(trained, digits):
    work = copy.deepcopy(trained)
    from cetopt.selfcompress.compress import _swap_layers

    _swap_layers(work, None, 8.0)
    example = (digits.x_train[:2],)
    mark_removable(work, example)
    assert bool(work.conv.removable.all()) and not bool(work.fc2.removable.any())  # fc2 feeds the output
    opt = _optimizer(work, 1e-3, 0.1)
    loss = nn.functional.cross_entropy(work(digits.x_train[:32]), digits.y_train[:32])
    loss.backward()
    opt.step()
    before = opt.state[work.fc1.bits]["exp_avg"].clone()
    with torch.no_grad():
        work.conv.bits[[1, 4]] = -1.0
        work.fc1.bits[[0, 5, 7]] = -1.0
    reference = work(digits.x_test[:20])
    trainer = _Trainer(work, opt, example, {"removal_grace": 0})
    trainer.clock(1)
    trainer.remove(1, final=True)
    new = trainer.model
    assert new.conv.weight.shape[0] == 4 and new.fc1.weight.shape == (9, 4 * 16)
    assert new.fc2.weight.shape == (10, 9)
    assert torch.allclose(new(digits.x_test[:20]), reference, atol=1e-5)
    params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in new.parameters()}
    state = trainer.optimizer.state[new.fc1.bits]["exp_avg"]
    keep = [i for i in range(12) if i not in (0, 5, 7)]
    assert torch.equal(state, before[keep])
    assert trainer.optimizer.state[new.fc1.weight]["exp_avg"].shape == (9, 64)


def test_restore_touches_only_zero_bit_channels_and_is_logged(trained, digits, caplog):
    work = copy.deepcopy(trained)
    from cetopt.selfcompress.compress import _swap_layers

    _swap_layers(work, None, 8.0)
    with torch.no_grad():
        work.fc1.bits[[2, 3, 9]] = torch.tensor([-0.5, -0.1, -2.0])
        work.conv.bits[0] = -0.3
    before = {n: m.bits.detach().clone() for n, m in sc_layers(work).items()}
    trainer = _Trainer(
        work,
        _optimizer(work, 1e-3, 0.1),
        (digits.x_train[:2],),
        {"restore_share": 0.5, "restore_bits": 2.0, "restore_threshold": 0.05},
    )
    with caplog.at_level(logging.INFO, logger="cetopt.selfcompress"):
        trainer.restore(7, 0.5, 0.9)
    event = trainer.restores[0]
    assert event.step == 7 and event.count == 2  # half of the four zero-bit channels
    assert event.channels == {"fc1": [3], "conv": [0]}  # nearest to zero first
    for name, layer in sc_layers(work).items():
        changed = torch.nonzero(layer.bits.detach() != before[name]).flatten().tolist()
        assert changed == event.channels.get(name, [])
        assert bool((before[name][changed] <= 0).all())
        assert bool((layer.bits.detach()[changed] == 2.0).all())
    assert "restore at step 7" in caplog.text


def test_restore_fires_in_training_when_the_threshold_is_tight(trained, digits):
    result = self_compress(trained, digits, **_fast(steps=80, restore_threshold=-1.0, removal_grace=1000))
    assert result.restores  # a negative threshold fires at every check that finds zero-bit channels
    assert all(e.count > 0 for e in result.restores)


# -- preservation set -----------------------------------------------------------------------------


def test_preservation_set_is_held_out_disjoint_from_test_and_aligned(trained, digits):
    result = self_compress(trained, digits, **_fast(steps=20))
    pres = result.preservation
    n_train = len(digits.x_train)
    assert len(pres) == 256 and bool((pres.indices >= n_train).all())  # from the val split only
    assert set(pres.counts) == {"uncertainty", "diversity", "saliency"} and min(pres.counts.values()) > 0
    assert torch.equal(pres.y, digits.y_val[torch.as_tensor(pres.indices - n_train)])
    assert torch.equal(pres.x, digits.x_val[torch.as_tensor(pres.indices - n_train)])
    test_rows = {tuple(r.tolist()) for r in digits.x_test.flatten(1)}
    assert not any(tuple(r.tolist()) in test_rows for r in pres.x.flatten(1))


def test_preservation_set_from_a_tuple_uses_only_the_holdout(trained, digits):
    x, y = digits.x_train, digits.y_train
    candidates = np.arange(100, 300)
    pres = build_preservation_set(trained, x, y, candidates, size=60)
    assert set(pres.indices.tolist()) <= set(candidates.tolist()) and len(set(pres.indices.tolist())) == 60
    assert torch.equal(pres.y, y[torch.as_tensor(pres.indices)])
    uncertain = pres.indices[[s == "uncertainty" for s in pres.sources]]
    with torch.no_grad():
        conf = torch.softmax(trained(x[torch.as_tensor(uncertain)]), -1).amax(-1)
    assert bool((conf < 0.8).all())


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_raises_named_errors_and_the_model_is_untouched(trained, digits):
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    with pytest.raises(DataShapeError, match="do not fit"):
        self_compress(trained, (torch.randn(50, 3, 8, 8), torch.zeros(50, dtype=torch.long)))
    with pytest.raises(DataShapeError, match="targets"):
        self_compress(trained, (digits.x_train, digits.y_train[:10]))
    with pytest.raises(DataShapeError, match="targets"):
        self_compress(trained, (digits.x_train, digits.y_train[:, None].expand(-1, 3)))
    with pytest.raises(DataShapeError, match="train_data"):
        self_compress(trained, [1, 2, 3])
    with pytest.raises(ValueError, match="restore_reference"):
        self_compress(trained, digits, restore_reference="worst")
    with pytest.raises(NoQuantizableLayerError, match="conv9"):
        self_compress(trained, digits, layers=["conv9"])
    with pytest.raises(NoQuantizableLayerError, match="Sequential"):
        self_compress(nn.Sequential(nn.Flatten(), nn.ReLU()), (digits.x_train, digits.y_train))
    self_compress(trained, digits, **_fast(steps=30))
    after = trained.state_dict()
    assert set(after) == set(state) and all(torch.equal(state[k], after[k]) for k in state)
    assert all(type(m) in (SmallCNN, nn.Conv2d, nn.MaxPool2d, nn.Linear) for m in trained.modules())


def test_progress_can_be_disabled_and_does_not_change_the_result(trained, digits, capsys):
    quiet = self_compress(trained, digits, **_fast(steps=20, progress=False))
    assert capsys.readouterr().err == ""
    shown = self_compress(trained, digits, **_fast(steps=20, progress=True))
    assert "self-compress" in capsys.readouterr().err
    assert quiet.size_bytes == shown.size_bytes and quiet.bits == shown.bits
    assert [e["loss"] for e in quiet.log] == [e["loss"] for e in shown.log]
