"""LEO (lossless compression by stable ReLUs): a small-scale Table 1, speed, and which stage decides.

* **Table 1.** MLPs 2×25, 2×50, 2×100 on digits and MNIST-1D, L1 ∈ {0, 2e-4, 1e-3}, a few seeds;
  domain: the training data's per-feature box. Accuracy, units removed per layer, % parameters
  removed, time, and the units each stage decided.
* **Speed.** The same networks solved the naive way (one full MILP per unit and direction, no
  screening, no early stop, no witnesses; ``M`` from the baseline's own MILP bounds), side by side
  with the screened run. On 2×50 and 2×100 the baseline's last layer is solved on a random subset
  of units and its time extrapolated per MILP (the JSON says which); decisions are compared on the
  units the baseline solved.
* **Hard cases.** Deeper MLPs (4 hidden layers, strong L1), conv nets on digits (a unit is a
  channel) and box domains given without data, where the LP and MILP stages have to work; MILP
  count and time per MILP are reported.

* **Large inputs** (``large_inputs``): the 784-input MLP (digits upsampled to 28×28, 784-100-100-10)
  and strided conv nets on 28×28 and 32×32 upsampled digits (2 conv + 2 linear), L1 ∈ {0, 2e-4,
  1e-3}, data box; units/channels and parameters removed, accuracy, time, stages. Exactness also
  by a projected-gradient search for the largest output difference inside the domain (float64).
* **Ray** (``ray``): the 28×28 conv net (L1 = 0) on a local 2-worker Ray cluster against the local
  thread pool: identical decisions, both times.

Every compressed network is checked against the original on the data and on 10⁴ random points
of its domain (max |difference| recorded; required ≤ 1e-5).

``python -m benchmarks.bench_leo --large`` runs only the last two sections and merges them into
the existing ``results/leo.json``, leaving the other sections as they were measured.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

import cetopt
from cetopt.leo import Domain, load_leo_model
from cetopt.leo.training import leo_dataset
from cetopt.zoo import accuracy, load_dataset

WIDTHS = (25, 50, 100)
L1S = (0.0, 2e-4, 1e-3)
DATASETS = ("digits", "mnist1d")
TIME_LIMIT = 10.0  # seconds per MILP (screened run)
BASELINE_TIME_LIMIT = 60.0
BASELINE_SUBSET = {25: None, 50: 6, 100: 4}  # units of the last layer the baseline solves (None: all)
WORKERS = 1


def _max_diff(a, b, xs) -> float:
    with torch.no_grad():
        return max((a(x) - b(x)).abs().max().item() for x in xs)


def _exactness(model, compressed, domain: Domain, x: torch.Tensor) -> dict:
    """Max |output difference| on the data and on 10⁴ random domain points, in float32 and float64.

    The float64 figure (both models cast to double) is the criterion: it measures whether the two
    networks compute the same function. In float32 the removal changes summation order and the
    merged/folded weights are rounded to float32, so differences of a few ulps of the outputs
    (which reach ~60 on MNIST-1D) appear; they are reported as they are.
    """
    pts = torch.tensor(domain.sample(10_000, seed=123), dtype=torch.float32).reshape(-1, *x.shape[1:])
    m64, c64 = copy.deepcopy(model).double(), copy.deepcopy(compressed).double()
    with torch.no_grad():
        scale = max(model(x).abs().max().item(), model(pts).abs().max().item())
    out = {
        "max_diff_data": _max_diff(model, compressed, [x]),
        "max_diff_domain": _max_diff(model, compressed, [pts]),
        "max_diff_data_f64": _max_diff(m64, c64, [x.double()]),
        "max_diff_domain_f64": _max_diff(m64, c64, [pts.double()]),
        "max_abs_output": scale,
    }
    out["exact"] = max(out["max_diff_data_f64"], out["max_diff_domain_f64"]) <= 1e-5
    out["exact_f32_abs_1e-5"] = max(out["max_diff_data"], out["max_diff_domain"]) <= 1e-5
    return out


def _removed_per_layer(report, compressed) -> list[int]:
    log = compressed.leo_removal["layers"]
    out = []
    for r in report.layers:
        entry = log.get(r.name, {})
        n = entry.get("removed", 0) + entry.get("folded", 0)
        if entry.get("merged_into"):
            n = r.units
        out.append(int(n))
    return out


def _analyse(model, domain: Domain, data, x_all: torch.Tensor, **kwargs) -> dict:
    t0 = time.perf_counter()
    report = cetopt.find_stable_units(
        model, domain, data=data, workers=WORKERS, time_limit=TIME_LIMIT, **kwargs
    )
    t_detect = time.perf_counter() - t0
    t0 = time.perf_counter()
    compressed = cetopt.remove_stable_units(model, report)
    t_remove = time.perf_counter() - t0
    milp_layers = [r for r in report.layers if r.milps]
    return {
        "report": report,
        "compressed": compressed,
        "row": {
            "units": [r.units for r in report.layers],
            "inactive": [len(r.inactive) for r in report.layers],
            "active": [len(r.active) for r in report.layers],
            "removed_per_layer": _removed_per_layer(report, compressed),
            "params_removed_pct": 100.0 * compressed.leo_removal["params_removed_fraction"],
            "decided_by": report.stage_counts(),
            "milps": report.milps,
            "milp_time": report.milp_time,
            "time_per_milp": report.milp_time / report.milps if report.milps else None,
            "lps": sum(r.lps for r in report.layers),
            "milp_layers": [r.name for r in milp_layers],
            "detect_seconds": t_detect,
            "remove_seconds": t_remove,
            **_exactness(model, compressed, domain, x_all),
        },
    }


def _table_row(dataset: str, width: int, l1: float, seed: int) -> dict:
    data = load_dataset(dataset)
    model = load_leo_model(f"{dataset}-2x{width}", l1=l1, seed=seed)
    domain = Domain.from_data(data.x_train)
    x_all = torch.cat([data.x_train, data.x_test])
    out = _analyse(model, domain, data.x_train, x_all)
    row = {
        "dataset": dataset,
        "width": width,
        "l1": l1,
        "seed": seed,
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "compressed_test_accuracy": accuracy(out["compressed"], data.x_test, data.y_test),
        **out["row"],
    }
    return row, out["report"], model, domain, data


def _baseline(model, domain, report, width: int, seed: int) -> dict:
    """One full MILP per unit and direction; the last layer on a subset when it is large."""
    subset = BASELINE_SUBSET[width]
    n_layers = len(report.layers)
    milp_units = None
    if subset is not None:
        rng = np.random.default_rng(seed)
        milp_units = {n_layers: np.sort(rng.choice(report.layers[-1].units, subset, replace=False))}
    t0 = time.perf_counter()
    base = cetopt.find_stable_units(
        model,
        domain,
        stages=("milp",),
        early_stop=False,
        propagate=False,
        workers=WORKERS,
        time_limit=BASELINE_TIME_LIMIT,
        milp_units=milp_units,
    )
    seconds = time.perf_counter() - t0
    last = base.layers[-1]
    solved = np.arange(last.units) if milp_units is None else milp_units[n_layers]
    per_milp_last = last.milp_time / max(last.milps, 1)
    full_last_milps = 2 * last.units
    estimated = seconds - last.milp_time + per_milp_last * full_last_milps
    same = all(np.array_equal(a.state, b.state) for a, b in zip(base.layers[:-1], report.layers[:-1]))
    same = same and np.array_equal(last.state[solved], report.layers[-1].state[solved])
    timeouts = sum(r.stage_counts()["timeout"] for r in base.layers)
    return {
        "baseline_seconds_measured": seconds,
        "baseline_milps_measured": base.milps,
        "baseline_last_layer_units_solved": len(solved),
        "baseline_last_layer_seconds_per_milp": per_milp_last,
        "baseline_seconds_estimated_full": estimated,
        "baseline_extrapolated": milp_units is not None,
        "baseline_timeouts": timeouts,
        "identical_decisions": bool(same),
    }


def _stat(values) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def _summary(rows: list[dict]) -> dict:
    out = {}
    for ds in DATASETS:
        for w in WIDTHS:
            for l1 in L1S:
                mine = [r for r in rows if (r["dataset"], r["width"], r["l1"]) == (ds, w, l1)]
                if not mine:
                    continue
                out[f"{ds} 2x{w} l1={l1:g}"] = {
                    "seeds": len(mine),
                    "test_accuracy": _stat([r["test_accuracy"] for r in mine]),
                    "removed_layer1": _stat([r["removed_per_layer"][0] for r in mine]),
                    "removed_layer2": _stat([r["removed_per_layer"][1] for r in mine]),
                    "units_removed_pct": _stat([100 * sum(r["removed_per_layer"]) / (2 * w) for r in mine]),
                    "params_removed_pct": _stat([r["params_removed_pct"] for r in mine]),
                    "seconds": _stat([r["detect_seconds"] + r["remove_seconds"] for r in mine]),
                    "milps": _stat([r["milps"] for r in mine]),
                    "decided_by": {
                        k: _stat([r["decided_by"][k] for r in mine]) for k in mine[0]["decided_by"]
                    },
                    "all_exact": all(r["exact"] for r in mine),
                }
    return out


def _hard_cases(quick: bool) -> list[dict]:
    digits = load_dataset("digits")
    mnist = load_dataset("mnist1d")
    seeds = [0] if quick else [0, 1]
    cases = []
    for seed in seeds:
        cases += [
            ("digits-4x50", 2e-4, "data", digits, seed, None),
            ("digits-4x50", 2e-4, "box", digits, seed, None),
            ("digits-4x50", 5e-4, "box", digits, seed, None),
            ("mnist1d-4x50", 2e-4, "data", mnist, seed, None),
            ("digits-conv", 1e-3, "data", digits, seed, None),
            ("digits-conv", 1e-3, "box", digits, seed, None),
            ("digits-2x100", 1e-3, "box", digits, seed, None),
        ]
    # an under-trained conv net (4 epochs), whose channels the data does not settle, and a deep MLP
    # that strong L1 collapsed (every unit stable: the hidden layers merge away into one affine map)
    cases += [("digits-conv", 1e-3, "data", digits, 0, 4), ("digits-4x50", 1e-3, "data", digits, 0, None)]
    rows = []
    for name, l1, kind, data, seed, epochs in cases:
        model = load_leo_model(name, l1=l1, seed=seed, epochs=epochs)
        if kind == "data":
            domain, witness = Domain.from_data(data.x_train), data.x_train
        else:  # the pixel box [0, 1]^64, no data: the solver stages must do the work
            domain, witness = Domain.box(torch.zeros(data.input_shape), 1.0), None
        out = _analyse(model, domain, witness, torch.cat([data.x_train, data.x_test]))
        row = {
            "constant_network": out["report"].constant,
            "network": name,
            "epochs": epochs or "default",
            "l1": l1,
            "seed": seed,
            "domain": kind if kind == "box" else "data box",
            "test_accuracy": accuracy(model, data.x_test, data.y_test),
            **out["row"],
        }
        rows.append(row)
        print(
            f"   hard {name} l1={l1:g} {kind} seed {seed}: decided_by {row['decided_by']}, "
            f"{row['milps']} MILPs ({row['milp_time']:.1f} s), removed {row['removed_per_layer']}, "
            f"exact {row['exact']}",
            flush=True,
        )
    return rows


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    seeds = [0] if quick else [0, 1, 2]
    widths = (25, 50) if quick else WIDTHS
    rows, speed = [], []
    for ds in DATASETS:
        for w in widths:
            for l1 in L1S:
                for seed in seeds:
                    row, report, model, domain, _ = _table_row(ds, w, l1, seed)
                    rows.append(row)
                    print(
                        f"   {ds} 2x{w} l1={l1:g} seed {seed}: acc {row['test_accuracy']:.4f}, removed "
                        f"{row['removed_per_layer']}, params -{row['params_removed_pct']:.1f}%, "
                        f"{row['detect_seconds']:.2f} s, {row['milps']} MILPs, exact {row['exact']}",
                        flush=True,
                    )
                    if seed == 0 and l1 > 0:
                        entry = {"dataset": ds, "width": w, "l1": l1, "seed": seed}
                        entry.update(_baseline(model, domain, report, w, seed))
                        entry["screened_seconds"] = row["detect_seconds"]
                        entry["speedup"] = entry["baseline_seconds_estimated_full"] / row["detect_seconds"]
                        speed.append(entry)
                        print(
                            f"      baseline {entry['baseline_seconds_estimated_full']:.1f} s (est.), "
                            f"speedup {entry['speedup']:.0f}x, identical {entry['identical_decisions']}",
                            flush=True,
                        )
    hard = _hard_cases(quick)
    large = run_large(quick)
    big = [s["speedup"] for s in speed if s["width"] == 100]
    return {
        "settings": {
            "domain": "per-feature min/max box of the training split (Table 1)",
            "milp_time_limit_s": TIME_LIMIT,
            "baseline_time_limit_s": BASELINE_TIME_LIMIT,
            "baseline_last_layer_subset": {str(k): v for k, v in BASELINE_SUBSET.items()},
            "workers": WORKERS,
            "exactness_tolerance": "1e-5 on max |output difference|, both models evaluated in float64",
            "random_points": 10_000,
        },
        "table1": rows,
        "table1_summary": _summary(rows),
        "speed": speed,
        "speed_summary": {
            "speedup_2x100": _stat(big) if big else None,
            "min_speedup_2x100": min(big) if big else None,
            "all_identical": all(s["identical_decisions"] for s in speed),
            "target_100x_met": bool(big) and min(big) >= 100,
        },
        "hard_cases": hard,
        **large,
        "all_exact": all(r["exact"] for r in rows + hard),
        "all_exact_f32_abs_1e-5": all(r["exact_f32_abs_1e-5"] for r in rows + hard),
        "worst_f32_diff": max(max(r["max_diff_data"], r["max_diff_domain"]) for r in rows + hard),
        "worst_f64_diff": max(max(r["max_diff_data_f64"], r["max_diff_domain_f64"]) for r in rows + hard),
    }


LARGE = ("digits28-2x100", "digits28-conv", "digits32-conv")
LARGE_TIME_LIMIT = 5.0  # seconds per MILP
LARGE_WORKERS = 2


def _pgd_difference(model, compressed, domain: Domain, x: torch.Tensor, steps: int = 60) -> float:
    """Largest |output difference| found by sign-gradient ascent inside the domain box (float64)."""
    m64, c64 = copy.deepcopy(model).double(), copy.deepcopy(compressed).double()
    lo = torch.tensor(domain.lo[0]).reshape(x.shape[1:])
    hi = torch.tensor(domain.hi[0]).reshape(x.shape[1:])
    rng = torch.Generator().manual_seed(7)
    starts = torch.cat(
        [x[:32].double(), lo + torch.rand(32, *x.shape[1:], generator=rng).double() * (hi - lo)]
    )
    z = starts.clone().requires_grad_(True)
    best = 0.0
    for step in range(steps):
        diff = (m64(z) - c64(z)).abs().amax(dim=1)
        best = max(best, diff.max().item())
        (grad,) = torch.autograd.grad(diff.sum(), z)
        with torch.no_grad():
            size = 0.1 * (1 - step / steps) + 0.005
            z = torch.minimum(torch.maximum(z + size * (hi - lo) * grad.sign(), lo), hi)
        z.requires_grad_(True)
    with torch.no_grad():
        return max(best, (m64(z) - c64(z)).abs().max().item())


def _large_row(name: str, l1: float, executor=None) -> tuple[dict, object]:
    data = leo_dataset(name.split("-")[0])
    model = load_leo_model(name, l1=l1)
    domain = Domain.from_data(data.x_train)
    x_all = torch.cat([data.x_train, data.x_test])
    t0 = time.perf_counter()
    report = cetopt.find_stable_units(
        model,
        domain,
        data=data.x_train,
        workers=LARGE_WORKERS,
        time_limit=LARGE_TIME_LIMIT,
        executor=executor,
    )
    t_detect = time.perf_counter() - t0
    t0 = time.perf_counter()
    compressed = cetopt.remove_stable_units(model, report)
    t_remove = time.perf_counter() - t0
    removed = _removed_per_layer(report, compressed)
    units = [r.units for r in report.layers]
    row = {
        "network": name,
        "l1": l1,
        "kind": [r.kind for r in report.layers],
        "units": units,
        "inactive": [len(r.inactive) for r in report.layers],
        "active": [len(r.active) for r in report.layers],
        "removed_per_layer": removed,
        "units_removed_pct": 100.0 * sum(removed) / sum(units),
        "params_before": compressed.leo_removal["params_before"],
        "params_after": compressed.leo_removal["params_after"],
        "params_removed_pct": 100.0 * compressed.leo_removal["params_removed_fraction"],
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "compressed_test_accuracy": accuracy(compressed, data.x_test, data.y_test),
        "decided_by": report.stage_counts(),
        "decided_by_layer": {r.name: r.stage_counts() for r in report.layers},
        "lps": sum(r.lps for r in report.layers),
        "milps": report.milps,
        "milp_time": report.milp_time,
        "detect_seconds": t_detect,
        "remove_seconds": t_remove,
        "seconds": t_detect + t_remove,
        "failed_tasks": len(report.extra.get("failed_tasks", [])),
        "skipped": {
            k: v.get("skipped") for k, v in compressed.leo_removal["layers"].items() if v.get("skipped")
        },
        **_exactness(model, compressed, domain, x_all),
        "max_diff_pgd_f64": _pgd_difference(model, compressed, domain, x_all),
    }
    row["exact_1e-6"] = (
        max(row["max_diff_data_f64"], row["max_diff_domain_f64"], row["max_diff_pgd_f64"]) <= 1e-6
    )
    return row, report


def _ray_section(name: str = "digits28-conv", l1: float = 0.0) -> dict:
    from cetopt.solving.executors import RayExecutor

    try:
        import ray
    except ImportError:
        return {"ran": False, "why": "ray is not installed"}
    local, local_report = _large_row(name, l1)
    t0 = time.perf_counter()
    executor = RayExecutor(num_cpus=2)
    start_seconds = time.perf_counter() - t0
    remote, remote_report = _large_row(name, l1, executor=executor)
    same = all(
        np.array_equal(a.state, b.state) and a.stage == b.stage
        for a, b in zip(local_report.layers, remote_report.layers)
    )
    ray.shutdown()
    return {
        "ran": True,
        "network": name,
        "l1": l1,
        "cluster": "local, 2 CPUs (ray.init(num_cpus=2))",
        "identical_decisions": bool(same),
        "local_seconds": local["detect_seconds"],
        "ray_seconds": remote["detect_seconds"],
        "ray_cluster_start_seconds": start_seconds,
        "ray_over_local": remote["detect_seconds"] / local["detect_seconds"],
        "decided_by_local": local["decided_by"],
        "decided_by_ray": remote["decided_by"],
    }


def run_large(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    rows = []
    for name in LARGE[:2] if quick else LARGE:
        for l1 in L1S:
            row, _ = _large_row(name, l1)
            rows.append(row)
            print(
                f"   {name} l1={l1:g}: acc {row['test_accuracy']:.4f}, removed {row['removed_per_layer']} "
                f"({row['units_removed_pct']:.1f}% units, -{row['params_removed_pct']:.1f}% params), "
                f"{row['seconds']:.1f} s, {row['decided_by']}, pgd {row['max_diff_pgd_f64']:.2g}",
                flush=True,
            )
    targets = {}
    for name in LARGE:
        mine = {r["l1"]: r for r in rows if r["network"] == name}
        if not mine:
            continue
        base, strong = mine.get(0.0), mine.get(1e-3)
        targets[name] = {
            "max_seconds": max(r["seconds"] for r in mine.values()),
            "within_60s": all(r["seconds"] <= 60 for r in mine.values()) if "conv" in name else None,
            "l1_1e-3_units_removed_pct": strong["units_removed_pct"] if strong else None,
            "l1_1e-3_accuracy_drop_pp": 100 * (base["test_accuracy"] - strong["test_accuracy"])
            if base and strong
            else None,
            "all_exact_1e-6": all(r["exact_1e-6"] for r in mine.values()),
        }
    return {
        "large_inputs": {
            "settings": {
                "domain": "per-feature min/max box of the training split",
                "milp_time_limit_s": LARGE_TIME_LIMIT,
                "workers": LARGE_WORKERS,
                "exactness": "max |output difference| in float64 over the data, 1e4 domain samples and a "
                "projected-gradient search (64 starts, 60 steps); required ≤ 1e-6",
            },
            "rows": rows,
            "targets": targets,
        },
        "ray": _ray_section(),
    }


if __name__ == "__main__":
    import json
    import sys

    from benchmarks.harness import RESULTS, write_result

    if "--large" in sys.argv:
        path = RESULTS / "leo.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        keep = {k: v for k, v in old.items() if k not in ("benchmark", "quick", "machine")}
        new = run_large(quick="--quick" in sys.argv)
        old_machine = old.get("machine")
        result = {**keep, **new, "machine_of_earlier_sections": old_machine}
        print(f"wrote {write_result('leo', result, quick='--quick' in sys.argv)}")  # quick: untracked
