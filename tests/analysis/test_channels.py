"""Per-channel sensitivities and per-channel plans."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cetopt
from cetopt.analysis import channel_bits, channel_sensitivity
from cetopt.errors import CetoptError
from cetopt.quant.quantizer import fake_quantize


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]


def _loss(model, data) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in data) / 32


def test_one_row_per_channel_and_each_value_is_that_channel_alone():
    model, data = _net(), _data()
    table = channel_sensitivity(model, data, bits=(2, 4), method="measured", progress=False)
    assert list(table.layers) == [f"0[{c}]" for c in range(4)] + [f"3[{c}]" for c in range(3)]
    assert list(table.params) == [3] * 4 + [24] * 3
    assert int(table.params.sum()) == sum(model[i].weight.numel() for i in (0, 3))
    trial = nn.Sequential(*[m for m in model])  # same modules; restored below
    weight = model[3].weight.detach().clone()
    try:
        with torch.no_grad():
            model[3].weight[1] = fake_quantize(weight, 2)[1]
        expected = _loss(trial, data) - _loss(_net(), data)
    finally:
        with torch.no_grad():
            model[3].weight.copy_(weight)
    # both are differences of float32 losses near 1.1, whose ulp is 1.2e-7
    assert table.values[5, 0] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _exact_channel_quadratic(model, data, bits):
    """gᵀΔ_c + ½ Δ_cᵀHΔ_c per channel from the full Hessian, in float64."""
    model = _net().double()
    x = torch.cat([b[0] for b in data]).double()
    y = torch.cat([b[1] for b in data])
    layers = [model[0], model[3]]
    shapes = [m.weight.shape for m in layers]
    sizes = [m.weight.numel() for m in layers]

    def loss(flat):
        w0, w3 = flat[: sizes[0]].view(shapes[0]), flat[sizes[0] :].view(shapes[1])
        params = {**dict(model.named_parameters()), "0.weight": w0, "3.weight": w3}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    flat = torch.cat([m.weight.detach().reshape(-1) for m in layers])
    g = torch.func.grad(loss)(flat)
    h = torch.autograd.functional.hessian(loss, flat)
    rows, start = [], 0
    for m in layers:
        w = m.weight.detach().float()
        for c in range(w.shape[0]):
            row = []
            for b in bits:
                d = torch.zeros_like(w)
                d[c] = fake_quantize(w, b)[c] - w[c]
                full = torch.zeros_like(flat)
                full[start : start + w.numel()] = d.reshape(-1).double()
                row.append(float((g @ full + 0.5 * full @ h @ full).detach()))
            rows.append(row)
        start += w.numel()
    return torch.tensor(rows)


def test_cet_per_channel_is_the_exact_quadratic_form_once_the_probes_suffice():
    model, data = _net(), _data()  # 7 channels
    table = channel_sensitivity(model, data, bits=(2, 4), method="cet", probes=8, progress=False)
    assert table.method == "cet-channel" and table.meta["exact"]
    assert table.meta["hvps"] == 2 * 8
    exact = _exact_channel_quadratic(model, data, (2, 4)).numpy()
    assert table.values == pytest.approx(exact, rel=1e-3, abs=1e-7)
    assert (table.stderr == 0).all()


def test_cet_per_channel_below_exactness_reports_a_standard_error():
    model, data = _net(), _data()
    table = channel_sensitivity(model, data, bits=(2, 4), method="cet", probes=4, rounds=2, progress=False)
    exact = _exact_channel_quadratic(model, data, (2, 4)).numpy()
    assert not table.meta["exact"] and table.meta["rounds"] == 2
    assert (table.stderr > 0).any()
    assert abs(table.values - exact).max() > 0  # cross terms remain: it is an estimate


def test_unknown_per_channel_method_is_named():
    with pytest.raises(CetoptError, match="hutchinson"):
        channel_sensitivity(_net(), _data(), method="hutchinson", progress=False)


def test_a_per_channel_plan_quantizes_each_channel_at_its_width_within_the_budget(tmp_path):
    model, data = _net(), _data()
    table = channel_sensitivity(model, data, bits=(2, 3, 4, 8), progress=False)
    plan = cetopt.allocate(table, budget="3x")
    bits = channel_bits(plan)
    assert set(bits) == {"0", "3"} and len(bits["0"]) == 4 and len(bits["3"]) == 3
    assert len({*bits["0"], *bits["3"]}) > 1  # a real mix, else this test shows nothing
    small = cetopt.quantize(model, bits)
    for layer, widths in bits.items():
        assert dict(small.named_modules())[layer].weight_bits.tolist() == widths
    saved = cetopt.save(small, tmp_path / "m.safetensors")
    # the plan rounds each channel's codes up to whole bytes; the file packs a layer's codes together
    assert plan.bytes - len(plan.bits) < saved.quantized_bytes <= plan.bytes <= plan.budget_bytes


def test_channel_bits_names_a_row_that_is_not_per_channel():
    with pytest.raises(CetoptError, match="not a per-channel row"):
        channel_bits({"fc": 4})
    with pytest.raises(CetoptError, match="every channel"):
        channel_bits({"fc[0]": 4, "fc[2]": 4})


def test_compress_per_channel_leaves_the_model_alone():
    model, data = _net(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = cetopt.compress(model, data, "3x", per_channel=True, bits=(2, 3, 4, 8), progress=False)
    assert all(k.endswith("]") for k in result.plan.bits)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
