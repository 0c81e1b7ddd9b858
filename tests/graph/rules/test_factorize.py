import pytest
import torch
from torch import nn

from cetopt.errors import RewriteError
from cetopt.graph import Factorize, rewrite
from cetopt.nn import FactorizedConv, FactorizedLinear
from tests.graph.models import count_parameters, example


def svd_factors(weight, rank):
    u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1).double(), full_matrices=False)
    return (vh[:rank] * s[:rank, None]).float(), u[:, :rank].float()


def test_full_rank_factorisation_is_exact_and_counts_parameters():
    model, x = example("mlp")
    w = model.fc2.weight.detach()
    first, second = svd_factors(w, 24)
    new = rewrite(model, [Factorize("fc2", first, second)])
    assert isinstance(new.fc2, FactorizedLinear)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(new) - count_parameters(model) == 24 * (32 + 24) - 24 * 32


def test_low_rank_plus_sparse_linear():
    model, _x = example("mlp")
    w = model.fc1.weight.detach()
    first, second = svd_factors(w, 4)
    residual = w - second @ first
    sparse = torch.where(
        residual.abs() >= residual.abs().flatten().kthvalue(residual.numel() - 50).values,
        residual,
        torch.zeros_like(residual),
    )
    new = rewrite(model, [Factorize("fc1", first, second, sparse)])
    nnz = int(torch.count_nonzero(sparse))
    assert new.fc1.sparse.values.numel() == nnz
    assert count_parameters(new.fc1) == 4 * (64 + 32) + nnz + 32
    expected = second @ first + sparse
    torch.testing.assert_close(
        new.fc1.second.weight @ new.fc1.first.weight + new.fc1.sparse.dense(torch.float32),
        expected,
        rtol=1e-6,
        atol=1e-6,
    )


def test_full_rank_conv_factorisation_is_exact():
    model, x = example("cnn")
    w = model.conv2.weight.detach()
    first, second = svd_factors(w, 12)
    new = rewrite(model, [Factorize("conv2", first, second)])
    assert isinstance(new.conv2, FactorizedConv) and new.conv2.first.kernel_size == (3, 3)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)


def test_factor_shapes_are_checked():
    model, _ = example("mlp")
    with pytest.raises(RewriteError, match="do not fit"):
        rewrite(model, [Factorize("fc2", torch.zeros(3, 31), torch.zeros(24, 3))])
    with pytest.raises(RewriteError, match=r"only nn\.Linear"):
        rewrite(model, [Factorize("bn1", torch.zeros(3, 32), torch.zeros(32, 3))])


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(RewriteError, match="grouped"):
        rewrite(model, [Factorize("0", torch.zeros(2, 18), torch.zeros(4, 2))])


@pytest.mark.parametrize("kind, layer", [("mlp", "fc1"), ("cnn", "conv2")])
def test_rank_zero_is_a_pruned_layer(kind, layer):
    model, x = example(kind)
    w = getattr(model, layer).weight.detach()
    sparse = torch.where(w.abs() > w.abs().median(), w, torch.zeros_like(w))
    rank0 = (torch.zeros(0, *w.shape[1:]), torch.zeros(w.shape[0], 0))
    new = rewrite(model, [Factorize(layer, *rank0, sparse)])
    nnz = int(torch.count_nonzero(sparse))
    bias = getattr(model, layer).bias
    assert count_parameters(getattr(new, layer)) == nnz + (0 if bias is None else bias.numel())
    pruned = rewrite(model, [])
    with torch.no_grad():
        getattr(pruned, layer).weight.copy_(sparse)
        torch.testing.assert_close(new(x), pruned(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RewriteError, match="rank 0"):
        rewrite(model, [Factorize(layer, *rank0)])
