import pytest
import torch

import cetopt
from cetopt.errors import CalibrationShapeError, UnreachableBudgetError, UnsupportedLayerError
from cetopt.lowrank import collect, decompose, stored_params
from cetopt.nn import FactorizedConv, FactorizedLinear
from tests.lowrank.models import same_state, state_copy, tiny_1d, tiny_cnn


@pytest.mark.parametrize("method", ["admm", "weight_space", "svd", "prune"])
def test_decompose_writes_back_exact_parameter_counts(method):
    model, x = tiny_cnn()
    before = state_copy(model)
    rank = 0 if method == "prune" else 3
    nnz = 0 if method == "svd" else 0.1
    result = cetopt.decompose(model, x, rank=rank, nnz=nnz, method=method, iterations=8)
    assert same_state(model, before)
    layers = ["conv1", "conv2", "fc1", "fc2"]
    assert list(result.layers) == layers
    for name in layers:
        module = result.model.get_submodule(name)
        original = model.get_submodule(name)
        assert isinstance(module, (FactorizedLinear, FactorizedConv))
        info = result.layers[name]
        m, n = original.weight.shape[0], original.weight[0].numel()
        assert info.params == info.rank * (m + n) + info.nnz
        bias = 0 if original.bias is None else original.bias.numel()
        counted = sum(p.numel() for p in module.parameters())
        assert counted == info.params + bias
        assert info.rank == rank and info.nnz <= round(nnz * m * n)
    assert stored_params(result.model, layers) == result.params
    with torch.no_grad():
        assert torch.isfinite(result.model(x)).all()


def test_decomposed_model_matches_its_reported_error():
    model, x = tiny_1d()
    result = decompose(model, x, rank={"conv": 2, "fc": 3}, nnz={"conv": 4, "fc": 20})
    assert set(result.layers) == {"conv", "fc"}
    assert 0 < result.layers["fc"].error < 1
    full = decompose(model, x, rank={"conv": 5, "fc": 4}, method="svd")  # full ranks
    with torch.no_grad():
        torch.testing.assert_close(full.model(x), model(x), rtol=1e-4, atol=1e-4)


def test_activation_after_batchnorm_is_found():
    model, x = tiny_cnn()
    problems = collect(model, x, ["conv1", "conv2", "fc1", "fc2"], max_columns=64 * 64)
    assert problems["conv1"].activation == "relu"
    assert not torch.allclose(problems["conv1"].scale, torch.ones(12, dtype=torch.float64))
    assert problems["conv2"].activation == "identity"  # BN, then a residual add
    assert problems["fc1"].activation == "relu" and problems["fc2"].activation == "identity"
    with torch.no_grad():  # the fit target is the layer's real post-activation output
        expected = torch.relu(model.bn1(model.conv1(x)))
    got = problems["conv1"].output(problems["conv1"].weight)
    assert got.shape[0] == 12
    assert float(got.max()) == pytest.approx(float(expected.max()), rel=1e-5)


def test_unreachable_rank_or_sparsity_raises_a_named_error():
    model, x = tiny_cnn()
    with pytest.raises(UnreachableBudgetError, match="fc2") as info:
        decompose(model, x, rank={"fc2": 6})  # fc2 is 5×24
    assert info.value.layer == "fc2"
    with pytest.raises(UnreachableBudgetError, match="outside"):
        decompose(model, x, rank=1, nnz=1.5)
    with pytest.raises(UnreachableBudgetError, match="entries"):
        decompose(model, x, rank={"fc2": 1}, nnz={"fc2": 121})
    with pytest.raises(UnreachableBudgetError, match="keep nothing"):
        decompose(model, x, rank={"fc2": 0})
    with pytest.raises(UnreachableBudgetError, match="svd"):
        decompose(model, x, rank={"fc2": 1}, nnz={"fc2": 3}, method="svd")
    with pytest.raises(UnreachableBudgetError, match="row"):
        decompose(model, x, rank={"fc2": 0}, nnz={"fc2": 10}, method="prune", structure="rows")


def test_wrong_calibration_data_raises_a_named_error():
    model, x = tiny_cnn()
    before = state_copy(model)
    with pytest.raises(CalibrationShapeError, match=r"\(64, 3, 8, 8\)"):
        decompose(model, torch.randn(64, 3, 8, 8), rank=1)
    with pytest.raises(CalibrationShapeError, match="floating-point"):
        decompose(model, torch.ones(4, 2, 8, 8, dtype=torch.bool), rank=1)
    # token ids pass the check (a language model's inputs), but this CNN cannot run on them
    with pytest.raises(CalibrationShapeError, match="does not fit the model"):
        decompose(model, torch.ones(4, 2, 8, 8, dtype=torch.int64), rank=1)
    with pytest.raises(CalibrationShapeError, match="shape"):
        decompose(model, torch.randn(128), rank=1)
    with pytest.raises(CalibrationShapeError, match="no batch"):
        decompose(model, [], rank=1)
    with pytest.raises(UnsupportedLayerError, match="bn1"):
        decompose(model, x, rank={"bn1": 1})
    assert same_state(model, before)
    assert model.training is False


def test_calibration_from_a_loader_and_column_subsampling():
    model, x = tiny_cnn()
    loader = [(x[:32], torch.zeros(32)), (x[32:], torch.zeros(32))]
    problems = collect(model, loader, ["conv1", "fc1"], max_columns=300)
    assert problems["conv1"].inputs.shape == (18, 300)
    assert problems["fc1"].inputs.shape == (192, 64)
