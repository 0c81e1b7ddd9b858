"""Sensitivity estimators against exact answers computed independently on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cetopt
from cetopt.analysis import quantizable_layers, rank_correlation, sensitivity
from cetopt.errors import DataShapeError, NonFiniteError, NoQuantizableLayerError
from cetopt.quant.quantizer import fake_quantize

BITS = (2, 3, 4)


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()


def _data(seed: int = 0, n: int = 64, batch: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _flat_loss(model, data, names):
    """The dataset loss as a function of the concatenated weights of ``names``, plus slices."""
    modules = dict(model.named_modules())
    shapes = [modules[n].weight.shape for n in names]
    sizes = [int(np.prod(s)) for s in shapes]
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])

    def loss(flat):
        weights, start = {}, 0
        for n, shape, size in zip(names, shapes, sizes):
            weights[f"{n}.weight"] = flat[start : start + size].view(shape)
            start += size
        params = {**dict(model.named_parameters()), **weights}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    flat = torch.cat([modules[n].weight.detach().reshape(-1) for n in names]).double()
    offsets = np.cumsum([0, *sizes])
    return loss, flat, [slice(offsets[i], offsets[i + 1]) for i in range(len(names))]


def _exact_quadratic(model, data):
    names = quantizable_layers(model)
    model = model.double()
    data = [(x.double(), y) for x, y in data]
    loss, flat, slices = _flat_loss(model, data, names)
    g = torch.func.grad(loss)(flat)
    h = torch.autograd.functional.hessian(loss, flat)
    modules = dict(model.named_modules())
    out = np.zeros((len(names), len(BITS)))
    for i, name in enumerate(names):
        w = modules[name].weight.detach()
        for j, b in enumerate(BITS):
            d = (fake_quantize(w.float(), b) - w.float()).double().reshape(-1)
            s = slices[i]
            out[i, j] = float((g[s] @ d + 0.5 * d @ h[s, s] @ d).detach())
    return out, h, slices


def test_cet_is_exact_for_a_single_layer():
    model, data = _tiny(), _data()
    exact, _, _ = _exact_quadratic(_tiny(), data)
    table = sensitivity(model, data, BITS, "cet", layers=["2"], probes=3, progress=False)
    # one layer: s_l² = 1, so every probe gives the exact ΔᵀHΔ
    np.testing.assert_allclose(table.values[0], exact[1], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(table.stderr, 0, atol=1e-6)


def test_cet_is_exact_once_the_probes_reach_the_next_power_of_two_above_the_layers():
    model, data = _tiny(), _data()
    exact, _, _ = _exact_quadratic(_tiny(), data)
    table = sensitivity(model, data, BITS, "cet", probes=4, progress=False)  # 3 layers
    assert table.meta["exact"]
    np.testing.assert_allclose(table.values, exact, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(table.stderr, 0)


def test_cet_below_exactness_is_unbiased_and_its_standard_error_is_honest():
    model, data = _tiny(), _data()
    exact, _, _ = _exact_quadratic(_tiny(), data)
    # 2 probes cannot separate 3 layers: two rounds of random signs, the error taken between them
    tables = [sensitivity(model, data, BITS, "cet", probes=2, seed=s, progress=False) for s in range(40)]
    assert not tables[0].meta["exact"] and tables[0].meta["rounds"] == 2
    values = np.stack([t.values for t in tables])
    spread = values.std(axis=0, ddof=1)
    assert spread.max() > 0
    assert np.all(np.abs(values.mean(axis=0) - exact) <= 4 * spread / np.sqrt(len(tables)) + 1e-9)
    # the mean reported standard error tracks the real spread of the estimate
    reported = np.mean([t.stderr for t in tables], axis=0)
    ratio = reported[spread > 1e-9] / spread[spread > 1e-9]
    assert 0.3 < np.median(ratio) < 3, ratio


def test_hutchinson_recovers_the_per_layer_traces():
    model, data = _tiny(), _data()
    _, h, slices = _exact_quadratic(_tiny(), data)
    table = sensitivity(model, data, BITS, "hutchinson", tol=1e-4, max_probes=400, progress=False)
    exact = np.array([float(torch.trace(h[s, s])) for s in slices])
    np.testing.assert_allclose(table.meta["traces"], exact, rtol=0.25)
    params = table.params
    modules = dict(model.named_modules())
    for i, name in enumerate(table.layers):
        w = modules[name].weight.detach()
        sq = float(((fake_quantize(w, 2) - w) ** 2).sum())
        assert table.values[i, 0] == pytest.approx(0.5 * table.meta["traces"][i] / params[i] * sq, rel=1e-6)


def test_fisher_matches_a_per_example_loop():
    model, data = _tiny(), _data(n=20, batch=7)
    table = sensitivity(model, data, BITS, "fisher", progress=False)
    modules = dict(model.named_modules())
    for i, name in enumerate(table.layers):
        w = modules[name].weight
        fisher = torch.zeros_like(w)
        for x, y in data:
            for xi, yi in zip(x, y):
                (gi,) = torch.autograd.grad(F.cross_entropy(model(xi[None]), yi[None]), w)
                fisher += gi**2
        fisher /= 20
        for j, b in enumerate(BITS):
            d = fake_quantize(w.detach(), b) - w.detach()
            assert table.values[i, j] == pytest.approx(0.5 * float((fisher * d**2).sum()), rel=1e-4, abs=1e-9)


def test_measured_is_the_loss_increase_of_quantizing_one_layer():
    model, data = _tiny(), _data()
    table = sensitivity(model, data, BITS, "measured", progress=False)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    base = F.cross_entropy(model(x), y).item()
    quantized = cetopt.quantize(model, {"2": 3})
    assert table.values[1, 1] == pytest.approx(
        F.cross_entropy(quantized(x), y).item() - base, rel=1e-4, abs=1e-7
    )


def test_cet_ranks_like_measured_on_a_trained_model():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    data = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    measured = sensitivity(model, data, BITS, "measured", progress=False)
    cet = sensitivity(model, data, BITS, "cet", probes=32, progress=False)
    assert rank_correlation(cet, measured) > 0.8


def test_table_has_the_byte_model_fields():
    table = sensitivity(_tiny(), _data(), BITS, "fisher", progress=False)
    assert list(table.layers) == ["0", "2", "4"]
    np.testing.assert_array_equal(table.params, [24, 30, 15])
    np.testing.assert_array_equal(table.channels, [6, 5, 3])
    np.testing.assert_array_equal(table.macs, [24, 30, 15])
    np.testing.assert_array_equal(table.fixed_bytes, [24, 20, 12])


def test_model_is_not_modified():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("cet", "hutchinson", "fisher", "measured"):
        sensitivity(model, _data(), BITS, method, probes=2, max_probes=4, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_nan_in_the_data_is_named():
    data = _data()
    data[2][0][3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="batch 2"):
        sensitivity(_tiny(), data, BITS, "cet", progress=False)


def test_data_of_the_wrong_shape_is_named():
    data = [(torch.randn(8, 7), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(DataShapeError, match=r"\(8, 7\)"):
        sensitivity(_tiny(), data, BITS, "cet", progress=False)


def test_batches_must_be_pairs():
    with pytest.raises(DataShapeError, match="pairs"):
        sensitivity(_tiny(), [torch.randn(8, 4)], BITS, progress=False)


def test_a_model_without_quantizable_layers_is_refused():
    with pytest.raises(NoQuantizableLayerError, match="Sequential"):
        sensitivity(nn.Sequential(nn.ReLU()), _data(), BITS, progress=False)
    with pytest.raises(NoQuantizableLayerError, match="Tanh"):
        sensitivity(_tiny(), _data(), BITS, layers=["1"], progress=False)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(cetopt.errors.CetoptError, match="hutchinson"):
        sensitivity(_tiny(), _data(), BITS, method="magic", progress=False)


def test_rank_correlation_needs_matching_tables():
    a = sensitivity(_tiny(), _data(), BITS, "fisher", progress=False)
    b = sensitivity(_tiny(), _data(), (2, 3), "fisher", progress=False)
    with pytest.raises(DataShapeError):
        rank_correlation(a, b)
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert set(rank_correlation(a, a, per_bit=True)) == set(BITS)
