"""Mixed-precision quality at 10× smaller weights: ILP + {cet, hutchinson, fisher} vs uniform 3-bit
vs the HAWQ-V3 recipe, on the digits ResNet and the MNIST-1D CNN, with no fine-tuning.

For each model and seed: the four per-layer sensitivity tables (cet, hutchinson, fisher, measured)
and the two per-channel ones (``cet-channel``: CET's quadratic form for each output channel's own
perturbation, 64 Hessian-vector probes per bit width; ``measured-channel``) are computed on the
training split (the calibration data); each estimator's rank correlation with its ``measured``
counterpart is recorded, with its time as a ratio to the per-layer ``measured`` table's in the same
run. Then

* at the 10× budget: the ILP plan of each estimator (and of ``measured``, for reference), and
  uniform 3-bit, whose real bytes (codes plus a float32 scale and a bit-width byte per channel) may
  exceed 10×;
* at uniform 3-bit's own bytes: the ILP plan of each estimator, so the comparison is at equal bytes;
* at HAWQ-V3's own budgets — 4-bit cost + α (8-bit − 4-bit), α ∈ {0, 0.25} — the HAWQ-V3 recipe
  (Tr/params × ‖ΔW‖², bits {4, 8}; its smallest size is all 4-bit, so it cannot reach 10×) and the
  ILP + cet plan over all bit widths at the same bytes.

Accuracy is top-1 on the test split, which nothing here is tuned on. Each plan is evaluated as
quantized (round to nearest), then with GPTQ rounding and bias correction calibrated on the
calibration split all at once on the float model's inputs (``one_pass``), and layer by layer on
the quantized model's own inputs (``sequential``, what ``cetopt compress`` does by default). No
gradient steps; GPTQ keeps the scales, bits and bytes; bias correction adds a float32 bias to
layers that had none (4 bytes per channel, outside the weight budget, like every bias).

``peer_speed`` (also on its own: ``python -m benchmarks peer_speed``): at each model's own budget
4-bit bytes + 0.25 (8-bit − 4-bit bytes) — the smallest at which HAWQ-V3's {4, 8} bits have a choice
(10× is below its all-4-bit size) — seed 0, end-to-end seconds and test accuracy of
``cetopt.compress`` with its defaults (whatever sensitivity method and calibration they are), of
HAWQ-V3 as published (Hutchinson traces, the ILP over {4, 8}, round-to-nearest), and of Sony MCT's
``pytorch_post_training_quantization`` with ``ResourceUtilization(weights_memory=budget)`` where
it imports (else the exact import error is recorded); peer seconds as a ratio to cetopt's.
"""

from __future__ import annotations

import functools
import time

from benchmarks.harness import mean_sd
from cetopt.allocation import allocate, option_bytes
from cetopt.analysis import SensitivityTable, channel_bits, channel_sensitivity, rank_correlation, sensitivity
from cetopt.analysis.channels import split_channel_row
from cetopt.errors import InfeasibleBudgetError
from cetopt.quant.apply import quantize
from cetopt.zoo import accuracy, load_dataset, load_model, zoo_entry

BITS = (2, 3, 4, 5, 6, 8)
ESTIMATORS = ("cet", "hutchinson", "fisher")


CALIBRATION = "train"  # the held-out split (a few hundred examples) proved too noisy a loss estimate


def _tables(model, data, quick):
    loader = data.loader(CALIBRATION, batch_size=512)
    tables, seconds = {}, {}
    for method in ("measured", *ESTIMATORS):
        t0 = time.perf_counter()
        tables[method] = sensitivity(model, loader, BITS, method, probes=8 if quick else 16, progress=False)
        seconds[method] = time.perf_counter() - t0
    for method in ("measured", "cet"):
        t0 = time.perf_counter()
        tables[f"{method}-channel"] = channel_sensitivity(
            model, loader, BITS, method, probes=32 if quick else 64, progress=False
        )
        seconds[f"{method}-channel"] = time.perf_counter() - t0
    return tables, seconds


def _evaluate(model, data, bits: dict[str, int], *, calibrate: bool = False, sequential: bool = False):
    calibration = data.loader(CALIBRATION, batch_size=512) if calibrate else None
    quantized = quantize(model, bits, gptq=calibration, bias_correction=calibration, sequential=sequential)
    return accuracy(quantized, data.x_test, data.y_test)


VARIANTS = {  # result key → how the plan is quantized
    "accuracy": {},
    "accuracy_one_pass": {"calibrate": True},
    "accuracy_sequential": {"calibrate": True, "sequential": True},
}


def _accuracies(model, data, bits) -> dict:
    """Test accuracy as quantized, with one-pass GPTQ + bias correction, and with the sequential one."""
    if any(split_channel_row(name) for name in bits):  # a per-channel plan
        bits = channel_bits(bits)
    return {key: _evaluate(model, data, bits, **options) for key, options in VARIANTS.items()}


def _fixed_bits_bytes(table, bits: int) -> float:
    return float(option_bytes(table)[:, list(table.bits).index(bits)].sum())


def _with_bits(table: SensitivityTable, bits: tuple[int, ...]) -> SensitivityTable:
    cols = [list(table.bits).index(b) for b in bits]
    fields = {k: getattr(table, k) for k in ("layers", "params", "method", "channels", "macs", "fixed_bytes")}
    return SensitivityTable(bits=bits, values=table.values[:, cols], **fields)


def _exhaustive(model, data, table, budget_bytes: float) -> dict:
    """The plan with the lowest *joint* calibration loss among all plans within the budget."""
    import itertools

    from cetopt.analysis import LossObjective
    from cetopt.quant.quantizer import fake_quantize

    obj = LossObjective(model, data.loader(CALIBRATION, batch_size=512), list(table.layers))
    quantized = {b: {k: fake_quantize(w, b) for k, w in obj.weights.items()} for b in table.bits}
    sizes = option_bytes(table)
    best = (float("inf"), None)
    feasible = 0
    for combo in itertools.product(range(len(table.bits)), repeat=table.num_layers):
        if sum(sizes[i, c] for i, c in enumerate(combo)) > budget_bytes:
            continue
        feasible += 1
        loss = obj.loss({k: quantized[table.bits[c]][k] for k, c in zip(obj.keys, combo)})
        best = min(best, (loss, combo))
    bits = {name: table.bits[c] for name, c in zip(table.layers, best[1])}
    return {
        "plans_checked": feasible,
        "joint_loss": best[0],
        "bits": bits,
        **_accuracies(model, data, bits),
    }


def _one(name: str, seed: int, quick: bool) -> dict:
    data = load_dataset(zoo_entry(name).dataset)
    model = load_model(name, seed=seed, progress=False)
    tables, seconds = _tables(model, data, quick)
    row = {
        "model": name,
        "seed": seed,
        "fp32_accuracy": accuracy(model, data.x_test, data.y_test),
        "fp32_weight_bytes": 4.0 * float(tables["cet"].params.sum()),
        "rank_correlation": {
            **{m: rank_correlation(tables[m], tables["measured"]) for m in ESTIMATORS},
            "cet-channel": rank_correlation(tables["cet-channel"], tables["measured-channel"]),
        },
        "sensitivity_seconds_ratio_to_measured": {
            m: seconds[m] / seconds["measured"] for m in (*ESTIMATORS, "cet-channel", "measured-channel")
        },
        "cet_hvps": tables["cet"].meta["hvps"],
        "cet_exact": tables["cet"].meta["exact"],
        "cet_channel_hvps": tables["cet-channel"].meta["hvps"],
        "channels": tables["cet-channel"].num_layers,
        "at_10x": {},
        "hawq_budgets": {},
    }
    for method in (*ESTIMATORS, "cet-channel"):
        plan = allocate(tables[method], "10x")
        row["at_10x"][f"ilp+{method}"] = {
            **_accuracies(model, data, plan.bits),
            "bytes": plan.bytes,
            "bits": plan.bits,
            "status": plan.status,
            "solve_seconds": plan.solve_time,
            "solver": plan.solver,
            "budget": plan.budget_bytes,
        }
    uniform = dict.fromkeys(tables["cet"].layers, 3)
    uniform_bytes = _fixed_bits_bytes(tables["cet"], 3)
    row["at_10x"]["uniform-3bit"] = {
        **_accuracies(model, data, uniform),
        "bytes": uniform_bytes,
        "bits": uniform,
    }
    # uniform 3-bit's real bytes (codes + per-channel scales) can exceed 10x: compare at equal bytes too
    same = {"budget_bytes": uniform_bytes, "uniform-3bit": row["at_10x"]["uniform-3bit"]}
    for method in (*ESTIMATORS, "measured", "cet-channel"):
        same[f"ilp+{method}"] = _accuracies(model, data, allocate(tables[method], uniform_bytes).bits)
    row["at_uniform_3bit_bytes"] = same
    for method in ("measured", "measured-channel"):
        plan = allocate(tables[method], "10x")
        entry = {**_accuracies(model, data, plan.bits), "bytes": plan.bytes, "bits": plan.bits}
        row["at_10x"][f"ilp+{method}"] = entry
    if tables["cet"].num_layers <= 5:  # small enough to enumerate every plan
        row["exhaustive_joint_loss_at_10x"] = _exhaustive(
            model, data, tables["cet"], row["at_10x"]["ilp+cet"]["budget"]
        )
    four, eight = _fixed_bits_bytes(tables["cet"], 4), _fixed_bits_bytes(tables["cet"], 8)
    # 0.5·Tr/params·‖ΔW‖² at bits {4, 8}: HAWQ-V3's objective up to a constant
    hawq_table = _with_bits(tables["hutchinson"], (4, 8))
    for alpha in (0.0, 0.25):
        budget = four + alpha * (eight - four)
        entry = {"budget_bytes": budget, "compression": row["fp32_weight_bytes"] / budget}
        hawq = allocate(hawq_table, budget, use_greedy=False)
        entry["hawq-v3"] = {**_accuracies(model, data, hawq.bits), "bytes": hawq.bytes}
        for method in ("cet", "cet-channel"):
            plan = allocate(tables[method], budget)
            entry[f"ilp+{method}"] = {**_accuracies(model, data, plan.bits), "bytes": plan.bytes}
        row["hawq_budgets"][f"alpha={alpha}"] = entry
    try:
        allocate(hawq_table, "10x")
        row["hawq_v3_at_10x"] = "feasible"
    except InfeasibleBudgetError as exc:
        row["hawq_v3_at_10x"] = (
            f"infeasible: smallest {exc.minimum:.0f} bytes ({row['fp32_weight_bytes'] / exc.minimum:.2f}x)"
        )
    return row


def _variant_stats(rows: list[dict], pick) -> dict:
    """Mean and spread over ``rows`` of each quantization variant of the entry ``pick(row)``."""
    return {variant: mean_sd([pick(r)[variant] for r in rows]) for variant in VARIANTS}


def _summary(rows: list[dict]) -> dict:
    out = {}
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        stats = functools.partial(_variant_stats, mine)
        entry = {"fp32": mean_sd([r["fp32_accuracy"] for r in mine])}
        for key in mine[0]["at_10x"]:
            entry[f"10x {key}"] = stats(lambda r, key=key: r["at_10x"][key])
        for key in mine[0]["at_uniform_3bit_bytes"]:
            if key != "budget_bytes":
                entry[f"uniform-3bit bytes {key}"] = stats(lambda r, key=key: r["at_uniform_3bit_bytes"][key])
        for alpha in mine[0]["hawq_budgets"]:
            for key in ("hawq-v3", "ilp+cet", "ilp+cet-channel"):
                entry[f"{alpha} {key}"] = stats(lambda r, a=alpha, key=key: r["hawq_budgets"][a][key])
        if "exhaustive_joint_loss_at_10x" in mine[0]:
            entry["10x exhaustive best joint loss"] = stats(lambda r: r["exhaustive_joint_loss_at_10x"])
        entry["rank_correlation"] = {
            m: mean_sd([r["rank_correlation"][m] for r in mine]) for m in mine[0]["rank_correlation"]
        }
        for key in ("ilp+cet", "ilp+cet-channel", "uniform-3bit"):
            entry[f"10x {key} sequential minus fp32 (pp)"] = mean_sd(
                [100 * (r["at_10x"][key]["accuracy_sequential"] - r["fp32_accuracy"]) for r in mine]
            )
        out[name] = entry
    return out


def run(quick: bool = False) -> dict:
    models = ["digits-resnet", "mnist1d-cnn"]
    seeds = [0] if quick else [0, 1, 2]
    rows = []
    for name in models:
        for seed in seeds:
            rows.append(_one(name, seed, quick))
            r = rows[-1]
            print(
                f"   {name} seed {seed}: fp32 {r['fp32_accuracy']:.4f}, "
                + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in r["at_10x"].items()),
                flush=True,
            )
    return {
        "bits": BITS,
        "calibration_split": CALIBRATION,
        "runs": rows,
        "summary": _summary(rows),
        "peer_speed": run_peer_speed(quick),
    }


# --- peer_speed: cetopt's default compress against the cheapest credible peer recipes, same bytes ---

PEER_MODELS = ("mnist1d-cnn", "digits-resnet")  # the cheaper first
PEER_ALPHA = 0.25  # the budget: 4-bit bytes + α (8-bit − 4-bit), where HAWQ-V3's {4, 8} has a choice
MCT_NOTE = (  # tried by hand in a separate venv, so the benchmark's venv keeps importing torch
    "MCT imports torchvision; the index's torchvision 0.29.1 wheel (a CUDA build), installed with "
    "--no-deps next to the CPU torch 2.13.0, fails on import with "
    "'RuntimeError: operator torchvision::nms does not exist'"
)


def _mct_status() -> dict:
    """Whether Sony MCT imports here; the exact error if not."""
    try:
        import model_compression_toolkit as mct
    except Exception as exc:  # any import failure is the answer
        import importlib.metadata

        try:
            version = importlib.metadata.version("model-compression-toolkit")
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"runs": False, "installed": version, "error": f"{type(exc).__name__}: {exc}".strip()}
    return {"runs": True, "installed": mct.__version__, "module": mct}


def _mct_run(mct, model, data, budget: float) -> dict:
    """``pytorch_post_training_quantization`` with a weights-memory target (only where MCT imports)."""
    import copy

    import torch

    batches = [xb for xb, _ in data.loader(CALIBRATION, batch_size=64)][:8]

    def representative():
        for xb in batches:
            yield [xb]

    t0 = time.perf_counter()
    target = mct.core.ResourceUtilization(weights_memory=budget)
    quantized, _ = mct.ptq.pytorch_post_training_quantization(
        copy.deepcopy(model), representative, target_resource_utilization=target
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((quantized(data.x_test).argmax(1) == data.y_test).float().mean())
    return {"seconds": seconds, "accuracy": acc}


def _hawq_end_to_end(model, data, budget: float) -> dict:
    """HAWQ-V3 as published: Hutchinson traces, the ILP over {4, 8} bits, round-to-nearest."""
    t0, c0 = time.perf_counter(), time.process_time()
    table = sensitivity(model, data.loader(CALIBRATION, batch_size=512), (4, 8), "hutchinson", progress=False)
    plan = allocate(table, budget, use_greedy=False)
    quantized = quantize(model, plan.bits)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc = accuracy(quantized, data.x_test, data.y_test)
    return {"seconds": seconds, "cpu_seconds": cpu, "accuracy": acc, "bytes": plan.bytes}


def _cetopt_default(model, data, budget: float) -> dict:
    import cetopt

    t0, c0 = time.perf_counter(), time.process_time()
    result = cetopt.compress(model, data.loader(CALIBRATION, batch_size=512), budget, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpu_seconds_per_step": result.cpu_seconds,
        "auto": result.table.meta.get("auto"),
        "accuracy": accuracy(result.model, data.x_test, data.y_test),
        "bytes": result.plan.bytes,
        "sensitivity_method": result.table.method,
    }


def peer_speed_row(name: str, seed: int = 0) -> dict:
    """One model: cetopt's default ``compress`` vs HAWQ-V3 (and MCT where it imports) at equal bytes."""
    data = load_dataset(zoo_entry(name).dataset)
    model = load_model(name, seed=seed, progress=False)
    table = sensitivity(model, data.loader(CALIBRATION, batch_size=512), BITS, "fisher", progress=False)
    four, eight = _fixed_bits_bytes(table, 4), _fixed_bits_bytes(table, 8)
    budget = four + PEER_ALPHA * (eight - four)
    row = {
        "model": name,
        "seed": seed,
        "budget_bytes": budget,
        "compression": 4.0 * float(table.params.sum()) / budget,
        "fp32_accuracy": accuracy(model, data.x_test, data.y_test),
        "cetopt_default": _cetopt_default(model, data, budget),
        "hawq-v3": _hawq_end_to_end(model, data, budget),
    }
    mct = _mct_status()
    row["mct"] = _mct_run(mct.pop("module"), model, data, budget) if mct["runs"] else {}
    row["mct"].update({k: v for k, v in mct.items() if k != "module"})
    base = row["cetopt_default"]
    for peer in ("hawq-v3", "mct"):
        if "seconds" in row[peer]:
            row[peer]["seconds_ratio_to_cetopt"] = row[peer]["seconds"] / base["seconds"]
        if "cpu_seconds" in row[peer]:
            row[peer]["cpu_seconds_ratio_to_cetopt"] = row[peer]["cpu_seconds"] / base["cpu_seconds"]
    return row


def _torchvision_check() -> dict:
    """Import torchvision (and MCT with it) in a subprocess, from the directory named by
    ``CETOPT_TORCHVISION_DIR`` (``pip install --no-deps --target DIR torchvision``), so that a
    wheel that breaks torch cannot break this process; the outcome, or why it was not tried."""
    import os
    import subprocess
    import sys

    where = os.environ.get("CETOPT_TORCHVISION_DIR")
    if not where:
        return {"tried": False, "why": "CETOPT_TORCHVISION_DIR is not set"}
    code = (
        "import importlib.metadata as m, torch\n"
        "print('torch', torch.__version__)\n"
        "print('torchvision', m.version('torchvision'))\n"
        "try:\n import torchvision; print('torchvision imports')\n"
        "except Exception as e: print('torchvision:', type(e).__name__, e)\n"
        "try:\n import model_compression_toolkit; print('mct imports')\n"
        "except Exception as e: print('model_compression_toolkit:', type(e).__name__, e)\n"
    )
    env = {**os.environ, "PYTHONPATH": where}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    libs = (
        sorted(p for p in os.listdir(os.path.join(where, "torchvision.libs")))
        if os.path.isdir(os.path.join(where, "torchvision.libs"))
        else []
    )
    return {"tried": True, "output": done.stdout.strip().splitlines(), "bundled_libraries": libs}


def run_peer_speed(quick: bool = False) -> dict:
    """The ``peer_speed`` row alone (also part of the full bit-allocation run)."""
    from benchmarks.harness import RESULTS
    from cetopt._io import atomic_write_json

    rows = []
    for name in PEER_MODELS[:1] if quick else PEER_MODELS:
        rows.append(peer_speed_row(name))
        partial = RESULTS / ("quick" if quick else ".") / "peer_speed.partial.json"
        partial.parent.mkdir(exist_ok=True)
        atomic_write_json(partial, {"partial": True, "rows": rows})
    for r in rows:
        print(
            f"   {r['model']}: cetopt {r['cetopt_default']['seconds']:.1f} s "
            f"{r['cetopt_default']['accuracy']:.4f}, hawq-v3 {r['hawq-v3']['seconds']:.1f} s "
            f"{r['hawq-v3']['accuracy']:.4f}, mct {r['mct'].get('error') or r['mct'].get('accuracy')}",
            flush=True,
        )
    return {
        "budget": f"4-bit bytes + {PEER_ALPHA} (8-bit - 4-bit bytes), each model's own",
        "calibration_split": CALIBRATION,
        "mct_note": MCT_NOTE,
        "torchvision_check": _torchvision_check(),
        "rows": rows,
    }


# --- default_path: the README's zoo figures at 10x with compress's own defaults (method="auto") ---

DEFAULT_PATH_ROWS = {  # what compress's default gives → the bit_allocation rows it replaces
    "per_layer": ("10x ilp+cet", "10x ilp+measured"),
    "per_channel": ("10x ilp+cet-channel", "10x ilp+measured-channel"),
}


def default_path_row(name: str, seed: int, kinds: tuple[str, ...] = ("per_layer", "per_channel")) -> dict:
    """One model and seed: ``cetopt.compress(model, train, "10x")`` with every default, per layer
    and per channel, as the README's figures are measured (sequential GPTQ + bias correction)."""
    import cetopt

    data = load_dataset(zoo_entry(name).dataset)
    model = load_model(name, seed=seed, progress=False)
    row = {"model": name, "seed": seed, "fp32_accuracy": accuracy(model, data.x_test, data.y_test)}
    for key, per_channel in (("per_layer", False), ("per_channel", True)):
        if key not in kinds:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        loader = data.loader(CALIBRATION, batch_size=512)
        result = cetopt.compress(model, loader, "10x", per_channel=per_channel, progress=False)
        row[key] = {
            "accuracy_sequential": accuracy(result.model, data.x_test, data.y_test),
            "method": result.table.method,
            "auto": result.table.meta.get("auto"),
            "bytes": result.plan.bytes,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
        }
    return row


def run_default_path(
    quick: bool = False, old: dict | None = None, kinds: tuple[str, ...] = ("per_layer", "per_channel")
) -> dict:
    """The zoo's 10x accuracies with compress's defaults over bit_allocation's seeds, next to the
    same figures from ``old`` (the committed ``bit_allocation.json``, measured with the plans of
    ``cet`` and of ``measured`` before ``auto`` was the default)."""
    import json

    from benchmarks.harness import RESULTS
    from cetopt._io import atomic_write_json

    if old is None:
        old = json.loads((RESULTS / "bit_allocation.json").read_text())
    seeds = (
        sorted({r["seed"] for r in old["runs"]})[:1] if quick else sorted({r["seed"] for r in old["runs"]})
    )
    rows = []
    for name in ("digits-resnet", "mnist1d-cnn"):
        for seed in seeds:
            rows.append(default_path_row(name, seed, kinds))
            print(f"   default path {name} seed {seed}: {json.dumps(rows[-1])[:600]}", flush=True)
            partial = RESULTS / ("quick" if quick else ".") / "default_path.partial.json"
            partial.parent.mkdir(exist_ok=True)
            atomic_write_json(partial, {"partial": True, "runs": rows})
    summary = {}
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        before = {r["seed"]: r for r in old["runs"] if r["model"] == name}
        entry = {"fp32": mean_sd([r["fp32_accuracy"] for r in mine])}
        for key, (cet_row, measured_row) in DEFAULT_PATH_ROWS.items():
            if key not in kinds:
                continue
            entry[key] = {
                "new_default_auto": mean_sd([r[key]["accuracy_sequential"] for r in mine]),
                f"old_{cet_row.split()[1]}": mean_sd(
                    [before[r["seed"]]["at_10x"][cet_row.split()[1]]["accuracy_sequential"] for r in mine]
                ),
                f"old_{measured_row.split()[1]}": mean_sd(
                    [
                        before[r["seed"]]["at_10x"][measured_row.split()[1]]["accuracy_sequential"]
                        for r in mine
                    ]
                ),
                "methods_chosen": sorted({r[key]["method"] for r in mine}),
            }
        summary[name] = entry
    return {
        "budget": "10x",
        "calibration_split": CALIBRATION,
        "seeds": seeds,
        "old_source": "benchmarks/results/bit_allocation.json (at_10x, accuracy_sequential, same seeds)",
        "runs": rows,
        "summary": summary,
    }
