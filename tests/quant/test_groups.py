"""Group-wise quantization: RTN and GPTQ against direct references, bytes, files, the ILP's choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cetopt
from cetopt.allocation.costs import group_scale_bytes, option_bytes
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import DataShapeError, ModelFileError
from cetopt.graph.decisions import Quantize
from cetopt.graph.rewriter import rewrite
from cetopt.quant.gptq import GroupScales, _round_columns, reround
from cetopt.quant.quantizer import codes_for, half_step, quantize_weight, row_scales
from cetopt.serialization import _metadata, saved_size

DATA = Path(__file__).resolve().parent.parent / "data"


def _reference_group_rtn(w: torch.Tensor, bits: int, g: int, grid: int = 64, min_ratio: float = 0.3):
    """Every candidate step of every group tried on the group's values directly."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    scales = []
    for r in range(w.shape[0]):
        row_scales_ = []
        for a in range(0, w.shape[1], g):
            v = w[r, a : a + g].double()
            wmax = float(v.abs().max())
            best, best_err = 1.0, float("inf")
            for ratio in torch.linspace(min_ratio, 1.0, grid, dtype=torch.float32).tolist():
                step = max(ratio * wmax / qmax, torch.finfo(torch.float32).tiny)
                for s in (step, -step):
                    err = float(((torch.clamp(torch.round(v / s), -qmax - 1, qmax) * s - v) ** 2).sum())
                    if err < best_err:
                        best, best_err = s, err
            s16 = float(half_step(torch.tensor([best])))
            out[r, a : a + g] = torch.clamp(torch.round(v / s16), -qmax - 1, qmax) * s16
            row_scales_.append(s16)
        scales.append(row_scales_)
    return out, torch.tensor(scales, dtype=torch.float64)


@pytest.mark.parametrize("bits,g,cols", [(3, 8, 32), (2, 16, 40), (4, 32, 24)])
def test_group_rtn_matches_direct_search(bits, g, cols):
    torch.manual_seed(bits)
    w = torch.randn(5, cols) * torch.linspace(0.1, 3, cols)
    qw = quantize_weight(w, bits, group_size=g)
    expected, scales = _reference_group_rtn(w, bits, g)
    assert qw.scale.shape == (5, -(-cols // g))
    assert torch.allclose(qw.scale.double(), scales, rtol=0, atol=0)
    assert torch.allclose(qw.dequantize().double(), expected.double(), atol=1e-6)
    # groups only ever help: each group's error is at most what the channel's step gives it
    per_channel = quantize_weight(w, bits)
    assert ((qw.dequantize() - w) ** 2).sum() <= ((per_channel.dequantize() - w) ** 2).sum() * 1.001


def test_group_scales_are_float16_values_and_conv_is_flattened():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)  # 27 columns per channel, groups of 8: 4 groups, the last of 3
    qw = quantize_weight(w, 3, group_size=8)
    assert qw.scale.shape == (4, 4) and qw.q.shape == w.shape
    assert torch.equal(qw.scale.half().float(), qw.scale)
    flat = w.reshape(4, -1)
    steps = qw.scale.repeat_interleave(8, dim=1)[:, :27]
    assert torch.equal(qw.dequantize().reshape(4, -1), qw.q.reshape(4, -1).float() * steps)
    assert ((qw.dequantize().reshape(4, -1) - flat).abs() <= steps.abs() * 4.01).all()


def _reference_gptq(w, h, bits, g, act_order, damp=0.01):
    """Column by column with the full inverse Hessian (OBQ's update), scales set on first touch."""
    out, n = w.shape
    w, qmax = w.clone(), torch.full((out,), 2.0 ** (bits - 1) - 1, dtype=torch.float64)
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(hd)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n)
    scale, fixed = torch.zeros(out, -(-n // g), dtype=torch.float64), set()
    codes = torch.zeros_like(w)
    bits_t = torch.full((out,), bits)
    for c in order.tolist():
        k = c // g
        if k not in fixed:
            scale[:, k] = half_step(row_scales(w[:, k * g : (k + 1) * g], bits_t).float()).double()[:, 0]
            fixed.add(k)
        codes[:, c] = codes_for(w[:, c], scale[:, k], qmax)
        err = (w[:, c] - codes[:, c] * scale[:, k]) / hinv[c, c]
        w -= err[:, None] * hinv[c][None, :]
        hinv = hinv - hinv[:, c : c + 1] @ hinv[c : c + 1, :] / hinv[c, c]
    return codes, scale


@pytest.mark.parametrize("act_order", [False, True])
def test_group_gptq_matches_column_by_column_reference(act_order):
    torch.manual_seed(1)
    out, n, g = 6, 40, 8
    w = torch.randn(out, n, dtype=torch.float64)
    x = torch.randn(200, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64) * 0.3
    x[:, 3] *= 5
    h = x.T @ x
    bits = torch.full((out,), 3)
    qmax = 2.0 ** (bits.double() - 1) - 1
    expected_codes, expected_scale = _reference_gptq(w, h, 3, g, act_order)
    for block in (128, 5):  # one lazy block, and blocks that cut groups: the same result
        groups = GroupScales(
            torch.ones(out, n // g, dtype=torch.float64), g, bits, torch.zeros(n // g, dtype=torch.bool)
        )
        codes = _round_columns(w, h, None, qmax, 0.01, block, groups=groups, act_order=act_order)
        assert torch.equal(codes, expected_codes)
        assert torch.equal(groups.scale, expected_scale)


def test_group_gptq_lowers_output_error_and_keeps_bytes():
    torch.manual_seed(2)
    layer = nn.Linear(64, 16)
    x = torch.randn(256, 64) @ torch.randn(64, 64) * 0.5
    model = nn.Sequential(layer)
    rtn = cetopt.quantize(model, {"0": 3}, group_size=16)
    gptq = cetopt.quantize(model, {"0": 3}, group_size=16, gptq=[x])
    ref = layer(x)
    assert ((gptq(x) - ref) ** 2).mean() < ((rtn(x) - ref) ** 2).mean()
    assert gptq[0].weight_scale.shape == rtn[0].weight_scale.shape == (16, 4)
    assert saved_size(gptq) == saved_size(rtn)
    assert torch.equal(gptq[0].weight_scale.half().float(), gptq[0].weight_scale)


def _mixed_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 4)
    )


def test_group_bytes_match_the_file_and_the_table():
    model = _mixed_model()
    groups = {"0": 8, "3": 32, "5": None}  # 27 columns → 4 groups; 128 → 4 groups; per channel
    bits = {"0": 3, "3": 2, "5": 4}
    q = rewrite(model, [Quantize(n, bits[n], group_size=groups[n]) for n in bits])
    saved = cetopt.save(q, Path(__import__("tempfile").mkdtemp()) / "m.safetensors", source=None)
    assert saved.layers["0"]["scale"] == 8 * 4 * 2 and saved.layers["3"]["scale"] == 10 * 4 * 2
    assert saved.layers["5"]["scale"] == 4 * 4 and "group_size" not in saved.layers["5"]
    modules = dict(model.named_modules())
    params = [modules[n].weight.numel() for n in bits]
    channels = [modules[n].weight.shape[0] for n in bits]
    table = SensitivityTable(
        layers=list(bits),
        bits=[2, 3, 3, 4],
        groups=[32, None, 8, None],
        values=np.zeros((3, 4)),
        params=params,
        channels=channels,
    )
    sizes = option_bytes(table)
    chosen = [sizes[0, 2], sizes[1, 0], sizes[2, 3]]  # (3, 8), (2, 32), (4, channel)
    assert sum(chosen) == saved.quantized_bytes
    assert group_scale_bytes([27 * 8], [8], 8).tolist() == [8 * (2 * 4 + 1)]


def test_group_round_trip_is_bit_exact(tmp_path):
    model = _mixed_model()
    x = torch.randn(5, 3, 6, 6)
    q = cetopt.quantize(model, {"0": 3, "3": 2, "5": 4}, group_size=8, gptq=[x])
    path = tmp_path / "g.safetensors"
    cetopt.save(q, path, source=None)
    back = cetopt.load(path, model=model)
    assert back[0].weight_group == 8 and back[3].weight_scale.shape == (10, 16)
    assert torch.equal(back(x), q(x))
    for name in ("0", "3", "5"):
        assert torch.equal(back[int(name)].weight_scale, q[int(name)].weight_scale)


def test_a_group_file_with_wrong_scales_is_refused(tmp_path):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    model = nn.Sequential(nn.Linear(16, 4))
    q = cetopt.quantize(model, {"0": 3}, group_size=8)
    path = tmp_path / "g.safetensors"
    cetopt.save(q, path, source=None)
    blob = path.read_bytes()
    meta = _metadata(blob, path)
    tensors = st_load(blob)
    tensors["0.weight_scale"] = tensors["0.weight_scale"].float()  # float32 where float16 is due
    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(ModelFileError, match="float16"):
        cetopt.load(path, model=model)


def test_a_file_written_before_groups_still_loads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    back = cetopt.load(DATA / "pre_groups.safetensors", model=model)
    io = load_file(str(DATA / "pre_groups_io.safetensors"))
    # The stored output was computed on another CPU: float matmul kernels may differ by an ulp,
    # while a wrong decode moves the output by at least a quantization step.
    torch.testing.assert_close(back(io["x"]).detach(), io["y"], rtol=1e-6, atol=1e-6)
    assert back[0].weight_group is None and back[0].weight_scale.shape == (6,)


def test_ilp_picks_groups_when_they_pay():
    # two layers of 64×256; groups cut the loss of layer a a lot, of layer b not at all
    params, channels = [64 * 256] * 2, [64, 64]
    table = SensitivityTable(
        layers=["a", "b"],
        bits=[2, 2, 3, 3, 4],
        groups=[None, 32, None, 32, None],
        values=np.array([[9.0, 1.0, 4.0, 0.5, 0.2], [1.0, 1.0, 0.5, 0.5, 0.1]]),
        params=params,
        channels=channels,
    )
    sizes = option_bytes(table)
    assert sizes[0, 1] - sizes[0, 0] == 64 * (2 * 8 + 1) - 64 * 5  # 8 float16 scales + bits vs 5 B
    budget = sizes[0, 1] + sizes[1, 0] + 1
    plan = cetopt.allocate(table, budget)
    assert dict(plan.bits.items()) == {"a": 2, "b": 2}
    assert dict(plan.groups.items()) == {"a": 32, "b": 0}
    assert plan.bytes == budget - 1
    assert "group" in plan.summary() and plan.to_dict()["groups"] == {"a": 32, "b": 0}
    decisions = plan.decisions()
    assert decisions[0].group_size == 32 and decisions[1].group_size is None


def test_table_checks_group_options():
    kw = dict(layers=["a"], values=np.zeros((1, 2)), params=[4])
    with pytest.raises(DataShapeError, match="distinct"):
        SensitivityTable(bits=[2, 2], groups=[32, 32], **kw)
    with pytest.raises(DataShapeError, match="strictly increasing"):
        SensitivityTable(bits=[2, 2], **kw)
    with pytest.raises(DataShapeError, match="group size"):
        SensitivityTable(bits=[2, 3], groups=[-1, None], **kw)


def test_sensitivity_scores_group_options_and_compress_uses_them():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randn(64, 64)
    data = [(x, model(x).argmax(1))]
    table = cetopt.sensitivity(
        model, data, bits=(2, 3, 8), method="measured", group_sizes=(None, 32, 16), progress=False
    )
    assert list(zip(table.bits, table.groups)) == [
        (2, None),
        (2, 32),
        (2, 16),
        (3, None),
        (3, 32),
        (3, 16),
        (8, None),
    ]
    result = cetopt.compress(
        model, data, "3bits", bits=(2, 3, 8), method="measured", group_sizes=(None, 32, 16), progress=False
    )
    assert set(result.plan.groups) == {"0", "2"}
    for name, module in result.model.named_modules():
        if name in result.plan.groups:
            assert (module.weight_group or 0) == result.plan.groups[name]
    assert saved_size(result.model) > 0
    assert result.plan.bytes <= result.plan.budget_bytes


def test_reround_skips_layers_that_saw_no_input():
    layer = cetopt.quantize(nn.Sequential(nn.Linear(16, 4)), {"0": 3}, group_size=8)[0]
    before = layer.weight_scale.clone()
    reround(layer, torch.randn(4, 16), cetopt.quant.gptq.GramBlocks([(0, 16)], [torch.zeros(16, 16)]), 0.01)
    assert torch.equal(layer.weight_scale, before)


def test_deploy_modes_run_group_wise_layers_in_float_with_a_warning():
    from cetopt.deploy.runtime import KernelFallbackWarning, runtime

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    q = cetopt.quantize(model, {"0": 4, "2": 4}, group_size=32)
    x = torch.randn(3, 64)
    assert torch.allclose(runtime(q, "dequant-cached")(x), q(x), atol=1e-6)
    with pytest.warns(KernelFallbackWarning, match="group-wise"):
        out = runtime(q, "weight-only")(x)
    assert torch.allclose(out, q(x), atol=1e-6)
