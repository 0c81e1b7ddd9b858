import copy

import numpy as np
import pytest
import torch

import cetopt
from cetopt.errors import DomainError, UnsupportedLayerError
from cetopt.leo import Domain
from tests.leo.nets import tiny_mlp


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_box_broadcasts_scalars_and_keeps_shape():
    d = Domain.box(np.zeros((1, 2, 2)), 1.0)
    assert d.features == 4 and d.shape == (1, 2, 2)
    assert np.all(d.hi == 1.0)


def test_from_data_and_ball():
    x = np.array([[0.0, 1.0], [2.0, -1.0]])
    d = Domain.from_data(x)
    assert np.allclose(d.lo, [[0, -1]]) and np.allclose(d.hi, [[2, 1]])
    b = Domain.ball(np.array([[0.0, 1.0], [2.0, 0.5]]), 0.5, clip=(0.0, 2.0))
    assert (
        b.boxes == 2 and np.allclose(b.lo, [[0, 0.5], [1.5, 0]]) and np.allclose(b.hi, [[0.5, 1.5], [2, 1]])
    )
    assert b.contains(np.array([[0.0, 1.0], [2.0, 0.5], [1.0, 1.0]])).tolist() == [True, True, False]


@pytest.mark.parametrize(
    "domain, match",
    [
        ((1.0, 0.0), "lo > hi"),
        ((np.array([0.0, np.nan]), 1.0), "NaN"),
        ((np.zeros(3), np.ones(3)), "3 features"),
        ((0.0, np.inf), "finite"),
    ],
)
def test_bad_domains_raise_named_errors_and_leave_the_model_alone(domain, match):
    model = tiny_mlp(0)
    before = copy.deepcopy(model)
    with pytest.raises(DomainError, match=match):
        cetopt.find_stable_units(model, domain)
    assert _same(model, before)


def test_domain_object_of_wrong_dimension():
    with pytest.raises(DomainError, match="features"):
        cetopt.find_stable_units(tiny_mlp(0), Domain.box(np.zeros(5), np.ones(5)))


def test_unsupported_layer_is_named_and_model_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 1)).eval()
    before = copy.deepcopy(model)
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(Sigmoid\)") as info:
        cetopt.find_stable_units(model, (-1.0, 1.0))
    assert info.value.module_name == "1"
    assert _same(model, before)


def test_maxpool_is_unsupported():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(2, 1),
    ).eval()
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d"):
        cetopt.find_stable_units(model, (0.0, 1.0), input_shape=(1, 4, 4))
