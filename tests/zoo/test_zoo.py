"""The demo zoo: offline data, deterministic training, the weight cache."""

from __future__ import annotations

import pytest
import torch

from cetopt.errors import CetoptError
from cetopt.zoo import build_model, cache_dir, load_dataset, load_model, model_names, zoo_entry


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_splits_are_disjoint_and_shaped(name):
    data = load_dataset(name)
    assert data.classes == 10
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        assert x.shape[0] == y.shape[0] > 100
        assert x.shape[1:] == data.input_shape
        assert torch.isfinite(x).all()
    train = {tuple(r.tolist()) for r in data.x_train.flatten(1)}
    val = {tuple(r.tolist()) for r in data.x_val.flatten(1)}
    test = {tuple(r.tolist()) for r in data.x_test.flatten(1)}
    assert not train & test and not val & test and not train & val


def test_a_model_trains_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CETOPT_CACHE_DIR", str(tmp_path))
    first = load_model("digits-mlp-2x25", progress=False)
    files = list((cache_dir() / "models").glob("digits-mlp-2x25-seed0-*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = load_model("digits-mlp-2x25", progress=False)
    assert files[0].stat().st_mtime_ns == mtime
    assert first is not second
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert first.zoo_info["test_accuracy"] > 0.9


def test_training_is_deterministic():
    a = load_model("digits-mlp-1x8", epochs=2, retrain=True, progress=False)
    b = load_model("digits-mlp-1x8", epochs=2, retrain=True, progress=False)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    c = load_model("digits-mlp-1x8", epochs=2, seed=1, retrain=True, progress=False)
    assert not torch.equal(a.state_dict()["layers.1.weight"], c.state_dict()["layers.1.weight"])


def test_training_gives_the_same_weights_whatever_the_callers_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = load_model("digits-cnn", epochs=1, retrain=True, progress=False)
        assert torch.get_num_threads() == 2  # the caller's setting is restored
        torch.set_num_threads(1)
        b = load_model("digits-cnn", epochs=1, retrain=True, progress=False)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_l1_changes_the_recipe_and_the_cache_key():
    plain = load_model("digits-mlp-1x8", epochs=2, progress=False)
    sparse = load_model("digits-mlp-1x8", epochs=2, l1=1e-2, progress=False)
    assert sparse.zoo_info["recipe"]["l1"] == 1e-2
    assert sparse.layers[1].weight.abs().sum() < plain.layers[1].weight.abs().sum()


@pytest.mark.parametrize("name", model_names())
def test_every_architecture_runs_on_its_data(name):
    model = build_model(name)
    data = load_dataset(zoo_entry(name).dataset)
    assert model(data.x_val[:3]).shape == (*data.y_val[:3].shape, data.classes)


def test_unknown_names_list_the_zoo():
    with pytest.raises(CetoptError, match="digits-resnet"):
        zoo_entry("imagenet-vit")
    with pytest.raises(CetoptError, match="mnist1d"):
        load_dataset("cifar10")


def test_text_corpus_is_offline_next_character_prediction():
    from cetopt.zoo.data import TEXT_VOCAB

    data = load_dataset("pydoc-text")
    assert data.classes == len(TEXT_VOCAB) == 96
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        assert x.shape == y.shape and x.shape[1] == 64 and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one character
        assert int(x.max()) < data.classes
    text = "".join(TEXT_VOCAB[i] for i in data.x_train[0].tolist())
    assert text.isprintable() or "\n" in text


def test_char_lm_trains_below_uniform_loss():
    import math

    model = load_model("pydoc-char-lm", epochs=1, progress=False)  # one epoch keeps a cold cache fast
    assert model.zoo_info["test_loss"] < 0.75 * math.log(96)
    assert model.zoo_info["test_accuracy"] > 0.2
