import itertools

import numpy as np
import pytest
import torch

from cetopt.allocation import choose_options
from cetopt.errors import InfeasibleBudgetError
from cetopt.lowrank import build_menu, sparse_bytes, stored_bytes, stored_params
from tests.lowrank.models import same_state, state_copy, tiny_cnn


@pytest.fixture(scope="module")
def menu_and_model():
    torch.set_num_threads(1)
    model, x = tiny_cnn()
    menu = build_menu(
        model,
        x,
        ls_rank_fractions=(1 / 8, 1 / 4),
        ls_densities=(0.03, 0.1),
        rank_fractions=(1 / 8, 1 / 4, 1 / 2),
        prune_densities=(0.1, 0.3),
        iterations=8,
        max_examples=64,
    )
    return menu, model, x


def test_menu_options_have_exact_costs(menu_and_model):
    menu, _model, _ = menu_and_model
    fc1 = {o.label: o for o in menu.options["fc1"]}  # 24 × 192
    assert fc1["dense"].params == 24 * 192 and fc1["dense"].error == 0 and fc1["dense"].output_error == 0
    assert fc1["quant-4b"].bytes == 24 * 192 * 4 // 8 + 5 * 24
    svd = fc1["svd-r3"]
    assert svd.params == 3 * (24 + 192) and svd.bytes == 4 * svd.params
    q = fc1["svd-r3-4b"]
    assert q.bytes == (3 * 192 * 4 + 7) // 8 + 5 * 3 + (24 * 3 * 4 + 7) // 8 + 5 * 24
    ls = next(o for o in menu.options["fc1"] if o.kind == "admm" and o.bits is None)
    assert ls.bytes == 4 * ls.rank * (24 + 192) + sparse_bytes(ls.nnz, 24 * 192)
    assert {o.kind for o in menu.options["fc1"]} == {"dense", "quant", "svd", "prune", "weight_space", "admm"}


@pytest.mark.parametrize("kinds", [["svd"], ["prune"], ["weight_space"], ["admm"], None])
def test_parameter_budget_plan_is_written_back_exactly(menu_and_model, kinds):
    menu, model, x = menu_and_model
    before = state_copy(model)
    budget = menu.dense_params / 3
    plan = menu.choose(budget, kinds=kinds)
    assert plan.params <= budget
    assert all(o.bits is None for o in plan.options.values())
    new = menu.apply(model, plan)
    assert same_state(model, before)
    assert stored_params(new, menu.layers) == plan.params
    assert stored_bytes(new, menu.layers) == plan.bytes
    with torch.no_grad():
        assert torch.isfinite(new(x)).all()


def test_joint_byte_budget_is_no_worse_than_any_single_kind(menu_and_model):
    menu, model, _ = menu_and_model
    budget = menu.dense_bytes / 10
    joint = menu.choose(budget, resource="bytes", use_greedy=False)
    assert joint.bytes <= budget and joint.status == "optimal"
    new = menu.apply(model, joint)
    assert stored_bytes(new, menu.layers) == joint.bytes
    for kind in ["quant", "svd", "weight_space", "admm"]:
        try:
            single = menu.choose(budget, resource="bytes", kinds=[kind], use_greedy=False)
        except InfeasibleBudgetError:
            continue
        assert joint.predicted_error <= single.predicted_error * (1 + 1e-4) + 1e-12
    with pytest.raises(InfeasibleBudgetError):
        menu.choose(10, resource="bytes")


def test_choose_options_matches_brute_force():
    rng = np.random.default_rng(0)
    cost = rng.random((4, 3))
    size = rng.integers(1, 10, (4, 3)).astype(float)
    allowed = np.ones((4, 3), dtype=bool)
    allowed[1, 2] = False
    budget = 18.0
    best = min(
        (c for c in itertools.product(range(3), repeat=4) if all(allowed[i, k] for i, k in enumerate(c))),
        key=lambda c: np.inf if size[range(4), c].sum() > budget else cost[range(4), c].sum(),
    )
    for greedy in (True, False):
        out = choose_options(cost, size, budget, allowed=allowed, use_greedy=greedy)
        assert cost[range(4), out.choice].sum() == pytest.approx(cost[range(4), best].sum())
    with pytest.raises(InfeasibleBudgetError):
        choose_options(cost, size, 1.0)


def test_joint_plan_survives_save_and_load(menu_and_model, tmp_path):
    import cetopt
    from tests.lowrank.models import TinyCNN

    menu, model, x = menu_and_model
    plan = menu.choose(menu.dense_bytes / 6, resource="bytes")
    new = menu.apply(model, plan)
    saved = cetopt.save(new, tmp_path / "m.safetensors")
    packed = sum(
        o.bytes - sparse_bytes(o.nnz, menu.options[name][0].params)
        for name, o in plan.options.items()
        if o.bits
    )
    assert saved.quantized_bytes == packed > 0
    restored = cetopt.load(tmp_path / "m.safetensors", model=TinyCNN())
    with torch.no_grad():
        torch.testing.assert_close(restored(x), new(x))


def test_sequential_refit_keeps_budget_and_lowers_output_error(menu_and_model):
    menu, model, x = menu_and_model
    before = state_copy(model)
    plan = menu.choose(menu.dense_params / 3, kinds=["admm"])
    refit = menu.refit_sequential(model, plan, x, iterations=8)
    assert same_state(model, before)
    assert any(o.kind == "admm" for o in plan.options.values())
    for name, o in plan.options.items():
        new = refit.options[name]
        assert (new.kind, new.rank, new.bits) == (o.kind, o.rank, o.bits) and new.nnz <= o.nnz
        if o.kind != "admm":
            assert new is o
    assert refit.params <= plan.params
    new_model = menu.apply(model, refit)
    assert stored_params(new_model, menu.layers) == refit.params

    def output_error(m):
        with torch.no_grad():
            ref = model(x)
            return float((m(x) - ref).pow(2).sum() / ref.pow(2).sum())

    assert output_error(new_model) < output_error(menu.apply(model, plan))
