"""The joint menu: never above bits only on the calibration loss; its bits-only plan is compress's."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import cetopt
from cetopt.errors import JointMenuError
from cetopt.lowrank import Menu, joint_compress, prefer_candidate, split_calibration, stored_bytes
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
def test_joint_check_loss_is_never_above_bits_only(cases, ratio):
    """The selection rule: bits only unless a plan beats it on the held-out check split past the margin."""
    for model, data, table in cases:
        before = state_copy(model)
        budget = 4 * float(table.params.sum()) / ratio
        new, plan, res = joint_compress(
            model, data, table, budget, progress=False, menu_options=SMALL_MENU, refine=1
        )
        assert same_state(model, before)  # never modified
        bits = res.candidate("bits")
        assert bits is not None and bits.check_loss is not None
        sel = res.selection
        assert sel["check_examples"] == 16 and sel["fit_examples"] == 48
        # the chosen plan is never worse than bits only where nothing was fitted
        assert res.best.check_loss <= bits.check_loss
        champion = res.candidate(sel["champion"])
        others = [c for c in res.candidates if c.name != "bits"]
        # a refined joint plan competes only if it beat the plan it refines past the margin
        kept = "joint"
        for step in sel.get("refinements", []):
            assert step["against"] == kept
            again = prefer_candidate(
                res.candidate(kept).check_losses,
                res.candidate(step["candidate"]).check_losses,
                comparisons=len(others),
            )
            assert again["prefer"] == step["prefer"]
            kept = step["candidate"] if step["prefer"] else kept
        pool = [c for c in others if not c.name.startswith("joint")] + [res.candidate(kept)]
        assert champion.check_loss == min(c.check_loss for c in pool)
        again = prefer_candidate(bits.check_losses, champion.check_losses, comparisons=len(others))
        assert again["prefer"] == sel["prefer"] == (not res.fell_back)
        if not res.fell_back:
            assert sel["difference_mean"] + sel["margin"] < 0
        assert res.fell_back == (res.chosen == "bits")
        # the returned model: the chosen plan calibrated on all the data, within the budget
        full_base = _loss(model, data)
        assert _loss(new, data) - full_base == pytest.approx(res.final_loss, abs=1e-6)
        assert stored_bytes(new, table.layers) == plan.bytes <= budget
        assert {c.name for c in res.candidates} >= {"bits", "joint"}
        # without a BOPs budget activation bits stay off the menu
        assert "wa" not in {c.name for c in res.candidates} and res.activation_bits == {}
        assert not any(o.act_bits for n in res.menu.layers for o in res.menu.options[n])


@pytest.mark.parametrize("ratio", [5.0, 8.0])
def test_without_check_split_calibration_loss_is_never_above_bits_only(cases, ratio):
    for model, data, table in cases:
        budget = 4 * float(table.params.sum()) / ratio
        new, plan, res = joint_compress(
            model, data, table, budget, progress=False, menu_options=SMALL_MENU, refine=1, holdout=0
        )
        bits = res.candidate("bits")
        assert bits is not None and res.best.measured_loss <= bits.measured_loss
        assert res.selection == {} and res.final_loss is None and bits.check_loss is None
        assert _loss(new, data) - res.base_loss == pytest.approx(res.best.measured_loss, abs=1e-6)
        assert stored_bytes(new, table.layers) == res.best.bytes == plan.bytes <= budget


def test_prefer_candidate_needs_more_than_noise():
    gen = np.random.default_rng(0)
    bits = gen.exponential(1.0, 400)
    # slightly lower on average but within the noise: bits only
    noisy = bits - 0.01 + gen.normal(0, 1.0, 400)
    out = prefer_candidate(bits, noisy)
    assert not out["prefer"] and out["difference_mean"] < 0 < out["margin"]
    # clearly lower on nearly every example: the candidate
    better = bits - 0.2 + gen.normal(0, 0.05, 400)
    assert prefer_candidate(bits, better)["prefer"]
    # a margin that grows with the number of plans it was picked among (Bonferroni)
    one, five = prefer_candidate(bits, better), prefer_candidate(bits, better, comparisons=5)
    assert five["z"] > one["z"] and five["margin"] > one["margin"]
    # equal losses never win
    assert not prefer_candidate(bits, bits.copy())["prefer"]
    with pytest.raises(JointMenuError, match="two paired"):
        prefer_candidate(bits[:1], bits[:1])


def test_split_calibration_holds_examples_out():
    x = torch.arange(40.0).reshape(20, 2)
    y = torch.arange(20)
    data = [(x[:12], y[:12]), (x[12:], y[12:])]
    fit, check = split_calibration(data, 0.25, seed=3)
    fit_y = torch.cat([b[1] for b in fit]).tolist()
    check_y = torch.cat([b[1] for b in check]).tolist()
    assert sorted(fit_y + check_y) == list(range(20)) and not set(fit_y) & set(check_y)
    assert len(check_y) == 3 + 2  # round(0.25 · 12) + round(0.25 · 8)
    for (fx, fy), (cx, cy) in zip(fit, check):
        assert torch.equal(fx[:, 0] / 2, fy.float()) and torch.equal(cx[:, 0] / 2, cy.float())
    again = split_calibration(data, 0.25, seed=3)[1]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(check, again))  # deterministic
    assert split_calibration(data, 0.25, seed=4)[1][0][1].tolist() != check[0][1].tolist()
    with pytest.raises(JointMenuError, match="holdout"):
        split_calibration([(x[:2], y[:2])], 0.25)  # one example to check on
    with pytest.raises(JointMenuError, match="fraction"):
        split_calibration(data, 1.0)


def test_fallback_to_bits_when_the_scores_mislead(cases):
    """Options scored far too well (pruning at ~no cost) lure the knapsack; the check must catch it."""
    model, data, table = cases[0]
    budget = 4 * float(table.params.sum()) / 8
    for holdout in (0, 0.25):
        _, _, honest = joint_compress(
            model, data, table, budget, progress=False, menu_options=SMALL_MENU, refine=0, holdout=holdout
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
            model,
            data,
            table,
            budget,
            progress=False,
            menu=lured,
            fit_table=honest.fit_table,
            singles=("bits",),
            refine=0,
            holdout=holdout,
        )
        joint = res.candidate("joint")
        assert any(o.kind == "prune" for o in joint.options.values())  # the lure worked
        assert joint.measured_loss > res.candidate("bits").measured_loss
        assert res.chosen == "bits" and res.fell_back
        if holdout:
            assert joint.check_loss > res.candidate("bits").check_loss
            # the fallback is compress's plan on the full table, calibrated on all the data
            expected = cetopt.allocate(table, budget)
            assert dict(plan.bits) == dict(expected.bits) and plan.bytes == expected.bytes
        else:
            assert dict(plan.bits) == {n: o.bits for n, o in res.candidate("bits").options.items()}
            assert _loss(new, data) - res.base_loss == pytest.approx(
                res.candidate("bits").measured_loss, abs=1e-6
            )


def test_bits_only_plan_is_compress_plan(cases):
    for model, data, _ in cases[:2]:
        plain = cetopt.compress(model, data, "7x", method="measured", bits=BITS, progress=False)
        x = data[0][0]
        # without a check split the menu's bits-only candidate is compress's plan and model
        joint = cetopt.compress(
            model,
            data,
            "7x",
            method="measured",
            bits=BITS,
            progress=False,
            joint=True,
            joint_options={"menu_options": SMALL_MENU, "refine": 0, "singles": ("bits",), "holdout": 0},
        )
        bits = joint.joint.candidate("bits")
        assert {n: o.bits for n, o in bits.options.items()} == dict(plain.plan.bits)
        assert bits.bytes == plain.plan.bytes
        applied = cetopt.lowrank.apply_options(model, bits.options, data)
        with torch.no_grad():
            assert torch.equal(applied(x), plain.model(x))
        assert bits.measured_loss == pytest.approx(_loss(plain.model, data) - joint.joint.base_loss, abs=1e-7)
        assert joint.plan.bytes <= joint.plan.budget_bytes
        # with a check split, falling back returns compress's plan and model (fitted on all the data)
        held = cetopt.compress(
            model,
            data,
            "7x",
            method="measured",
            bits=BITS,
            progress=False,
            joint=True,
            joint_options={
                "menu_options": SMALL_MENU,
                "refine": 0,
                "kinds": ("quant",),
                "confidence": 1 - 1e-9,
            },
        )
        assert held.joint.fell_back
        assert dict(held.plan.bits) == dict(plain.plan.bits) and held.plan.bytes == plain.plan.bytes
        assert held.plan.predicted_loss == pytest.approx(plain.plan.predicted_loss)
        with torch.no_grad():
            assert torch.equal(held.model(x), plain.model(x))
        assert held.joint.final_loss == pytest.approx(_loss(plain.model, data) - _loss(model, data), abs=1e-7)


def test_group_sizes_join_the_menu(cases):
    """(bits, group) options are menu options: exact bytes, compress's plan without a check split."""
    model, data, _ = cases[0]
    groups = (None, 8)
    plain = cetopt.compress(
        model, data, "9x", method="measured", bits=BITS, group_sizes=groups, progress=False
    )
    assert any(g for g in dict(plain.plan.groups).values())  # the budget makes groups worth it
    joint = cetopt.compress(
        model,
        data,
        "9x",
        method="measured",
        bits=BITS,
        group_sizes=groups,
        progress=False,
        joint=True,
        joint_options={"menu_options": SMALL_MENU, "refine": 0, "holdout": 0},
    )
    menu = joint.joint.menu
    for name in menu.layers:
        quant = [(o.bits, o.group) for o in menu.options[name] if o.kind == "quant"]
        assert quant == [(b, g or None) for b, g in zip(joint.table.bits, joint.table.groups)]
    bits = joint.joint.candidate("bits")
    assert {n: o.bits for n, o in bits.options.items()} == dict(plain.plan.bits)
    assert {n: o.group or 0 for n, o in bits.options.items()} == {
        n: g or 0 for n, g in dict(plain.plan.groups).items()
    }
    applied = cetopt.lowrank.apply_options(model, bits.options, data)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(applied(x), plain.model(x))
    # each group option's bytes are what the written-back layer stores
    for name in menu.layers:
        for o in menu.options[name]:
            if o.kind == "quant" and o.group:
                one = cetopt.lowrank.apply_options(model, {name: o})
                assert stored_bytes(one, [name]) == o.bytes
    assert stored_bytes(joint.model, menu.layers) == joint.plan.bytes <= joint.plan.budget_bytes
    chosen = joint.joint.best.options
    assert {n: g for n, g in dict(joint.plan.groups).items() if g} == {
        n: o.group for n, o in chosen.items() if o.kind == "quant" and o.group
    }
    # and with the default check split the whole call goes through
    held = cetopt.compress(
        model,
        data,
        "9x",
        method="measured",
        bits=BITS,
        group_sizes=groups,
        progress=False,
        joint=True,
        joint_options={"menu_options": SMALL_MENU, "refine": 0},
    )
    assert stored_bytes(held.model, menu.layers) == held.plan.bytes <= held.plan.budget_bytes
    assert any(o.group for n in held.joint.menu.layers for o in held.joint.menu.options[n])


def test_joint_rejects_per_channel_and_allocation_options(cases):
    model, data, _ = cases[0]
    with pytest.raises(JointMenuError, match="per_channel"):
        cetopt.compress(model, data, "8x", joint=True, per_channel=True, progress=False)
    with pytest.raises(JointMenuError, match="min_bits"):
        cetopt.compress(model, data, "8x", joint=True, min_bits=3, progress=False)


def test_without_refit_the_returned_model_is_the_validated_one(cases):
    model, data, table = cases[0]
    budget = 4 * float(table.params.sum()) / 8
    _, check = split_calibration(data, 0.25, seed=0)
    for confidence in (0.5, 1 - 1e-9):  # a lenient margin (a plan may win) and one nothing passes
        new, plan, res = joint_compress(
            model,
            data,
            table,
            budget,
            progress=False,
            menu_options=SMALL_MENU,
            refine=0,
            refit=False,
            confidence=confidence,
        )
        assert all(c.model is None for c in res.candidates)  # not kept unless asked
        if res.fell_back:
            expected = cetopt.allocate(table, budget)
            assert dict(plan.bits) == dict(expected.bits)
        else:
            assert _loss(new, check) - _loss(model, check) == pytest.approx(res.best.check_loss, abs=1e-6)
        assert stored_bytes(new, table.layers) == plan.bytes <= budget


def test_act_order_is_forwarded(cases):
    """compress(act_order=False, joint=True): GPTQ rounds the menu's codes and the plans as compress does."""
    from cetopt.quant.apply import gptq_option_weights

    model, data, _ = cases[0]
    x = data[0][0]
    plain = {
        order: cetopt.compress(
            model, data, "7x", method="measured", bits=BITS, progress=False, act_order=order
        )
        for order in (True, False)
    }
    with torch.no_grad():  # the option matters on this model
        assert not torch.equal(plain[True].model(x), plain[False].model(x))
    joint = cetopt.compress(
        model,
        data,
        "7x",
        method="measured",
        bits=BITS,
        progress=False,
        act_order=False,
        joint=True,
        joint_options={"menu_options": SMALL_MENU, "refine": 0, "kinds": ("quant",), "confidence": 1 - 1e-9},
    )
    assert joint.joint.fell_back
    with torch.no_grad():  # the fallback is compress(act_order=False)'s model, not act_order=True's
        assert torch.equal(joint.model(x), plain[False].model(x))
    # the menu's quant options carry the codes GPTQ gives without act-order (on the fit split)
    fit, _ = split_calibration(data, 0.25, seed=0)
    menu = joint.joint.menu
    name = menu.layers[1]
    option = next(o for o in menu.options[name] if o.kind == "quant" and o.bits == 3)
    for order in (False, True):
        w = gptq_option_weights(model, [name], [(3, None)], fit, act_order=order)[(3, None)][name]
        same = torch.equal(option.approx.float(), w.reshape(w.shape[0], -1))
        assert same == (not order)


def _bops(table, weight_bits, act_bits) -> float:
    return float((np.asarray(table.macs, dtype=np.float64) * weight_bits * act_bits).sum())


def test_activation_bits_join_the_menu_under_a_bops_budget(cases):
    """(w, a) options in the same knapsack: within both budgets, activations really quantized."""
    from cetopt.deploy.runtime import FakeInt8
    from cetopt.lowrank import apply_options, option_bops

    model, data, table = cases[0]
    budget = 4 * float(table.params.sum()) / 6
    bops_budget = 0.9 * _bops(table, 2, 32)  # below every float-activation plan: bits only cannot
    new, plan, res = joint_compress(
        model,
        data,
        table,
        budget,
        progress=False,
        menu_options=SMALL_MENU,
        refine=0,
        holdout=0,
        kinds=("quant",),
        bops_budget=bops_budget,
        activation_bits=(4, 8),
    )
    assert "bits" in res.infeasible and res.bops_budget == bops_budget
    menu = res.menu
    for name in menu.layers:  # every per-channel quant option also at 4 and 8 activation bits
        plain = [o for o in menu.options[name] if o.kind == "quant" and not o.act_bits]
        acts = [o for o in menu.options[name] if o.act_bits]
        assert sorted((o.bits, o.act_bits) for o in acts) == sorted(
            (o.bits, a) for o in plain for a in (4, 8)
        )
    chosen = res.best.options
    assert res.activation_bits == {n: o.act_bits for n, o in chosen.items() if o.act_bits} != {}
    macs = dict(zip(table.layers, table.macs))
    modules = dict(model.named_modules())
    expected = sum(macs[n] * o.bits * (o.act_bits or 32) for n, o in chosen.items())
    assert plan.bops == pytest.approx(expected) and plan.bops <= bops_budget
    shape = {n: (modules[n].weight.shape[0], modules[n].weight[0].numel()) for n in table.layers}
    assert plan.bops == pytest.approx(sum(option_bops(o, macs[n], shape[n]) for n, o in chosen.items()))
    assert all(c.bops <= bops_budget * (1 + 1e-9) for c in res.candidates)
    assert plan.bytes <= budget
    # the returned model runs exactly those layers' inputs on the calibrated a-bit grid
    fake = {n: m for n, m in new.named_modules() if isinstance(m, FakeInt8)}
    assert set(fake) == set(res.activation_bits)
    assert all(fake[n].act_in.bits == a for n, a in res.activation_bits.items())
    x = data[0][0]
    weights_only = apply_options(model, {n: replace(o, act_bits=None) for n, o in chosen.items()}, data)
    with torch.no_grad():
        assert torch.equal(new(x), apply_options(model, chosen, data)(x))
        assert not torch.allclose(new(x), weights_only(x))
    assert _loss(new, data) - res.base_loss == pytest.approx(res.best.measured_loss, abs=1e-6)


def test_bits_only_under_a_bops_budget_is_compress_plan(cases):
    model, data, table = cases[0]
    bops_budget = 0.5 * _bops(table, 8, 32)  # float activations: bits only is feasible
    plain = cetopt.compress(
        model, data, "6x", method="measured", bits=BITS, progress=False, bops_budget=bops_budget
    )
    held = cetopt.compress(
        model,
        data,
        "6x",
        method="measured",
        bits=BITS,
        progress=False,
        joint=True,
        bops_budget=bops_budget,
        joint_options={
            "menu_options": SMALL_MENU,
            "refine": 0,
            "kinds": ("quant",),
            "activation_bits": (4, 8),
            "confidence": 1 - 1e-9,  # nothing passes: the fallback
        },
    )
    assert {c.name for c in held.joint.candidates} >= {"bits", "wa", "joint"}
    assert any(o.act_bits for o in held.joint.candidate("wa").options.values())
    assert not any(o.act_bits for o in held.joint.candidate("bits").options.values())
    assert all(c.bops <= bops_budget * (1 + 1e-9) for c in held.joint.candidates)
    # the fallback is compress's plan under both budgets (float activations), and its model
    assert held.joint.fell_back and held.joint.activation_bits == {}
    assert dict(held.plan.bits) == dict(plain.plan.bits) and held.plan.bops == pytest.approx(plain.plan.bops)
    with torch.no_grad():
        assert torch.equal(held.model(data[0][0]), plain.model(data[0][0]))
    with pytest.raises(JointMenuError, match="activation_bits"):
        joint_compress(
            model, data, table, "6x", bops_budget=bops_budget, activation_bits=(16,), progress=False
        )
    with pytest.raises(JointMenuError, match="macs"):
        joint_compress(model, data, replace(table, macs=None), "6x", bops_budget=bops_budget, progress=False)


def test_a_refined_plan_must_beat_the_plan_it_refines():
    """Refinements are close variants: the lowest check loss among them alone does not pick one."""
    from cetopt.lowrank.joint import JointCandidate, _select

    gen = np.random.default_rng(1)
    bits = gen.exponential(1.0, 300) + 0.5

    def cand(name, losses):
        return JointCandidate(
            name,
            {},
            0.0,
            0.0,
            0.0,
            0,
            "optimal",
            "highs",
            check_loss=float(losses.mean()),
            check_losses=losses,
        )

    joint = bits - 0.3 + gen.normal(0, 0.05, 300)  # clearly better than bits
    noisy = joint - 0.002 + gen.normal(0, 0.2, 300)  # lower on average, within the noise
    clear = joint - 0.1 + gen.normal(0, 0.01, 300)  # better than joint past the margin
    cands = [cand("bits", bits), cand("joint", joint), cand("joint_refined_1", noisy)]
    assert cands[2].check_loss < cands[1].check_loss
    chosen, sel = _select(cands, 0.95)
    assert chosen.name == "joint" and sel["champion"] == "joint"
    assert [s["prefer"] for s in sel["refinements"]] == [False]
    chosen, sel = _select([*cands, cand("joint_refined_2", clear)], 0.95)
    assert chosen.name == "joint_refined_2" and sel["refinements"][1]["against"] == "joint"
    # the same without bits only (an infeasible budget)
    chosen, _ = _select(cands[1:], 0.95)
    assert chosen.name == "joint"
