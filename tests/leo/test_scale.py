"""LEO at larger inputs: sparse conv maps in the attack and the network, data-started attack,
the skipped big LPs, and the large-input training recipe's classifier fine-tune."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import cetopt
import cetopt.leo.attack as attack_mod
import cetopt.leo.network as network_mod
from cetopt.leo import Domain
from cetopt.leo.attack import NetworkTorch, search_sign_change
from cetopt.leo.network import extract
from cetopt.leo.training import StridedConvNet, _penalised_weights, finetune_head


def _strided(seed: int = 0, size: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return StridedConvNet(size, c1=3, c2=4, hidden=6).eval()


def test_sparse_conv_maps_match_dense_values_and_gradients(monkeypatch):
    model = _strided()
    net = extract(model, (1, 12, 12))
    x = torch.rand(5, 144, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    for density in (0.0, 1.0):  # 0: every term dense; 1: every sparse-enough term as CSR
        monkeypatch.setattr(attack_mod, "_SPARSE_DENSITY", density)
        tn = NetworkTorch(net)
        assert any(s for s, _ in tn.terms[1].values()) == (density > 0)
        z = x.clone().requires_grad_(True)
        g = tn.preactivation(z, 3)
        (grad,) = torch.autograd.grad(g[:, 2].sum(), z)
        out[density] = (g.detach(), grad)
    assert torch.allclose(out[0.0][0], out[1.0][0], atol=1e-12, rtol=0)
    assert torch.allclose(out[0.0][1], out[1.0][1], atol=1e-12, rtol=0)
    # the CSR evaluation of the network's expressions equals the torch model in float64
    with torch.no_grad():
        ref = model.double()(x.reshape(5, 1, 12, 12))
    assert np.allclose(net.forward(x.numpy()), ref.numpy(), atol=1e-10)
    monkeypatch.setattr(network_mod, "_SPARSE_DENSITY", 0.0)
    network_mod._CSR.clear()
    assert np.allclose(net.forward(x.numpy()), ref.numpy(), atol=1e-10)


def test_data_started_attack_stays_in_the_box_and_starts_at_init():
    net = extract(_strided(2), (1, 12, 12))
    tn = NetworkTorch(net)
    lo, hi = np.full(144, 0.2), np.full(144, 0.7)
    init = np.random.default_rng(0).random((2, 3, 144))  # partly outside: clipped into the box
    channels, signs = np.array([0, 1]), np.array([1.0, -1.0])
    pts = search_sign_change(tn, 1, channels, signs, lo, hi, steps=0, init=init, step=0.05)
    assert pts.shape == (6, 144)
    assert np.array_equal(pts, np.clip(init.reshape(6, 144), lo, hi))
    pts = search_sign_change(tn, 1, channels, signs, lo, hi, steps=10, init=init, step=0.05)
    assert (pts >= lo).all() and (pts <= hi).all()
    # ascent never ends below its start (the best iterate is kept)
    g0 = net.preactivations(np.clip(init.reshape(6, 144), lo, hi))[0].reshape(6, 3, -1)
    g1 = net.preactivations(pts)[0].reshape(6, 3, -1)
    t = np.repeat(np.arange(2), 3)
    s = signs[t][:, None]
    assert (
        (s * g1[np.arange(6), channels[t]]).max(1) >= (s * g0[np.arange(6), channels[t]]).max(1) - 1e-12
    ).all()


def test_stable_channels_of_a_strided_net_are_sound(seed=3):
    """Every channel called stable keeps its sign on many random points of the box (float64)."""
    model = _strided(seed, size=8)
    with torch.no_grad():
        model.conv1.bias.add_(torch.tensor([1.0, -1.5, 0.0]))
        model.fc1.bias.add_(torch.linspace(-2, 2, 6))
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    domain = Domain.from_data(x)
    report = cetopt.find_stable_units(model, domain, data=x, workers=1, time_limit=1.0, progress=False)
    assert sum(int((layer.state != 0).sum()) for layer in report.layers) >= 2  # something to check
    net = report.network
    pts = domain.sample(4000, seed=9)
    pres = net.preactivations(pts)
    for layer, g in zip(report.layers, pres):
        g = g.reshape(len(pts), layer.units, -1)
        for c in range(layer.units):
            if layer.state[c] == 1:
                assert (g[:, c] >= 0).all()
            elif layer.state[c] == -1:
                assert (g[:, c] <= 0).all()
    compressed = cetopt.remove_stable_units(model, report)
    xs = torch.tensor(pts, dtype=torch.float64).reshape(-1, 1, 8, 8)
    with torch.no_grad():
        diff = (model.double()(xs) - compressed.double()(xs)).abs().max().item()
    assert diff <= 1e-6  # the folded weights are float32


def test_classifier_finetune_leaves_hidden_layers_untouched():
    torch.manual_seed(0)
    model = StridedConvNet(8, c1=2, c2=3, hidden=5)
    head = model.fc2
    assert [w is model.fc2.weight for w in _penalised_weights(model)] == [False] * 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    loader = [(torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))] * 3
    model.train()
    finetune_head(model, head, loader, epochs=2, lr=1e-2)
    after = model.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == (not k.startswith("fc2.")), k
    assert all(p.requires_grad for p in model.parameters())
