import copy

import numpy as np
import pytest
import torch

import cetopt
from cetopt.leo import Domain, load_leo_model
from cetopt.zoo import load_dataset
from tests.leo.nets import Residual, conv_bn, seeded, tiny_mlp


def _check_exact(model, compressed, domain, data=None, n=10_000):
    pts = torch.tensor(domain.sample(n, seed=1), dtype=torch.float32)
    shape = domain.shape or (domain.features,)
    with torch.no_grad():
        for x in [pts.reshape(-1, *shape)] + ([] if data is None else [data]):
            assert (compressed(x) - model(x)).abs().max().item() <= 1e-5


def _frozen(model):
    return copy.deepcopy(model.state_dict())


def _unchanged(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "name, l1, with_data, epochs",
    [
        ("digits-2x25", 1e-3, True, 6),
        ("digits-4x16", 1e-3, False, 5),
        ("digits-conv4x8", 1e-3, True, 3),
    ],
)
def test_trained_networks_compress_exactly(name, l1, with_data, epochs):
    torch.manual_seed(0)
    model = load_leo_model(name, l1=l1, epochs=epochs)
    data = load_dataset("mnist1d" if name.startswith("mnist1d") else "digits").x_train
    domain = Domain.from_data(data) if with_data else Domain.box(torch.zeros(data.shape[1:]), 1.0)
    state = _frozen(model)
    report = cetopt.find_stable_units(
        model, domain, data=data if with_data else None, workers=1, time_limit=20
    )
    compressed = cetopt.remove_stable_units(model, report)
    assert _unchanged(model, state)
    _check_exact(model, compressed, domain, data if with_data else None)
    removed = sum(len(r.inactive) for r in report.layers)
    assert removed > 0
    assert compressed.leo_removal["params_after"] < compressed.leo_removal["params_before"]


def test_batchnorm_is_folded_and_channels_removed():
    model = conv_bn(1)
    domain = Domain.box(np.zeros((1, 8, 8)), 1.0)
    report = cetopt.find_stable_units(model, domain, workers=1)
    assert any(len(r.inactive) for r in report.layers)
    compressed = cetopt.remove_stable_units(model, report)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in compressed.modules())
    _check_exact(model, compressed, domain)


def _stable_net(center_unit2: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)
    ).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([9.0, 9.0, 9.0, -9.0, 9.0, 9.0]))  # all stable: 5 active, 1 inactive
        model[2].weight[3].copy_(2 * model[2].weight[0] - model[2].weight[1])  # unit 3 = 2·u0 − u1
        model[2].bias.copy_(torch.tensor([20.0, 20.0, 0.0, 3.0, -20.0]))  # u0, u1, u3 active; u4 inactive
        if center_unit2:  # unit 2 of the second layer crosses zero
            model[2].bias[2] = -(model[2].weight[2] @ torch.relu(model[0].bias))
    return model


def test_all_stable_layers_are_merged_away():
    model = _stable_net(center_unit2=False)
    domain = Domain.box(-np.ones(2), np.ones(2))
    report = cetopt.find_stable_units(model, domain, workers=1)
    assert all(len(r.unstable) == 0 for r in report.layers)
    compressed = cetopt.remove_stable_units(model, report)
    log = compressed.leo_removal["layers"]
    assert log["0"]["merged_into"] == "2" and log["2"]["merged_into"] == "4"
    assert sum(isinstance(m, torch.nn.Linear) for m in compressed.modules()) == 1
    _check_exact(model, compressed, domain)


def test_dependent_active_units_are_folded():
    model = _stable_net(center_unit2=True)
    domain = Domain.box(-np.ones(2), np.ones(2))
    report = cetopt.find_stable_units(model, domain, workers=1)
    assert report.layers[1].state.tolist() == [1, 1, 0, 1, -1]
    compressed = cetopt.remove_stable_units(model, report)
    log = compressed.leo_removal["layers"]
    assert log["0"]["merged_into"] == "2"
    assert log["2"]["folded"] == 1 and log["2"]["removed"] == 1
    assert compressed.get_submodule("2").out_features == 3
    _check_exact(model, compressed, domain)


def test_constant_units_go_into_the_next_bias():
    model = tiny_mlp(0)
    with torch.no_grad():
        model[2].weight[1].zero_()
        model[2].bias[1] = 0.7
    domain = Domain.box(-np.ones(2), np.ones(2))
    report = cetopt.find_stable_units(model, domain, workers=1)
    assert report.layers[1].constant[1] == pytest.approx(0.7)
    compressed = cetopt.remove_stable_units(model, report)
    assert compressed.leo_removal["layers"]["2"]["constants"] >= 1
    _check_exact(model, compressed, domain)


def test_constant_network_is_reported_not_a_crash():
    model = tiny_mlp(1)
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    domain = Domain.box(-np.ones(2), np.ones(2))
    report = cetopt.find_stable_units(model, domain, workers=1)
    assert report.constant
    with pytest.warns(UserWarning, match="constant"):
        compressed = cetopt.remove_stable_units(model, report)
    assert compressed.leo_removal["constant_network"]
    _check_exact(model, compressed, domain)


def test_residual_units_are_kept_where_removal_is_not_exact():
    model = seeded(Residual, 3)
    domain = Domain.box(-np.ones(3), np.ones(3))
    report = cetopt.find_stable_units(model, domain, workers=1)
    assert len(report.layer("fc1").inactive) > 0
    compressed = cetopt.remove_stable_units(model, report)
    assert "skipped" in compressed.leo_removal["layers"]["fc1"]
    _check_exact(model, compressed, domain)
