"""The joint menu: never above bits only on the calibration loss; its bits-only plan is compress's."""

from dataclasses import replace

import pytest
import torch

import cetopt
from cetopt.errors import JointMenuError
from cetopt.lowrank import Menu, joint_compress, stored_bytes
from tests.lowrank.models import same_state, state_copy, tiny_1d, tiny_cnn

BITS = (2, 3, 4, 8)
SMALL_MENU = {
    "rank_fractions": (1 / 8, 1 / 2),
    "prune_densities": (0.1, 0.3),
    "ls_rank_fractions": (1 / 4,),
    "ls_densities": (0.1,),
    "iterations": 4,
    "max_examples": 64,
}


def _data(model, x, seed):
    """Labels the model itself nearly gets right (its argmax, a few flipped): a real loss surface."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(len(y), generator=gen) < 0.1
    y[flip] = torch.randint(0, int(y.max()) + 1, (int(flip.sum()),), generator=gen)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def _loss(model, data):
    total = sum(len(x) for x, _ in data)
    with torch.no_grad():
        return float(sum(torch.nn.functional.cross_entropy(model(x), y) * len(x) / total for x, y in data))


@pytest.fixture(scope="module")
def cases():
    out = []
    for seed, make in [(0, tiny_cnn), (2, tiny_1d)]:
        model, x = make(seed)
        if x.shape[0] < 64:
            x = torch.cat([x, x + 0.1 * torch.randn_like(x)])[:64]
        data = _data(model, x, seed)
        table = cetopt.sensitivity(model, data, BITS, "measured", progress=False)
        out.append((model, data, table))
    return out


@pytest.mark.parametrize("ratio", [5.0, 8.0])
def test_joint_calibration_loss_is_never_above_bits_only(cases, ratio):
    for model, data, table in cases:
        before = state_copy(model)
        budget = 4 * float(table.params.sum()) / ratio
        new, plan, res = joint_compress(
            model, data, table, budget, progress=False, menu_options=SMALL_MENU, refine=1
        )
        assert same_state(model, before)  # never modified
        bits = res.candidate("bits")
        assert bits is not None and res.best.measured_loss <= bits.measured_loss
        # the returned model is the measured one, within the budget
        assert _loss(new, data) - res.base_loss == pytest.approx(res.best.measured_loss, abs=1e-6)
        assert stored_bytes(new, table.layers) == res.best.bytes == plan.bytes <= budget
        assert res.fell_back == (res.chosen == "bits")
        assert {c.name for c in res.candidates} >= {"bits", "joint"}


def test_fallback_to_bits_when_the_scores_mislead(cases):
    """Options scored far too well (pruning at ~no cost) lure the knapsack; the check must catch it."""
    model, data, table = cases[0]
    budget = 4 * float(table.params.sum()) / 8
    _, _, honest = joint_compress(
        model, data, table, budget, progress=False, menu_options=SMALL_MENU, refine=0
    )
    menu = honest.menu
    lured = Menu(
        list(menu.layers),
        {
            n: [replace(o, loss=-1.0) if o.kind == "prune" else o for o in menu.options[n]]
            for n in menu.layers
        },
    )
    new, plan, res = joint_compress(
        model, data, table, budget, progress=False, menu=lured, singles=("bits",), refine=0
    )
    joint = res.candidate("joint")
    assert any(o.kind == "prune" for o in joint.options.values())  # the lure worked
    assert joint.measured_loss > res.candidate("bits").measured_loss
    assert res.chosen == "bits" and res.fell_back
    assert dict(plan.bits) == {n: o.bits for n, o in res.candidate("bits").options.items()}
    assert _loss(new, data) - res.base_loss == pytest.approx(res.candidate("bits").measured_loss, abs=1e-6)


def test_bits_only_plan_is_compress_plan(cases):
    for model, data, _ in cases[:2]:
        for ratio in ("7x",):
            plain = cetopt.compress(model, data, ratio, method="measured", bits=BITS, progress=False)
            joint = cetopt.compress(
                model,
                data,
                ratio,
                method="measured",
                bits=BITS,
                progress=False,
                joint=True,
                joint_options={"menu_options": SMALL_MENU, "refine": 0, "singles": ("bits",)},
            )
            bits = joint.joint.candidate("bits")
            assert {n: o.bits for n, o in bits.options.items()} == dict(plain.plan.bits)
            assert bits.bytes == plain.plan.bytes
            applied = cetopt.lowrank.apply_options(model, bits.options, data)
            x = data[0][0]
            with torch.no_grad():
                assert torch.equal(applied(x), plain.model(x))
            assert bits.measured_loss == pytest.approx(
                _loss(plain.model, data) - joint.joint.base_loss, abs=1e-7
            )
            assert joint.plan.bytes <= joint.plan.budget_bytes


def test_joint_rejects_per_channel_and_allocation_options(cases):
    model, data, _ = cases[0]
    with pytest.raises(JointMenuError, match="per_channel"):
        cetopt.compress(model, data, "8x", joint=True, per_channel=True, progress=False)
    with pytest.raises(JointMenuError, match="min_bits"):
        cetopt.compress(model, data, "8x", joint=True, min_bits=3, progress=False)
