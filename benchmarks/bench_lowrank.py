"""Low-rank plus sparse compression: single methods at equal parameters, and the joint menu at equal bytes.

For each model (digits CNN, digits ResNet, MNIST-1D CNN) and seed (the zoo model's training seed,
the calibration subset and the fine-tune order), one menu is measured on 512 calibration examples of
the training split (≤ 2048 calibration columns per layer): per layer, dense; quantized at
{2, 3, 4, 6, 8} bits; truncated SVD at 1/32 … 1/2 of full rank; magnitude pruning keeping 2–50 %;
weight-space (OATS-style) and activation-aware (ADMM) L + S over ranks {1/32, 1/16, 1/8, 1/4} ×
densities {1 %, 3 %, 10 %}; and every factorised option again with its factors at 4 and 8 bits. Each
option carries its network output error (only that layer changed) and its exact parameter and byte
cost. Then:

* **Equal parameters** (5× fewer parameters in the whole model, biases and BatchNorm included, so
  slightly more than 5× in the compressed layers' weights): the MILP picks one option
  per layer from the menu restricted to one method (SVD only, pruning only, weight-space L + S,
  activation-aware L + S; any layer may also stay dense) and, for reference, from all float
  methods together. Each plan is written back through the rewriter, then fine-tuned for a few
  epochs on the training split with ranks and sparsity masks fixed (Adam at a constant rate;
  cross-entropy plus distillation from the float32 model; BatchNorm statistics updated). The
  schedule (epochs × rate over {10, 20} × {1e-3, 3e-3}) is chosen per model on the validation
  split, once, with seed 0 and the weight-space plan; the grid and its validation accuracies are
  in the results (``fine_tune_selection``). The test split is never used to choose anything.
* **Equal bytes** (8× and 12× fewer weight bytes than float32): the MILP over each single method
  (bit allocation only; SVD, pruning, weight-space L + S, activation-aware L + S in float32) and over
  the joint menu (everything, including factorised layers with quantized factors). No fine-tune.

The row ``admm_sequential`` takes the activation-aware plan and refits its layers one by one, in
order, on the inputs they see once the layers before them are compressed, against their original
outputs (sequential calibration, :meth:`cetopt.lowrank.Menu.refit_sequential`; same ranks and masks).

**Joint menu in loss units, calibrated** (``joint_calibrated``; issue 20): at 8×, 12× and 16× fewer
weight bytes, no fine-tune, on the same 512 calibration examples with their labels. ``bits`` is
``cetopt.compress`` (``method="auto"``, bits {2, 3, 4, 5, 6, 8}, GPTQ + bias correction, sequential
calibration, on all 512 examples). Then :func:`cetopt.lowrank.joint_compress` (what
``compress(..., joint=True)`` runs) holds out a check split of 128 of the 512 (``holdout=0.25``,
drawn with the seed) and fits everything on the other 384: the sensitivities (``auto`` again), the
menu, every option's measured loss increase (quantized options on their GPTQ-rounded codes), and
each candidate plan applied as ``compress`` applies one. Rows ``bits_fit`` (bits only on the fit
split), ``lowrank`` (SVD, float factors), ``sparse`` (pruning) and ``joint_first`` (the joint
knapsack's first plan) are those fit-split models; ``refined`` the sequentially re-scored joint
plans. ``joint`` is the returned model: a refined plan first replaces the plan it refines only if
its paired per-example check loss difference to it is below zero by more than ``z · stderr``;
then the best remaining non-bits candidate on the check split is returned if its paired
difference to bits only passes the same test (one-sided 95 %, Bonferroni over the non-bits
candidates for every test; ``selection`` holds the numbers), else bits only; the chosen plan
is then calibrated again on all 512 examples, so a fallback is exactly ``compress``'s model
(``bits_equals_compress``). Bits only cannot reach 16× (2-bit codes plus a float32 scale and a
bit width per channel exceed it); there the best candidate on the check split is returned.
``rank_correlation`` is Spearman's between each plan's predicted loss increase (summed per-layer
scores) and its measured fit-split loss increase, over every plan of a row.

Per layer, the activation-aware and weight-space fits at the same (rank, nnz) are also compared on
the layer's post-activation calibration error (the geometric mean of their ratio).

Accuracy is top-1 on the test split; output error is ``‖f'(x) − f(x)‖² / ‖f(x)‖²`` of the logits on
the test split. Parameter counts are exact: factors plus the nonzeros of the sparse part (stored as
values plus an index buffer, which is not counted as parameters); the whole-model ratio also counts
biases and BatchNorm parameters. Bytes count quantized codes as ``cetopt.save`` packs them and
sparse parts as float32 values plus a bitmask or 2-byte indices (a packing model; in memory the
positions are an int64 buffer).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

import cetopt
from cetopt.allocation import fp32_weight_bytes
from cetopt.errors import InfeasibleBudgetError, SolverFailedError
from cetopt.lowrank import build_menu, joint_compress, stored_bytes, stored_params
from cetopt.zoo import accuracy, load_dataset, load_model, zoo_entry

MODELS = ("digits-cnn", "digits-resnet", "mnist1d-cnn")
METHODS = ("svd", "prune", "weight_space", "admm")
PARAM_RATIO = 5.0
BYTE_RATIOS = (8.0, 12.0)
CALIBRATION_EXAMPLES = 512
ITERATIONS = 20
FINETUNE = {"batch_size": 64, "distillation_temperature": 4.0}
# the fine-tune schedule is chosen per model on the validation split (never the test split):
# seed 0, the weight-space L + S plan at the equal-parameter budget, every (epochs, lr) below
SELECTION_EPOCHS = (10, 20)
SELECTION_LRS = (1e-3, 3e-3)
SELECTION_METHOD = "weight_space"
JOINT_RATIOS = (8.0, 12.0, 16.0)
JOINT_BITS = (2, 3, 4, 5, 6, 8)  # compress's default candidate bit widths
JOINT_ROWS = ("bits", "bits_fit", "lowrank", "sparse", "joint_first", "joint", "joint_validated")


def _output_error(model, reference, x) -> float:
    with torch.no_grad():
        out = model(x).double()
    return float((out - reference).pow(2).sum() / reference.pow(2).sum())


def _fine_tune(model, teacher, data, seed: int, epochs: int, lr: float, val_curve: list | None = None):
    """Adam on the training split: cross-entropy plus distillation from the float32 model.

    If ``val_curve`` is a list, the validation-split accuracy after every epoch is appended to it.
    """
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    loader = data.loader("train", batch_size=FINETUNE["batch_size"], shuffle=True, seed=seed)
    temp = FINETUNE["distillation_temperature"]
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            out = model(xb)
            with torch.no_grad():
                soft = F.softmax(teacher(xb) / temp, dim=1)
            kd = F.kl_div(F.log_softmax(out / temp, dim=1), soft, reduction="batchmean") * temp**2
            loss = F.cross_entropy(out, yb) + kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val_curve is not None:
            val_curve.append(accuracy(model, data.x_val, data.y_val))
    return model.eval()


def _select_schedule(menu, model, data, seed: int) -> dict:
    """Pick (epochs, lr) by validation accuracy of the fine-tuned weight-space plan.

    Adam runs at a constant rate, so one run of ``max(SELECTION_EPOCHS)`` epochs per rate gives
    every grid point (the model after 10 epochs of a 20-epoch run is the 10-epoch model). Ties go to
    fewer epochs, then the lower rate.
    """
    new = menu.apply(model, menu.choose(_param_budget(menu, model), kinds=[SELECTION_METHOD]))
    grid, curves = [], {}
    for lr in SELECTION_LRS:
        curve: list[float] = []
        _fine_tune(new, model, data, seed, max(SELECTION_EPOCHS), lr, val_curve=curve)
        curves[str(lr)] = curve
        grid += [{"epochs": e, "lr": lr, "val_accuracy": curve[e - 1]} for e in SELECTION_EPOCHS]
    best = max(grid, key=lambda g: (g["val_accuracy"], -g["epochs"], -g["lr"]))
    return {
        "method": SELECTION_METHOD,
        "seed": seed,
        "val_accuracy_before_fine_tune": accuracy(new, data.x_val, data.y_val),
        "grid": grid,
        "val_curves_per_epoch": curves,
        "chosen": {"epochs": best["epochs"], "lr": best["lr"]},
    }


def _evaluate(model, data, reference) -> dict:
    with torch.no_grad():
        test_loss = float(F.cross_entropy(model(data.x_test), data.y_test))
    return {
        "accuracy": accuracy(model, data.x_test, data.y_test),
        "output_error": _output_error(model, reference, data.x_test),
        "test_loss": test_loss,
    }


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _param_budget(menu, model) -> float:
    # the whole model (biases and BatchNorm included) must have PARAM_RATIO× fewer parameters
    return _count(model) / PARAM_RATIO - (_count(model) - menu.dense_params)


def _param_row(menu, model, data, reference, kinds, seed, schedule, calibration=None) -> dict:
    """One equal-parameter plan; with ``calibration``, its ADMM layers are refitted sequentially."""
    plan = menu.choose(_param_budget(menu, model), kinds=kinds)
    if calibration is not None:
        plan = menu.refit_sequential(model, plan, calibration, iterations=ITERATIONS, seed=seed)
    new = menu.apply(model, plan)
    exact = stored_params(new, menu.layers)
    assert exact == plan.params, (exact, plan.params)
    tuned = _fine_tune(new, model, data, seed, schedule["epochs"], schedule["lr"])
    assert stored_params(tuned, menu.layers) == exact  # ranks and masks kept
    return {
        "plan": plan.to_dict(),
        "params": exact,
        "layer_ratio": menu.dense_params / exact,
        "model_params": _count(new),
        "model_ratio": _count(model) / _count(new),
        **_evaluate(new, data, reference),
        "fine_tuned": _evaluate(tuned, data, reference),
    }


def _byte_row(menu, model, data, reference, ratio, kinds) -> dict:
    budget = menu.dense_bytes / ratio
    try:
        plan = menu.choose(budget, resource="bytes", kinds=kinds, quantized_factors=kinds is None)
    except InfeasibleBudgetError as exc:
        return {"infeasible": str(exc)}
    new = menu.apply(model, plan)
    exact = stored_bytes(new, menu.layers)
    assert exact == plan.bytes, (exact, plan.bytes)
    return {
        "plan": plan.to_dict(),
        "bytes": exact,
        "ratio": menu.dense_bytes / exact,
        **_evaluate(new, data, reference),
    }


def _fit_comparison(menu) -> dict:
    """Activation-aware vs weight-space L + S at the same (layer, rank, nnz): post-activation error."""
    ratios, wins = [], 0
    for name in menu.layers:
        ws = {(o.rank, o.nnz): o.error for o in menu.options[name] if o.kind == "weight_space" and not o.bits}
        for o in menu.options[name]:
            if o.kind == "admm" and not o.bits and (o.rank, o.nnz) in ws and ws[(o.rank, o.nnz)] > 0:
                ratios.append(o.error / ws[(o.rank, o.nnz)])
                wins += o.error < ws[(o.rank, o.nnz)]
    r = np.asarray(ratios)
    return {
        "pairs": int(r.size),
        "admm_better": int(wins),
        "error_ratio_geomean": float(np.exp(np.log(np.maximum(r, 1e-300)).mean())) if r.size else None,
        "error_ratio_median": float(np.median(r)) if r.size else None,
    }


def _candidate_row(c, data, reference, layers) -> dict:
    exact = stored_bytes(c.model, layers)
    assert exact == c.bytes, (exact, c.bytes)
    return {
        "candidate": c.name,
        "bytes": exact,
        "calibration_loss_increase": c.measured_loss,
        "check_loss_increase": c.check_loss,
        "predicted_loss_increase": c.predicted_loss,
        "choice": {n: o.label for n, o in c.options.items()},
        **_evaluate(c.model, data, reference),
    }


def _model_row(name, model, loss_increase, choice, data, reference, layers) -> dict:
    """A row for a model calibrated on all the calibration data (compress's, or the returned one)."""
    return {
        "candidate": name,
        "bytes": stored_bytes(model, layers),
        "calibration_loss_increase": loss_increase,
        "choice": choice,
        **_evaluate(model, data, reference),
    }


def _calibration_loss(model, calibration) -> float:
    total = sum(len(x) for x, _ in calibration)
    with torch.no_grad():
        return float(sum(F.cross_entropy(model(x), y) * (len(x) / total) for x, y in calibration))


def _joint_calibrated(model, data, calibration, reference, seed: int, quick: bool) -> dict:
    """The joint menu at 8×, 12×, 16× fewer weight bytes against bits only and each single kind."""
    cpu = time.process_time()
    table = cetopt.sensitivity(model, calibration, JOINT_BITS, "auto", seed=seed, progress=False)
    out = {"sensitivity_method": table.method, "sensitivity_cpu_seconds": time.process_time() - cpu}
    base = _calibration_loss(model, calibration)
    menu, fit_table, predicted, measured = None, None, [], []

    def fit_sensitivity(batches):  # what compress(joint=True) runs on the fit split
        return cetopt.sensitivity(model, batches, JOINT_BITS, "auto", seed=seed, progress=False)

    for ratio in JOINT_RATIOS:
        budget = fp32_weight_bytes(table) / ratio
        cpu = time.process_time()
        new, plan, res = joint_compress(
            model,
            calibration,
            table,
            budget,
            seed=seed,
            progress=False,
            menu=menu,
            fit_table=fit_table,
            sensitivity_fn=fit_sensitivity,
            menu_options={"iterations": 10 if quick else ITERATIONS},
            keep_models=True,
        )
        seconds = time.process_time() - cpu
        menu, fit_table = res.menu, res.fit_table
        layers = menu.layers
        cell = {"budget_bytes": budget, "joint_cpu_seconds": seconds, "chosen": res.chosen}
        cell["fell_back_to_bits"] = res.fell_back
        cell["infeasible"] = res.infeasible
        cell["selection"] = res.selection
        for c in res.candidates:
            predicted.append(c.predicted_loss)
            measured.append(c.measured_loss)
        # bits only is compress's plan and model, calibrated on all the calibration data
        try:
            cpu = time.process_time()
            compressed = cetopt.compress(
                model, calibration, budget, bits=JOINT_BITS, seed=seed, progress=False
            )
            cell["compress_cpu_seconds"] = time.process_time() - cpu
        except InfeasibleBudgetError:
            compressed = None
        except SolverFailedError as exc:  # compress's own allocation; recorded, not hidden
            compressed = None
            cell["compress_failed"] = str(exc)
        cell["bits"] = (
            {"infeasible": res.infeasible.get("bits", cell.get("compress_failed", ""))}
            if compressed is None
            else _model_row(
                "compress",
                compressed.model,
                _calibration_loss(compressed.model, calibration) - base,
                {n: f"quant-{b}b" for n, b in dict(compressed.plan.bits).items()},
                data,
                reference,
                layers,
            )
        )
        rows = {"bits_fit": "bits", "lowrank": "lowrank", "sparse": "sparse", "joint_first": "joint"}
        for key, name in rows.items():
            c = res.candidate(name)
            cell[key] = (
                {"infeasible": res.infeasible.get(name, "")}
                if c is None
                else _candidate_row(c, data, reference, layers)
            )
        cell["joint"] = _model_row(
            res.chosen,
            new,
            res.final_loss,
            {n: o.label for n, o in res.best.options.items()} if not res.fell_back else None,
            data,
            reference,
            layers,
        )
        cell["joint"]["check_loss_increase"] = res.best.check_loss
        cell["refined"] = [
            _candidate_row(c, data, reference, layers)
            for c in res.candidates
            if c.name.startswith("joint_refined")
        ]
        cell["rank_correlation"] = res.rank_correlation
        # falling back returns compress's plan and model exactly
        if "compress_failed" in cell:
            cell["bits_equals_compress"] = None
        elif compressed is None:
            cell["bits_equals_compress"] = "bits" in res.infeasible
        elif res.fell_back:
            same_bits = dict(plan.bits) == dict(compressed.plan.bits)
            with torch.no_grad():
                same_out = torch.equal(compressed.model(data.x_test), new(data.x_test))
            cell["bits_equals_compress"] = bool(same_bits and same_out)
        else:
            cell["bits_equals_compress"] = "bits" not in res.infeasible
        assert stored_bytes(new, layers) <= budget
        out[str(ratio)] = cell
    from scipy import stats

    out["rank_correlation_all_plans"] = float(stats.spearmanr(predicted, measured).statistic)
    out["plans_measured"] = len(predicted)
    return out


def _one(name: str, seed: int, quick: bool, selection: dict | None) -> dict:
    """One model and seed; ``selection`` is the model's schedule selection, or None to run it here."""
    torch.manual_seed(seed)
    model = load_model(name, seed=seed, progress=False)
    data = load_dataset(zoo_entry(name).dataset)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    calibration = data.x_train[order[:CALIBRATION_EXAMPLES]]
    labelled = [(calibration, data.y_train[order[:CALIBRATION_EXAMPLES]])]
    with torch.no_grad():
        reference = model(data.x_test).double()
    t0 = time.perf_counter()
    menu = build_menu(model, calibration, iterations=10 if quick else ITERATIONS, seed=seed, progress=False)
    menu_seconds = time.perf_counter() - t0
    if selection is None:
        selection = _select_schedule(menu, model, data, seed)
    schedule = selection["chosen"]
    row = {
        "model": name,
        "seed": seed,
        "fp32_accuracy": accuracy(model, data.x_test, data.y_test),
        "dense_params": menu.dense_params,
        "dense_bytes": menu.dense_bytes,
        "model_params": _count(model),
        "menu_options": sum(len(v) for v in menu.options.values()),
        "menu_seconds": menu_seconds,
        "fine_tune_schedule": schedule,
        "layer_fit_admm_vs_weight_space": _fit_comparison(menu),
        "equal_params": {
            kind: _param_row(menu, model, data, reference, kinds, seed, schedule)
            for kind, kinds in [*((m, [m]) for m in METHODS), ("joint_float", list(METHODS))]
        }
        | {
            "admm_sequential": _param_row(
                menu, model, data, reference, ["admm"], seed, schedule, calibration=calibration
            )
        },
        "equal_bytes": {
            str(ratio): {
                kind: _byte_row(menu, model, data, reference, ratio, kinds)
                for kind, kinds in [*((m, [m]) for m in ("quant", *METHODS)), ("joint", None)]
            }
            for ratio in BYTE_RATIOS
        },
    }
    row["joint_calibrated"] = _joint_calibrated(model, data, labelled, reference, seed, quick)
    row["fine_tune_selection"] = selection
    print(f"  {name} seed {seed}: menu {menu_seconds:.1f} s, fine-tune {schedule}", flush=True)
    return row


def _stat(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _summary(rows: list[dict]) -> dict:
    out = {}
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        params = {
            kind: {
                "layer_ratio": _stat([r["equal_params"][kind]["layer_ratio"] for r in mine]),
                "model_ratio": _stat([r["equal_params"][kind]["model_ratio"] for r in mine]),
                "accuracy": _stat([r["equal_params"][kind]["accuracy"] for r in mine]),
                "output_error": _stat([r["equal_params"][kind]["output_error"] for r in mine]),
                "accuracy_fine_tuned": _stat(
                    [r["equal_params"][kind]["fine_tuned"]["accuracy"] for r in mine]
                ),
                "output_error_fine_tuned": _stat(
                    [r["equal_params"][kind]["fine_tuned"]["output_error"] for r in mine]
                ),
            }
            for kind in mine[0]["equal_params"]
        }
        byte = {}
        for ratio in mine[0]["equal_bytes"]:
            byte[ratio] = {}
            for kind in mine[0]["equal_bytes"][ratio]:
                ok = [
                    r["equal_bytes"][ratio][kind]
                    for r in mine
                    if "infeasible" not in r["equal_bytes"][ratio][kind]
                ]
                byte[ratio][kind] = (
                    {
                        "ratio": _stat([o["ratio"] for o in ok]),
                        "accuracy": _stat([o["accuracy"] for o in ok]),
                        "output_error": _stat([o["output_error"] for o in ok]),
                    }
                    if ok
                    else {"infeasible": True}
                )
        fits = [r["layer_fit_admm_vs_weight_space"] for r in mine]
        out[name] = {
            "fp32_accuracy": _stat([r["fp32_accuracy"] for r in mine]),
            "layer_fit_admm_vs_weight_space": {
                "pairs": sum(f["pairs"] for f in fits),
                "admm_better": sum(f["admm_better"] for f in fits),
                "error_ratio_geomean": _stat([f["error_ratio_geomean"] for f in fits]),
            },
            "equal_params": params,
            "equal_bytes": byte,
        }
    return out


def _targets(summary: dict) -> dict:
    """Target 1: ≥ 4.9× fewer parameters within 1 pp of fp32 after fine-tune (mean over seeds).
    Target 2: at equal bytes the joint menu beats every single method (accuracy ≥ and output error <)."""
    first, second = {}, {}
    for name, s in summary.items():
        fp32 = s["fp32_accuracy"]["mean"]
        first[name] = {
            kind: {
                "model_ratio": v["model_ratio"]["mean"],
                "gap_pp": 100 * (fp32 - v["accuracy_fine_tuned"]["mean"]),
                "met": v["model_ratio"]["mean"] >= 4.9 and fp32 - v["accuracy_fine_tuned"]["mean"] <= 0.01,
            }
            for kind, v in s["equal_params"].items()
        }
        second[name] = {}
        for ratio, kinds in s["equal_bytes"].items():
            joint = kinds["joint"]
            singles = {k: v for k, v in kinds.items() if k != "joint" and "infeasible" not in v}
            second[name][ratio] = {
                "accuracy_beats_all": all(
                    joint["accuracy"]["mean"] >= v["accuracy"]["mean"] for v in singles.values()
                ),
                "output_error_beats_all": all(
                    joint["output_error"]["mean"] < v["output_error"]["mean"] for v in singles.values()
                ),
            }
    return {"params_4.9x_within_1pp_after_fine_tune": first, "joint_beats_single_at_equal_bytes": second}


def _joint_summary(rows: list[dict]) -> dict:
    out = {}
    for name in MODELS:
        mine = [r["joint_calibrated"] for r in rows if r["model"] == name]
        if not mine:
            continue
        cells = {}
        for ratio in map(str, JOINT_RATIOS):
            cell = {}
            for key in JOINT_ROWS:
                ok = [m[ratio][key] for m in mine if "accuracy" in m[ratio][key]]
                cell[key] = (
                    {
                        "accuracy": _stat([o["accuracy"] for o in ok]),
                        "output_error": _stat([o["output_error"] for o in ok]),
                        **(
                            {"test_loss": _stat([o["test_loss"] for o in ok])}
                            if all("test_loss" in o for o in ok)
                            else {}
                        ),
                        "calibration_loss_increase": _stat([o["calibration_loss_increase"] for o in ok]),
                        "ratio": _stat(
                            [m[ratio]["budget_bytes"] * float(ratio) / o["bytes"] for m, o in zip(mine, ok)]
                        ),
                    }
                    if len(ok) == len(mine)
                    else {"infeasible": True, "feasible_seeds": len(ok)}
                )
            cell["chosen"] = [m[ratio]["chosen"] for m in mine]
            cell["fell_back_to_bits"] = sum(m[ratio]["fell_back_to_bits"] for m in mine)
            checked = [m[ratio]["bits_equals_compress"] for m in mine]
            cell["bits_equals_compress"] = all(c for c in checked if c is not None)
            cell["compress_failed_seeds"] = sum(c is None for c in checked)
            rhos = [m[ratio]["rank_correlation"] for m in mine if m[ratio]["rank_correlation"] is not None]
            cell["rank_correlation"] = _stat(rhos) if rhos else None
            cell["joint_cpu_seconds"] = _stat([m[ratio]["joint_cpu_seconds"] for m in mine])
            cells[ratio] = cell
        out[name] = {
            "sensitivity_method": [m["sensitivity_method"] for m in mine],
            "rank_correlation_all_plans": _stat([m["rank_correlation_all_plans"] for m in mine]),
            "cells": cells,
        }
    return out


def _with_validated(rows: list[dict]) -> list[dict]:
    """Each cell gains ``joint_validated``: what ``joint_compress(refit=False)`` returns, derived
    from the same run — the chosen candidate's own (fit-split) model, or compress's on a fallback."""
    for r in rows:
        for ratio in map(str, JOINT_RATIOS):
            cell = r["joint_calibrated"][ratio]
            if cell["fell_back_to_bits"]:
                cell["joint_validated"] = dict(cell["bits"])
                continue
            named = {"joint": "joint_first", "lowrank": "lowrank", "sparse": "sparse"}
            if cell["chosen"] in named:
                cell["joint_validated"] = dict(cell[named[cell["chosen"]]])
            else:
                cell["joint_validated"] = dict(
                    next(c for c in cell["refined"] if c["candidate"] == cell["chosen"])
                )
    return rows


def _joint_targets(summary: dict, rows: list[dict], key: str = "joint") -> dict:
    """Joint ≥ bits only in every (model, ratio) cell (mean over seeds, and each seed);
    strictly ahead at 12× and 16× on the mean (per model, and over the three models)."""
    cells, ahead = {}, {}
    for name, s in summary.items():
        mine = [r["joint_calibrated"] for r in rows if r["model"] == name]
        cells[name] = {}
        for ratio, cell in s["cells"].items():
            joint, bits = cell[key], cell["bits"]
            if "infeasible" in bits:
                cells[name][ratio] = {"bits_infeasible": True, "joint_accuracy": joint["accuracy"]["mean"]}
                continue
            per_seed = [m[ratio][key]["accuracy"] - m[ratio]["bits"]["accuracy"] for m in mine]
            diff = joint["accuracy"]["mean"] - bits["accuracy"]["mean"]
            cells[name][ratio] = {
                "joint_minus_bits_pp": 100 * diff,
                "at_least_bits_on_mean": diff >= -1e-12,
                "at_least_bits_every_seed": all(d >= -1e-12 for d in per_seed),
                "strictly_ahead_on_mean": diff > 1e-12,
            }
    for ratio in map(str, JOINT_RATIOS):
        feasible = [n for n in cells if "joint_minus_bits_pp" in cells[n].get(ratio, {})]
        if feasible:
            mean = float(np.mean([cells[n][ratio]["joint_minus_bits_pp"] for n in feasible]))
            ahead[ratio] = {"mean_joint_minus_bits_pp_over_models": mean, "strictly_ahead": mean > 1e-9}
        else:
            ahead[ratio] = {"bits_infeasible_everywhere": True}
    return {"per_cell": cells, "over_models": ahead}


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seeds = [0] if quick else [0, 1, 2]
    models = MODELS[:1] if quick else MODELS
    rows, selections = [], {}
    from benchmarks.harness import write_result

    for seed in seeds:
        for name in models:
            rows.append(_one(name, seed, quick, selections.get(name)))
            selections.setdefault(name, rows[-1]["fine_tune_selection"])
            joint = _joint_summary(rows)
            partial = {"partial": True, "joint_calibrated": joint, "rows": rows}
            write_result("lowrank.partial", partial, quick=quick)
    summary = _summary(rows)
    return {
        "config": {
            "models": list(models),
            "seeds": seeds,
            "param_ratio": PARAM_RATIO,
            "byte_ratios": list(BYTE_RATIOS),
            "calibration_examples": CALIBRATION_EXAMPLES,
            "max_columns": 2048,
            "fine_tune": {
                **FINETUNE,
                "optimizer": "Adam, constant rate",
                "selection": "per model on the validation split; seed 0; weight-space plan",
                "selection_epochs": list(SELECTION_EPOCHS),
                "selection_lrs": list(SELECTION_LRS),
                "chosen": {name: sel["chosen"] for name, sel in selections.items()},
            },
            "objective": "output_error",
        },
        "summary": summary,
        "fine_tune_selection": selections,
        "targets": _targets(summary),
        "joint_calibrated": _joint_section(rows, quick),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def _one_joint(name: str, seed: int, quick: bool) -> dict:
    """Only the ``joint_calibrated`` section for one model and seed (same calibration set as ``_one``)."""
    torch.manual_seed(seed)
    model = load_model(name, seed=seed, progress=False)
    data = load_dataset(zoo_entry(name).dataset)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    pick = order[:CALIBRATION_EXAMPLES]
    with torch.no_grad():
        reference = model(data.x_test).double()
    labelled = [(data.x_train[pick], data.y_train[pick])]
    cpu = time.process_time()
    section = _joint_calibrated(model, data, labelled, reference, seed, quick)
    print(f"  {name} seed {seed}: joint section {time.process_time() - cpu:.1f} s CPU", flush=True)
    return {
        "model": name,
        "seed": seed,
        "fp32_accuracy": accuracy(model, data.x_test, data.y_test),
        "joint_calibrated": section,
    }


def _joint_section(rows: list[dict], quick: bool) -> dict:
    from benchmarks.harness import machine_info

    rows = _with_validated(rows)
    joint = _joint_summary(rows)
    return {
        "config": {
            "byte_ratios": list(JOINT_RATIOS),
            "bits": list(JOINT_BITS),
            "sensitivity_method": "auto (as cetopt.compress)",
            "calibration": "the same 512 training examples as the other sections, with labels; "
            "GPTQ + bias correction, sequential calibration",
            "fine_tune": None,
            "quick": quick,
        },
        "machine": machine_info(),
        "summary": joint,
        "selection": {
            "holdout": 0.25,
            "confidence": 0.95,
            "rule": "a refined joint plan replaces the plan it refines, and then the best other candidate "
            "on the check split replaces bits only, only if its paired per-example loss difference has "
            "mean + z * stderr < 0 (one-sided, Bonferroni over the non-bits candidates for every test)",
            "joint": "the returned model: the chosen plan calibrated again on all 512 examples (refit=True)",
            "joint_validated": "derived from the same run: the chosen candidate's own fit-split model "
            "(what refit=False returns), compress's model on a fallback",
        },
        "targets": _joint_targets(joint, rows),
        "targets_validated": _joint_targets(joint, rows, "joint_validated"),
        "rows": [{"model": r["model"], "seed": r["seed"], **r["joint_calibrated"]} for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.bench_lowrank --joint MODEL --out FILE`` measures only the joint
    section (one process per model, so the models run side by side); ``--merge FILE ...`` puts the
    pieces into ``results/lowrank.json`` as its ``joint_calibrated`` section, keeping the others."""
    import argparse
    import json

    from benchmarks.harness import RESULTS
    from cetopt._io import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lowrank")
    parser.add_argument("--joint", action="append", default=[], help="model name (repeatable)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", help="where --joint writes its rows")
    parser.add_argument("--merge", nargs="*", default=None, help="row files to merge into lowrank.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--note", help="--merge: where the rows come from (the JSON's notes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.joint:
        rows = []
        for seed in map(int, args.seeds.split(",")):
            for name in args.joint:
                rows.append(_one_joint(name, seed, args.quick))
                atomic_write_json(args.out, {"rows": rows, "partial": True})
        atomic_write_json(args.out, {"rows": rows, "partial": False})
    if args.merge is not None:
        rows, partial = [], False
        for path in args.merge:
            with open(path) as f:
                piece = json.load(f)
            rows += piece["rows"]
            partial |= piece["partial"]
        unique = {(r["model"], r["seed"]): r for r in reversed(rows)}  # a row measured twice: the first
        rows = sorted(unique.values(), key=lambda r: (r["seed"], MODELS.index(r["model"])))
        # partial when a (model, seed) of the grid is missing, whichever piece brought each row
        models = [m for m in MODELS if any(r["model"] == m for r in rows)]
        partial = any((m, s) not in unique for m in models for s in map(int, args.seeds.split(",")))
        target = RESULTS / "quick" / "lowrank.json" if args.quick else RESULTS / "lowrank.json"
        results = json.loads(target.read_text()) if target.exists() else {}
        section = _joint_section(rows, args.quick)
        section["partial"] = partial
        results["joint_calibrated"] = section
        import subprocess

        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        notes = results.setdefault("notes", {})
        notes["joint_calibrated"] = args.note or f"merged at commit {head.strip() or 'unknown'}"
        atomic_write_json(target, results)
        print(f"merged {len(rows)} rows into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
