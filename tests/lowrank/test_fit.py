import pytest
import torch

from cetopt.lowrank.fit import (
    cholesky_jitter,
    fit_admm,
    fit_prune,
    fit_svd,
    fit_weight_space,
    project_sparse,
)


def synthetic(m=24, n=40, rank=3, nnz=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / 3
    sparse = torch.zeros(m * n)
    where = torch.randperm(m * n, generator=g)[:nnz]
    sparse[where] = (torch.rand(nnz, generator=g) + 1.0) * torch.sign(torch.randn(nnz, generator=g)) * 2
    return low.double(), sparse.reshape(m, n).double()


def post_relu_error(fit, w, b, x):
    ref = torch.relu(w.double() @ x.double() + b.double()[:, None])
    out = torch.relu(fit.dense() @ x.double() + b.double()[:, None])
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("method", ["weight_space", "admm"])
def test_synthetic_low_rank_plus_sparse_is_recovered(method):
    low, sparse = synthetic()
    w = low + sparse
    x = torch.randn(40, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if method == "weight_space":
        fit = fit_weight_space(w, 3, 60, iterations=60)
    else:
        fit = fit_admm(w, None, x, 3, 60, activation="identity", iterations=40)
    assert float((fit.dense() - w).norm() / w.norm()) < 1e-2
    found = set(torch.nonzero(fit.sparse.flatten()).flatten().tolist())
    truth = set(torch.nonzero(sparse.flatten()).flatten().tolist())
    assert len(found & truth) >= 0.9 * len(truth)
    # the plain baselines cannot do this
    assert float((fit_svd(w, 3).dense() - w).norm() / w.norm()) > 0.1
    assert float((fit_prune(w, 60).dense() - w).norm() / w.norm()) > 0.1


@pytest.mark.parametrize("structure", ["unstructured", "rows", "columns"])
@pytest.mark.parametrize("method", ["weight_space", "admm", "svd", "prune"])
def test_rank_and_nnz_constraints_hold(method, structure):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 30, generator=g, dtype=torch.float64)
    x = torch.randn(30, 200, generator=g, dtype=torch.float64)
    rank, nnz = (0 if method == "prune" else 4), (0 if method == "svd" else 90)
    if method == "svd":
        fit = fit_svd(w, rank)
    elif method == "prune":
        fit = fit_prune(w, nnz, structure)
    elif method == "weight_space":
        fit = fit_weight_space(w, rank, nnz, x @ x.T, structure=structure)
    else:
        fit = fit_admm(w, torch.zeros(16), x, rank, nnz, structure=structure, iterations=10)
    low = fit.left @ fit.right
    assert int(torch.linalg.matrix_rank(low)) <= rank and fit.rank == rank
    assert fit.nnz <= nnz
    if structure == "rows":
        assert int((fit.sparse != 0).any(dim=1).sum()) <= nnz // 30
    if structure == "columns":
        assert int((fit.sparse != 0).any(dim=0).sum()) <= nnz // 16
    assert fit.params == rank * (16 + 30) + fit.nnz


def test_admm_objective_does_not_increase_after_the_first_iterations():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 36, generator=g, dtype=torch.float64) / 6
    x = torch.randn(36, 500, generator=g, dtype=torch.float64).abs()
    b = torch.randn(20, generator=g, dtype=torch.float64) * 0.1
    fit = fit_admm(w, b, x, 3, 40, activation="relu", iterations=40)
    h = torch.tensor(fit.history)
    assert h[-1] < 0.5 * h[0]
    steps = h[4:].diff()
    assert bool((steps <= 1e-9 * h[0]).all()), steps.max()


@pytest.mark.parametrize("seed", [0, 1])
def test_activation_aware_beats_weight_space_after_the_activation(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 48, generator=g, dtype=torch.float64) / 7
    x = torch.randn(48, 800, generator=g, dtype=torch.float64).abs()
    b = torch.randn(24, generator=g, dtype=torch.float64) * 0.2 - 0.3
    ws = fit_weight_space(w, 4, 80, x @ x.T)
    aa = fit_admm(w, b, x, 4, 80, activation="relu", iterations=30)
    assert post_relu_error(aa, w, b, x) < 0.7 * post_relu_error(ws, w, b, x)


def test_singular_gram_gets_jitter():
    x = torch.randn(30, 10, dtype=torch.float64)  # N < n: XXᵀ has rank 10
    x[5] = x[4]
    chol = cholesky_jitter(x @ x.T)
    assert torch.isfinite(chol).all()
    w = torch.randn(8, 30, dtype=torch.float64)
    fit = fit_admm(w, None, x, 2, 10, iterations=5)
    assert torch.isfinite(fit.dense()).all()


def test_project_sparse_keeps_the_largest():
    m = torch.tensor([[1.0, -5.0, 0.5], [3.0, 0.1, -2.0]])
    assert torch.equal(project_sparse(m, 2), torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]))
    assert torch.equal(project_sparse(m, 3, "rows"), torch.tensor([[1.0, -5.0, 0.5], [0.0, 0.0, 0.0]]))
    assert torch.equal(project_sparse(m, 2, "columns"), torch.tensor([[0.0, -5.0, 0.0], [0.0, 0.1, 0.0]]))


def test_sequential_target_corrects_upstream_error():
    # the layer now sees 0.7·X (upstream compression); the original output is σ(W X + b)
    low, sparse = synthetic(seed=4)
    w = low + sparse
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 300, generator=g).double()
    b = torch.randn(24, generator=g).double() * 0.1
    seen = 0.7 * x
    ref = torch.relu(w @ x + b[:, None])

    def error(fit):
        out = torch.relu(fit.dense() @ seen + b[:, None])
        return float((out - ref).pow(2).sum() / ref.pow(2).sum())

    plain = fit_admm(w, b, seen, 3, 60, iterations=30)
    same = fit_admm(w, b, seen, 3, 60, iterations=30, target_inputs=seen)
    assert torch.equal(same.dense(), plain.dense())
    sequential = fit_admm(w, b, seen, 3, 60, iterations=30, target_inputs=x)
    assert sequential.rank == 3 and sequential.nnz <= 60
    assert error(sequential) < 0.2 * error(plain)
    with pytest.raises(ValueError, match="target_inputs"):
        fit_admm(w, b, seen, 3, 60, target_inputs=x[:, :10])
