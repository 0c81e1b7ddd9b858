"""Layers the menu cannot decompose (grouped, depthwise, "same"-padded convs) get quantization options."""

import copy
import math

import pytest
import torch

import cetopt
from cetopt.errors import JointMenuError, UnsupportedLayerError
from cetopt.lowrank import (
    build_menu,
    collect,
    joint_compress,
    layer_errors,
    menu_layers,
    output_errors,
    stored_bytes,
    supported_layers,
)
from cetopt.lowrank.menu import option_matrix
from tests.lowrank.models import same_state, state_copy, tiny_depthwise

BITS = (2, 3, 4, 8)
SMALL_MENU = {
    "rank_fractions": (1 / 4, 1 / 2),
    "prune_densities": (0.3,),
    "ls_rank_fractions": (1 / 4,),
    "ls_densities": (0.1,),
    "iterations": 4,
    "max_examples": 64,
}


def _with_weight(model, name, weight):
    new = copy.deepcopy(model)
    layer = new.get_submodule(name)
    layer.weight.data = weight.reshape(layer.weight.shape).to(layer.weight.dtype)
    return new


@pytest.fixture(scope="module")
def depthwise():
    model, x = tiny_depthwise(0)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::7] = (y[::7] + 1) % 5
    return model, x, [(x[:32], y[:32]), (x[32:], y[32:])]


def test_menu_holds_every_conv_and_quantizes_the_grouped_ones(depthwise):
    model, x, _ = depthwise
    assert menu_layers(model) == ["pointwise", "depthwise", "same", "fc"]
    assert supported_layers(model) == ["pointwise", "fc"]
    before = state_copy(model)
    menu = build_menu(model, x, bits=BITS, progress=False, **SMALL_MENU)
    assert same_state(model, before)
    assert menu.layers == menu_layers(model)
    for name in ("depthwise", "same"):
        kinds = [o.kind for o in menu.options[name]]
        assert kinds == ["dense"] + ["quant"] * len(BITS)
        errors = [o.error for o in menu.options[name][1:]]
        assert errors == sorted(errors, reverse=True) and errors[0] > 0  # 2 bits worst
    assert {o.kind for o in menu.options["pointwise"]} > {"dense", "quant", "svd"}
    plan = menu.choose(0.3 * menu.dense_bytes, resource="bytes")
    compressed = menu.apply(model, plan)
    assert stored_bytes(compressed, menu.layers) == plan.bytes


def test_layer_errors_match_the_unfolded_layer_and_a_plain_forward(depthwise):
    model, x, _ = depthwise
    data = collect(model, x, ["pointwise"], max_columns=10**9)["pointwise"]
    candidate = data.weight + 0.05 * torch.randn_like(data.weight)
    (got,) = layer_errors(model, "pointwise", x, [candidate])
    assert got == pytest.approx(data.relative_error(candidate), rel=1e-5)
    # the depthwise conv, checked against its own module run through BatchNorm and ReLU
    layer = model.depthwise
    weight = layer.weight.detach().reshape(12, -1)
    candidate = weight + 0.1 * torch.randn_like(weight)
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    changed = _with_weight(model, "depthwise", candidate).depthwise
    with torch.no_grad():
        ref = torch.relu(model.bn(layer(seen["x"]))).double()
        new = torch.relu(model.bn(changed(seen["x"]))).double()
    want = float((new - ref).pow(2).sum() / ref.pow(2).sum())
    (got,) = layer_errors(model, "depthwise", x, [candidate], chunk=10)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", ["depthwise", "same"])
def test_output_errors_on_convs_that_do_not_unfold(depthwise, name):
    model, x, _ = depthwise
    weight = model.get_submodule(name).weight.detach().reshape(model.get_submodule(name).weight.shape[0], -1)
    candidates = [weight * 0.9, weight + 0.05 * torch.randn_like(weight)]
    got = output_errors(model, name, x, candidates)
    with torch.no_grad():
        ref = model(x).double()
        want = [
            float((_with_weight(model, name, w)(x).double() - ref).pow(2).sum() / ref.pow(2).sum())
            for w in candidates
        ]
    assert got == pytest.approx(want, rel=1e-5)


def test_a_layer_that_is_no_linear_or_conv_is_refused(depthwise):
    model, x, _ = depthwise
    with pytest.raises(UnsupportedLayerError, match="'bn'"):
        build_menu(model, x, layers=["depthwise", "bn"], progress=False)
    other = copy.deepcopy(model)
    other.same.padding_mode = "replicate"  # the quantized convolutions pad with zeros only
    assert "same" not in menu_layers(other)
    with pytest.raises(UnsupportedLayerError, match="replicate"):
        build_menu(other, x, layers=["same"], progress=False)


def test_joint_menu_on_a_depthwise_model_is_never_above_bits_only(depthwise):
    model, _, data = depthwise
    table = cetopt.sensitivity(model, data, BITS, "measured", progress=False)
    assert list(table.layers) == menu_layers(model)
    budget = 4 * float(table.params.sum()) / 6
    new, plan, res = joint_compress(
        model, data, table, budget, progress=False, menu_options=SMALL_MENU, refine=1, holdout=0
    )
    bits = res.candidate("bits")
    plain = cetopt.compress(model, data, budget, method="measured", bits=BITS, progress=False)
    assert {n: o.bits for n, o in bits.options.items()} == dict(plain.plan.bits)
    assert bits.measured_loss == pytest.approx(_loss(plain.model, data) - _loss(model, data), abs=1e-7)
    assert _loss(new, data) - _loss(model, data) == pytest.approx(res.best.measured_loss, abs=1e-7)
    for name in ("depthwise", "same"):
        assert plan.layer_bytes[name] == res.best.options[name].bytes
        assert res.best.options[name].kind in ("dense", "quant")
        scored = {o.bits: o.loss for o in res.menu.options[name] if o.kind == "quant"}
        assert all(map(math.isfinite, scored.values())) and scored[2] > scored[8]
    assert stored_bytes(new, table.layers) == plan.bytes <= budget
    # the menu scored the depthwise conv on the very weights GPTQ rounds it to (alone, on the
    # float model): quantizing only that layer with GPTQ gives them back
    option = next(o for o in res.menu.options["depthwise"] if o.kind == "quant" and o.bits == 3)
    alone = cetopt.quantize(model, {"depthwise": 3}, gptq=data)
    weight = model.depthwise.weight.detach().reshape(12, -1)
    written = alone.depthwise.weight.detach().reshape(12, -1).double()  # dequantized codes
    assert torch.allclose(written, option_matrix(option, weight), atol=1e-6)
    assert not torch.allclose(written, weight.double(), atol=1e-3)  # 3 bits do change it


def _loss(model, data) -> float:
    total = sum(len(x) for x, _ in data)
    with torch.no_grad():
        return float(sum(torch.nn.functional.cross_entropy(model(x), y) * len(x) / total for x, y in data))


class _TinyLM(torch.nn.Module):
    """Token ids in, next-token logits out (an embedding kept float, two Linear layers)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 12)
        self.hidden = torch.nn.Linear(12, 24)
        self.head = torch.nn.Linear(24, 16)

    def forward(self, tokens):
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


def test_token_id_inputs_reach_the_menu_and_the_joint_search():
    torch.manual_seed(0)
    model = _TinyLM().eval()
    tokens = torch.randint(0, 16, (48, 10))
    data = [(tokens[:24], tokens[:24]), (tokens[24:], tokens[24:])]
    layers = ["hidden", "head"]
    menu = build_menu(model, tokens, layers=layers, bits=BITS, progress=False, **SMALL_MENU)
    assert {o.kind for o in menu.options["hidden"]} >= {"quant", "svd", "admm"}
    table = cetopt.sensitivity(
        model, data, BITS, "measured", loss_fn="kl_to_float", layers=layers, progress=False
    )
    _, _, res = joint_compress(
        model, data, table, "5x", loss_fn="kl_to_float", holdout=0, refine=0, progress=False,
        menu_options=SMALL_MENU,
    )  # fmt: skip
    assert res.best.measured_loss <= res.candidate("bits").measured_loss
    with pytest.raises(UnsupportedLayerError, match="'embed'"):  # an embedding is not on a menu
        build_menu(model, tokens, layers=["embed", "head"], progress=False)


def test_compress_joint_names_the_layers_no_menu_holds():
    model = _TinyLM().eval()
    tokens = torch.randint(0, 16, (8, 10))
    with pytest.raises(JointMenuError, match=r"'embed'.*Embedding"):
        cetopt.compress(model, [(tokens, tokens)], "4x", loss_fn="kl_to_float", joint=True, progress=False)
