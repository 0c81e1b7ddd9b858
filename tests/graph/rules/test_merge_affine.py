import pytest
import torch

from cetopt.errors import RewriteError
from cetopt.graph import MergeAffine, rewrite
from tests.graph.models import MERGEABLE, example


@pytest.mark.parametrize("kind", ["cnn", "resnet", "transformer"])
def test_merging_adjacent_linears_is_exact(kind):
    model, x = example(kind)
    first, second = MERGEABLE[kind]
    new = rewrite(model, [MergeAffine(first, second)], x)
    assert first not in dict(new.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)


def test_merge_across_a_relu_proven_to_be_identity():
    model, x = example("mlp")
    with torch.no_grad():
        model.fc2.bias += 50.0  # every fc2 unit is active on these inputs
    new = rewrite(model, [MergeAffine("fc2", "fc3", drop_activation=True)], x)
    assert new.fc3.in_features == 32 and "fc2" not in dict(new.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)


def test_activation_between_is_refused_unless_dropped():
    model, x = example("mlp")
    with pytest.raises(RewriteError, match="drop_activation=True"):
        rewrite(model, [MergeAffine("fc2", "fc3")], x)


def test_only_linears_merge():
    model, x = example("cnn")
    with pytest.raises(RewriteError, match=r"only nn\.Linear"):
        rewrite(model, [MergeAffine("fc", "conv2")], x)
    # a conv merges only through ReLU/flatten (tests/leo/test_conv_rules.py); here a BatchNorm stands between
    with pytest.raises(RewriteError, match="stands between"):
        rewrite(model, [MergeAffine("conv2", "fc")], x)
