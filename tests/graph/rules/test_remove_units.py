import pytest
import torch
from torch import nn

from cetopt.errors import RewriteError
from cetopt.graph import RemoveUnits, rewrite
from tests.graph.models import KINDS, MLP, count_parameters, example, make_dead_units

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_removing_dead_units_is_exact_and_counts_are_exact(kind):
    model, x = example(kind)
    layer, units, constants, removed = make_dead_units(kind, model)
    new = rewrite(model, [RemoveUnits(layer, units, constants)], x)
    with torch.no_grad():
        probe = torch.randn_like(x) if x.is_floating_point() else torch.randint(0, 20, x.shape)
        for inputs in (x, probe):
            torch.testing.assert_close(new(inputs), model(inputs), **TOL)
    assert count_parameters(model) - count_parameters(new) == removed


def test_without_the_constant_the_gelu_units_are_not_dead():
    # The transformer's "dead" units output GELU(-3) != 0; dropping them without the constant changes outputs.
    model, x = example("transformer")
    layer, units, _, _ = make_dead_units("transformer", model)
    new = rewrite(model, [RemoveUnits(layer, units)], x)
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() > 1e-5


def test_zero_weight_positive_bias_unit_is_pushed_into_the_next_bias():
    torch.manual_seed(1)
    model = MLP().eval()
    with torch.no_grad():
        model.fc2.weight[3] = 0.0
        model.fc2.bias[3] = 0.7  # ReLU(0.7) = 0.7 reaches fc3 whatever the input
    x = torch.randn(8, 1, 8, 8)
    new = rewrite(model, [RemoveUnits("fc2", [3], constants=[0.7])], x)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), **TOL)
    assert new.fc3.in_features == 23


def test_model_output_units_are_frozen():
    model, x = example("mlp")
    with pytest.raises(RewriteError, match="reaches the model output"):
        rewrite(model, [RemoveUnits("fc3", [0])], x)


@pytest.mark.parametrize(
    ("units", "fragment"),
    [([40], "out of range"), ([1, 1], "duplicates"), (list(range(24)), "every unit"), ([], "no units")],
)
def test_bad_unit_lists(units, fragment):
    model, x = example("mlp")
    with pytest.raises(RewriteError, match=fragment):
        rewrite(model, [RemoveUnits("fc2", units)], x)


def test_constant_into_padded_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()
    with pytest.raises(RewriteError, match="padded"):
        rewrite(model, [RemoveUnits("0", [0], constants=[1.0])], torch.randn(1, 1, 6, 6))


def test_constant_into_unpadded_conv_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten()).eval()
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = 0.3
    x = torch.randn(3, 1, 7, 7)
    new = rewrite(model, [RemoveUnits("0", [2], constants=[0.3])], x)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), **TOL)


def test_view_with_written_out_size_is_rewritten():
    model, x = example("cnn")
    layer, units, _, _ = make_dead_units("cnn", model)
    with torch.no_grad():
        model.bn2.weight[4] = 0.0
        model.bn2.bias[4] = -2.0
    new = rewrite(model, [RemoveUnits(layer, units), RemoveUnits("conv2", [4])], x)
    assert new.fc.in_features == 11 * 16
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), **TOL)


def test_residual_stream_removal_prunes_every_coupled_port():
    model, x = example("resnet")
    new = rewrite(model, [RemoveUnits("stem", [0, 1])], x)
    assert new.stem.out_channels == 6 and new.bn.num_features == 6
    assert new.layer1.conv1.in_channels == 6 and new.layer1.conv2.out_channels == 6
    shortcut_conv, shortcut_bn = (
        new.get_submodule("layer2.shortcut.0"),
        new.get_submodule("layer2.shortcut.1"),
    )
    assert new.layer2.conv1.in_channels == 6 and shortcut_conv.in_channels == 6
    assert isinstance(shortcut_bn, nn.BatchNorm2d) and shortcut_bn.num_features == 16


def test_attention_embedding_channels_are_pruned_consistently():
    model, x = example("transformer")
    new = rewrite(model, [RemoveUnits("embed", [0, 3, 5, 9])], x)
    attn = new.get_submodule("block.attn")
    assert new.embed.embedding_dim == 12 and attn.embed_dim == 12 and attn.head_dim == 3
    assert new.block.norm1.normalized_shape == (12,) and new.block.ff1.in_features == 12
    assert new.block.ff2.out_features == 12 and new.pre_head.in_features == 12
    with torch.no_grad():
        assert new(x).shape == model(x).shape


def test_attention_head_divisibility_is_checked():
    model, x = example("transformer")
    with pytest.raises(RewriteError, match="divisible by the number of heads"):
        rewrite(model, [RemoveUnits("embed", [0])], x)
