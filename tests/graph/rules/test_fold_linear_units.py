import pytest
import torch

from cetopt.errors import RewriteError
from cetopt.graph import FoldLinearUnits, rewrite
from tests.graph.models import MLP, count_parameters


def dependent_mlp():
    torch.manual_seed(3)
    model = MLP().eval()
    with torch.no_grad():
        w = model.fc2.weight
        w[5] = 2.0 * w[1] - 0.5 * w[2]  # unit 5 is a combination of units 1 and 2 ...
        w[9] = 1.5 * w[0]
        model.fc2.bias[[0, 1, 2, 5, 9]] = torch.tensor(
            [40.0, 41.0, 42.0, 45.0, 43.0]
        )  # ... all stably active
    return model


def test_folding_dependent_active_units_is_exact():
    model = dependent_mlp()
    x = torch.randn(16, 1, 8, 8)
    decision = FoldLinearUnits("fc2", {5: {1: 2.0, 2: -0.5}, 9: {0: 1.5}})
    new = rewrite(model, [decision], x)
    assert new.fc2.out_features == 22 and new.fc3.in_features == 22
    assert count_parameters(model) - count_parameters(new) == 2 * (32 + 1) + 2 * 10
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-4)


def test_chained_folding_is_refused():
    model = dependent_mlp()
    with pytest.raises(RewriteError, match="folded away themselves"):
        rewrite(model, [FoldLinearUnits("fc2", {5: {1: 2.0}, 1: {0: 1.0}})], torch.randn(2, 1, 8, 8))
