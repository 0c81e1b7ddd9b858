"""The menu at real cost: shared factorisations, residual-stopped ADMM, streamed columns, batched
output errors and progress bars give the same results as the per-option computations they replace."""

import pytest
import torch
from torch import nn

import cetopt
from cetopt.lowrank import build_menu, collect, collect_each, fit_layer
from cetopt.lowrank import fit as fitmod
from cetopt.lowrank.fit import GramFactors, fit_admm, fit_svd_ranks, fit_weight_space, truncate
from cetopt.lowrank.layers import LayerData
from cetopt.lowrank.suffix import output_errors
from tests.lowrank.models import tiny_1d, tiny_cnn

SMALL_GRID = dict(
    ls_rank_fractions=(1 / 4,),
    ls_densities=(0.1,),
    rank_fractions=(1 / 4,),
    prune_densities=(0.3,),
    bits=(4,),
    factor_bits=(8,),
    iterations=6,
    max_examples=32,
)


def _fresh(data: LayerData) -> LayerData:
    """The same layer problem without any cached factorisation."""
    return LayerData(data.name, data.weight, data.bias, data.inputs, data.scale, data.shift, data.activation)


def test_truncate_by_eigh_equals_the_svd():
    g = torch.Generator().manual_seed(0)
    for shape in ((300, 420), (420, 300)):
        a = torch.randn(*shape, generator=g, dtype=torch.float64)
        left, right = fitmod._truncate_eigh(a, 20)
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        assert torch.allclose(left @ right, (u[:, :20] * s[:20]) @ vh[:20], atol=1e-9)
        assert torch.allclose(left.T @ left, torch.eye(20, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(right.norm(dim=1), s[:20], rtol=1e-9)
    lr, rr = truncate(a, 20)  # above EIGH_MIN_SIDE: the eigh path
    assert torch.allclose(lr @ rr, left @ right, atol=1e-9)


def test_svd_options_share_one_decomposition():
    w = torch.randn(40, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for fit, rank in zip(fit_svd_ranks(w, [2, 5, 11]), [2, 5, 11]):
        assert torch.allclose(fit.dense(), fitmod.fit_svd(w, rank).dense(), atol=1e-10)
        assert fit.rank == rank


@pytest.mark.parametrize("method", ["weight_space", "admm"])
def test_shared_gram_factors_equal_the_per_option_computation(method):
    model, x = tiny_cnn()
    shared = collect(model, x, ["conv1", "conv2", "fc1"])
    for name, data in shared.items():
        m, n = data.weight.shape
        first = fit_layer(data, 2, round(0.1 * m * n), method, iterations=6)  # fills data.factors
        again = fit_layer(data, 3, round(0.05 * m * n), method, iterations=6)  # reuses them
        alone = fit_layer(_fresh(data), 3, round(0.05 * m * n), method, iterations=6)
        assert torch.allclose(again.dense(), alone.dense(), atol=1e-10), name
        assert data.relative_error(again.dense()) == pytest.approx(data.relative_error(alone.dense()))
        assert first.rank == 2


def test_menu_options_equal_fits_made_one_by_one():
    model, x = tiny_cnn()
    menu = build_menu(model, x, progress=False, **SMALL_GRID)
    problems = collect(model, x, menu.layers)
    for name in menu.layers:
        for option in menu.options[name]:
            if option.kind not in ("admm", "weight_space") or option.bits:
                continue
            data, budget = _fresh(problems[name]), (option.rank, option.nnz)
            fit = fit_layer(data, *budget, "weight_space")
            if option.kind == "admm":
                fit = fit_layer(_fresh(problems[name]), *budget, "admm", iterations=6, init=fit)
            approx = (fit.left.float() @ fit.right.float() + fit.sparse.float()).double()
            assert option.error == pytest.approx(problems[name].relative_error(approx), rel=1e-9, abs=1e-12)


def _plain_output_error(model, name, x, weight) -> float:
    module = dict(model.named_modules())[name]
    ref = model(x).double()

    def replace(m, args, out):
        w = weight.to(torch.float32).reshape(m.weight.shape)
        if isinstance(m, nn.Linear):
            return nn.functional.linear(args[0], w, m.bias)
        conv = nn.functional.conv1d if isinstance(m, nn.Conv1d) else nn.functional.conv2d
        return conv(args[0], w, m.bias, m.stride, m.padding, m.dilation)

    hook = module.register_forward_hook(replace)
    try:
        out = model(x).double()
    finally:
        hook.remove()
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("build", [tiny_cnn, tiny_1d])
@torch.no_grad()
def test_batched_output_errors_equal_one_forward_per_option(build, monkeypatch):
    model, x = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        w = module.weight.detach().reshape(module.weight.shape[0], -1).double()
        weights = [w + 0.1 * k * torch.randn(w.shape, generator=g, dtype=torch.float64) for k in range(1, 6)]
        # tiny chunks: several example chunks and option groups per layer
        monkeypatch.setattr("cetopt.lowrank.suffix.ACTIVATION_BYTES", 20_000)
        batched = output_errors(model, name, x, weights)
        plain = [_plain_output_error(model, name, x, w) for w in weights]
        assert batched == pytest.approx(plain, rel=1e-4, abs=1e-9), name
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())  # every stub removed


def test_streamed_columns_equal_collecting_all_at_once():
    model, x = tiny_cnn()
    names = ["conv1", "conv2", "fc1", "fc2"]
    together = collect(model, list(zip(x.split(16), x.split(16))), names, max_columns=100, seed=4)
    for data in collect_each(model, x.split(16), names, max_columns=100, seed=4, group_bytes=1):
        assert torch.equal(data.inputs, together[data.name].inputs)
        assert data.activation == together[data.name].activation
    # the kept columns are columns of the full unfold
    full = collect(model, x, ["conv2"], max_columns=10**9)["conv2"].inputs
    kept = collect(model, x, ["conv2"], max_columns=50)["conv2"].inputs
    assert kept.shape[1] == 50
    assert all(bool((full == kept[:, [j]]).all(0).any()) for j in range(50))


def _small_admm(seed, activation, columns=400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 30, generator=g, dtype=torch.float64) / 5
    x = torch.randn(30, columns, generator=g, dtype=torch.float64).abs()
    b = torch.randn(16, generator=g, dtype=torch.float64) * 0.1
    return w, b, x


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_stopped_admm_reaches_the_fixed_iteration_objective(seed, activation):
    w, b, x = _small_admm(seed, activation)
    fixed = fit_admm(w, b, x, 3, 50, activation=activation, iterations=60, tol=0.0)
    stopped = fit_admm(w, b, x, 3, 50, activation=activation, iterations=60)
    assert len(fixed.history) == 61
    assert min(stopped.history) <= min(fixed.history) * 1.02 + 1e-12
    assert len(stopped.history) <= len(fixed.history)


def test_admm_stops_once_its_residuals_vanish():
    # W is exactly rank 2: the start is already optimal, so both residuals go to zero
    g = torch.Generator().manual_seed(5)
    low = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 20, generator=g).double()
    x = torch.randn(20, 300, generator=g, dtype=torch.float64)
    fit = fit_admm(low, None, x, 2, 0, activation="identity", iterations=200)
    assert len(fit.history) - 1 < 200
    assert min(fit.history) < 1e-12 * float((low @ x).pow(2).sum())


def test_gram_space_iterates_equal_the_column_iterates(monkeypatch):
    w, b, x = _small_admm(3, "identity", columns=500)  # N > n: identity runs in Gram space
    factors = GramFactors.of(x)
    start = fit_weight_space(w, 3, 40, factors)
    in_gram = fit_admm(w, b, x, 3, 40, activation="identity", iterations=15, tol=0.0, init=start)
    monkeypatch.setattr(fitmod, "_GramSpace", fitmod._Columns)
    on_columns = fit_admm(w, b, x, 3, 40, activation="identity", iterations=15, tol=0.0, init=start)
    assert in_gram.history == pytest.approx(on_columns.history, rel=1e-7)
    assert torch.allclose(in_gram.dense(), on_columns.dense(), atol=1e-8)


def test_progress_can_be_disabled_and_does_not_change_the_menu(capsys):
    model, x = tiny_cnn()
    quiet = build_menu(model, x, progress=False, **SMALL_GRID)
    assert capsys.readouterr().err == ""
    shown = build_menu(model, x, progress=True, **SMALL_GRID)
    assert "menu" in capsys.readouterr().err
    assert quiet.to_dict() == shown.to_dict()


def test_progress_does_not_change_decompose(capsys):
    model, x = tiny_cnn()
    runs = [cetopt.decompose(model, x, rank=2, nnz=0.05, method="admm", progress=p) for p in (False, True)]
    assert "decompose" in capsys.readouterr().err
    assert runs[0].layers == runs[1].layers


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_few_column_low_rank_step_equals_the_cholesky_step(activation, monkeypatch):
    w, b, x = _small_admm(4, activation, columns=12)  # N < n / 2: the L-step works in X's span
    start = fit_weight_space(w, 3, 40, GramFactors.of(x))
    assert GramFactors.of(x).few_columns
    span = fit_admm(w, b, x, 3, 40, activation=activation, iterations=10, tol=0.0, init=start)
    monkeypatch.setattr(GramFactors, "few_columns", property(lambda self: False))
    chol = fit_admm(w, b, x, 3, 40, activation=activation, iterations=10, tol=0.0, init=start)
    assert span.history == pytest.approx(chol.history, rel=1e-6)
