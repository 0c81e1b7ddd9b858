import copy
import warnings

import pytest
import torch

import cetopt
from cetopt.deploy import KernelFallbackWarning, calibrate_activations, runtime
from cetopt.deploy.activations import ActivationRanges, choose_qparams, fake_quantize_dynamic


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def test_dequant_cached_and_reference_reproduce_the_quantized_model(tiny):
    _, q, x = tiny
    ref = q(x)
    for mode in ("reference", "dequant-cached"):
        assert torch.equal(runtime(q, mode)(x), ref)


@torch.no_grad()
def test_int8_kernels_match_their_fake_quant_definition(zoo_case):
    _, _, q, data = zoo_case
    ranges = calibrate_activations(q, data.loader("val"))
    x = data.x_test[:128]
    fake = runtime(q, "fake-int8", activations=ranges)(x)
    kernel = runtime(q, "int8", activations=ranges)(x)
    ref = q(x)
    # tolerance: a few steps of the last layer's output grid (ties round apart, bias requantized)
    last = list(ranges.outputs)[-1]
    assert (kernel - fake).abs().max() <= 3 * float(ranges.outputs[last].scale) + 1e-5
    # and the quantized activations stay close to the float-activation model's outputs
    assert (kernel - ref).abs().max() <= 0.15 * ref.abs().max()
    assert (kernel.argmax(1) == ref.argmax(1)).float().mean() > 0.95


@torch.no_grad()
def test_dynamic_int8_linear_is_exact_to_its_definition(zoo_case):
    _, _, q, data = zoo_case
    x = data.x_test[:64]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelFallbackWarning)  # convolutions stay float
        kernel = runtime(q, "int8")(x)
        fake = runtime(q, "fake-int8")(x)
    assert (kernel - fake).abs().max() <= 1e-4 * fake.abs().max() + 1e-5


@torch.no_grad()
def test_weight_only_matches_reference_and_names_fallbacks(tiny):
    _, q, x = tiny
    with pytest.warns(KernelFallbackWarning) as record:
        fast = runtime(q, "weight-only")
    messages = " ".join(str(w.message) for w in record)
    assert "'conv'" in messages  # no weight-only conv kernel: float
    assert "'fc'" not in messages  # 128 → 48: the int4 kernel fits
    assert "'out'" in messages and "int8 weight kernel" in messages  # K = 48: int4 rejects it
    # bfloat16 inputs into the kernels: about 2⁻⁹ relative per rounding, two layers deep
    ref = q(x)
    assert (fast(x) - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert not torch.equal(fast(x), ref)  # the kernels ran (float would reproduce it exactly)


def test_wide_codes_fall_back_with_the_layer_named(tiny):
    model, _, x = tiny
    from tests.deploy.conftest import quantize_all

    q = quantize_all(model, 12)
    with pytest.warns(KernelFallbackWarning, match="'fc'.*12-bit"):
        out = runtime(q, "int8", calibration=[x])
    with torch.no_grad():
        assert torch.allclose(out(x), q(x), atol=1e-3 * float(q(x).abs().max()))


def test_input_model_untouched_and_result_is_new(tiny):
    _, q, x = tiny
    before, ref = _state(q), q(x).detach()
    for mode in cetopt.deploy.MODES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KernelFallbackWarning)
            out = runtime(q, mode, calibration=[x])
        assert out is not q
    after = _state(q)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(q(x), ref)


def test_load_with_mode_leaves_the_file_unchanged(tiny, tmp_path):
    _, q, x = tiny
    path = tmp_path / "m.safetensors"
    cetopt.save(q, path, source=None)
    blob = path.read_bytes()
    loaded = cetopt.load(path, model=copy.deepcopy(tiny[0]), mode="dequant-cached")
    assert path.read_bytes() == blob
    assert torch.equal(loaded(x), q(x))


def test_choose_qparams_matches_torch():
    torch.manual_seed(0)
    for _ in range(200):
        x = torch.randn(50) * 5 + torch.randn(1)
        scale, zp = torch._choose_qparams_per_tensor(x, False)
        mine_scale, mine_zp = choose_qparams(x.min(), x.max())
        assert int(mine_zp) == zp and abs(float(mine_scale) - scale) <= 1e-7 * scale
    y = torch.randn(1000)
    assert (fake_quantize_dynamic(y) - y).abs().max() <= (y.max() - y.min()) / 255


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_calibration_methods(tiny, method, per_channel):
    _, q, x = tiny
    ranges = calibrate_activations(q, [x], method=method, per_channel=per_channel)
    assert set(ranges.inputs) == {"conv", "fc", "out"}
    grid = ranges.inputs["fc"]
    assert grid.per_channel == per_channel
    if method == "minmax":
        seen = torch.relu(q.bn(q.conv(x))).flatten(1)  # fc's input (ReLU output ≥ 0)
        hi = seen.max() if not per_channel else seen.max(0).values
        assert torch.allclose(grid.hi, hi)
    again = ActivationRanges.from_dict(ranges.to_dict())
    assert torch.allclose(again.inputs["fc"].scale, grid.scale)


def test_four_bit_and_per_channel_ranges_run_as_8_bit_per_tensor_kernels(tiny):
    _, q, x = tiny
    ranges = calibrate_activations(q, [x], bits=4, per_channel=True)
    fake = runtime(q, "fake-int8", activations=ranges)
    with pytest.warns(KernelFallbackWarning, match="'conv'.*4-bit per-channel"):
        runtime(q, "int8", activations=ranges)
    assert fake(x).shape == q(x).shape


def test_dequant_cached_exports_with_torch_export(tiny):
    _, q, x = tiny
    fast = runtime(q, "dequant-cached")
    program = torch.export.export(fast, (x,))
    assert torch.allclose(program.module()(x), q(x), atol=1e-6)


def test_dequant_cached_is_a_plain_float_model(tiny):
    """No hooks, no wrappers, contiguous float32 weights: the float kernels, nothing around them."""
    from torch import nn

    _, q, _ = tiny
    fast = runtime(q, "dequant-cached")
    layers = [m for m in fast.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == 3
    for m in fast.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    for m in layers:
        base = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
        assert type(m).forward is base.forward
        assert m.weight.dtype == torch.float32 and m.weight.is_contiguous() and not m.weight.requires_grad


def test_weight_only_widths_the_int8_kernel_cannot_take_run_in_float(tiny):
    """in_features 24: the int8 weight kernel's bfloat16 path needs a multiple of 16 (it crashed)."""
    from torch import nn

    from tests.deploy.conftest import quantize_all

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16)).eval()
    q = quantize_all(model, 8)
    with pytest.warns(KernelFallbackWarning, match=r"'2'.*divisible by 16 \(got 24\).*float32"):
        fast = runtime(q, "weight-only")
    assert isinstance(fast[2], nn.Linear) and not isinstance(fast[0], nn.Linear)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert (fast(x) - q(x)).abs().max() <= 1e-2 * q(x).abs().max()


@torch.no_grad()
def test_negative_scales_reach_the_kernels_exactly():
    """A code −128 at a negative scale is the weight +128·|scale|: int8 and fake-int8 keep it."""
    from cetopt.deploy.runtime import FakeInt8, Int8Linear, deployment_model
    from tests.deploy.conftest import quantize_all

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    with torch.no_grad():  # a positive outlier per row: the mirrored grid gives it the extra level
        model[0].weight[:, 0] = model[0].weight.abs().max(dim=1).values * 1.5
    q = quantize_all(model, 8)
    layer = deployment_model(q).get_submodule("0")
    flipped = (layer.code_scale < 0)[:, None] & (layer.codes == -128)
    assert int(flipped.sum()) > 0  # the case this test is about occurs
    x = torch.randn(256, 32)
    ranges = calibrate_activations(q, [x])
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)  # nothing is rounded any more
        fake = runtime(q, "fake-int8", activations=ranges)
        kernel = runtime(q, "int8", activations=ranges)
        dynamic = runtime(q, "int8")
    assert isinstance(fake.get_submodule("0"), FakeInt8) and isinstance(kernel.get_submodule("0"), Int8Linear)
    assert torch.equal(fake.get_submodule("0").layer.weight, layer.weight)  # the stored weights, bit for bit
    assert torch.equal(kernel.get_submodule("0").dequantized_weight(), layer.weight)
    assert torch.equal(dynamic.get_submodule("0").dequantized_weight(), layer.weight)
    # small inputs (u8 codes near the zero point) keep fbgemm's int16 pair sums from saturating
    step = float(ranges.outputs["2"].scale)
    assert (kernel(x[:64] * 0.1) - fake(x[:64] * 0.1)).abs().max() <= step + 1e-6


@torch.no_grad()
@pytest.mark.parametrize("name", ["digits-resnet", "mnist1d-cnn"])
def test_int8_kernels_on_8_bit_zoo_conv_nets_match_their_definition(name):
    """8-bit weights: every layer's input is on the reduced range, so fbgemm cannot saturate."""
    from cetopt.zoo import load_dataset, load_model
    from tests.deploy.conftest import EVERY_ZOO_MODEL, quantize_all

    q = quantize_all(load_model(name).eval(), 8)
    data = load_dataset(EVERY_ZOO_MODEL[name])
    ranges = calibrate_activations(q, data.loader("val"))
    x = data.x_test[:128]
    fake = runtime(q, "fake-int8", activations=ranges)
    kernel = runtime(q, "int8", activations=ranges)
    assert set(kernel.activation_range.values()) == {"reduced"} == set(fake.activation_range.values())
    last = list(ranges.outputs)[-1]
    assert (kernel(x) - fake(x)).abs().max() <= 3 * float(ranges.outputs[last].scale) + 1e-5
