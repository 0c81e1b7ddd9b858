"""Bit-allocation speed at LLM scale: ``cetopt.allocate`` end to end vs the formulations peers write.

Synthetic sensitivity tables of 10^4, 10^5 and 10^6 rows × 6 bit widths, first with the byte budget
alone, then with bytes + BOPs + latency. Each case runs in a fresh subprocess so its peak RSS is its
own (``peak_rss_mb``, read right after ``allocate``; ``rss_before_mb`` is the process after imports
and building the table). ``seconds`` is ``allocate`` from table in to plan out (wall clock;
``cpu_seconds`` alongside, since the machine is shared: on a loaded machine wall time is several
times the CPU time, and ``load_average`` states the 1-minute load when the case started and ended).
``table_seconds`` is building the synthetic arrays and the ``SensitivityTable``,
``table_validation_seconds`` the ``SensitivityTable(...)`` call alone (its checks);
``outputs`` times ``plan.summary()`` and ``plan.to_dict()`` afterwards, with the peak RSS after them.

Baselines, in the same run and on the same problem: the formulation Sony MCT and HAWQ-V3 use (PuLP,
one binary ``LpVariable`` per (layer, bits), a one-hot constraint per layer, the budget rows, PuLP's
CBC), and the plain MILP (the same arrays cetopt builds) handed whole to HiGHS. Both get a time limit
and a hard deadline; where they do not finish the result says so, with the limit. cetopt's
certified gap (``plan.bound`` is a proven lower bound) and the objectives' relative difference are
reported.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings

import numpy as np

from benchmarks.harness import timed, with_deadline
from cetopt.allocation import allocate, option_bytes, parse_budget
from cetopt.analysis import SensitivityTable

BITS = (2, 3, 4, 5, 6, 8)
MIP_GAP = 1e-4


_VALIDATION: dict[str, float] = {}


def synthetic_table(layers: int, seed: int = 0) -> tuple[SensitivityTable, np.ndarray]:
    """Sensitivities that fall ~4x per bit with noise; a latency table that grows with bits.

    The wall and CPU seconds of the ``SensitivityTable(...)`` call alone go to ``_VALIDATION``.
    """
    rng = np.random.default_rng(seed)
    params = rng.integers(1_000, 400_000, layers)
    values = (
        rng.lognormal(-6, 1.5, layers)[:, None]
        * 4.0 ** -np.array(BITS)[None, :]
        * rng.uniform(0.6, 1.4, (layers, len(BITS)))
    )
    fields = dict(
        layers=[f"layer{i}" for i in range(layers)],
        bits=BITS,
        values=values,
        params=params,
        channels=rng.integers(16, 512, layers),
        macs=params * rng.integers(1, 200, layers),
        method="synthetic",
    )
    cpu0, t0 = time.process_time(), time.perf_counter()
    table = SensitivityTable(**fields)
    _VALIDATION.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0)
    latency = rng.uniform(0.5, 1.5, (layers, 1)) * (1 + np.array(BITS)[None, :] / 4)
    return table, latency


def pulp_allocate(table, budget_bytes, rows, time_limit):
    """The peers' formulation: one LpVariable per option, solved with PuLP's CBC."""
    import pulp

    cost, size = table.values, option_bytes(table)
    n_layers, n_bits = cost.shape
    prob = pulp.LpProblem("bits", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{i}_{k}", cat="Binary") for k in range(n_bits)] for i in range(n_layers)]
    prob += pulp.lpSum(cost[i, k] * x[i][k] for i in range(n_layers) for k in range(n_bits))
    for i in range(n_layers):
        prob += pulp.lpSum(x[i]) == 1
    prob += pulp.lpSum(size[i, k] * x[i][k] for i in range(n_layers) for k in range(n_bits)) <= budget_bytes
    for per_option, limit in rows:
        prob += (
            pulp.lpSum(per_option[i, k] * x[i][k] for i in range(n_layers) for k in range(n_bits)) <= limit
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=MIP_GAP))
    return {"status": pulp.LpStatus[prob.status], "objective": pulp.value(prob.objective)}


def highs_allocate(table, budget_bytes, rows, time_limit):
    """The whole MILP, one binary per (layer, bits), to HiGHS as it is (no greedy, no core)."""
    import cetopt
    from cetopt.allocation.search import _milp

    resources = [option_bytes(table), *[r for r, _ in rows]]
    limits = np.array([budget_bytes, *[b for _, b in rows]])
    problem = _milp(table.values, resources, limits, np.ones(table.values.shape, dtype=bool))
    solution = cetopt.solve(problem, "highs", time_limit, MIP_GAP)
    return {"status": solution.status.value, "objective": solution.objective, "bound": solution.bound}


def _rows(table, latency):
    bits = np.array(BITS, dtype=float)
    bops = table.macs[:, None] * bits[None, :] * 32
    return [(bops, 0.55 * float(bops[:, -1].sum())), (latency, 0.6 * float(latency[:, -1].sum()))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS")) / 1024


def _load() -> float:
    return os.getloadavg()[0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _baseline(fn, time_limit: float, deadline: float) -> dict:
    cpu0 = _children_cpu()
    value, seconds, finished = with_deadline(fn, deadline)
    out = {"seconds": seconds, "cpu_seconds": _children_cpu() - cpu0, "finished": finished}
    out.update(time_limit=time_limit, deadline=deadline)
    return {**out, **(value or {"status": f"killed at the {deadline:.0f} s deadline"})}


def one_case(layers: int, extra_rows: bool, time_limit: float, baselines: list[str]) -> dict:
    """One (size, budget rows) case, in this process; its peak RSS is read before the baselines run."""
    load_start = _load()
    cpu0 = time.process_time()
    (table, latency), table_s = timed(lambda: synthetic_table(layers))
    table_cpu = time.process_time() - cpu0
    budget = parse_budget("8x", table)
    rows = _rows(table, latency) if extra_rows else []
    kwargs = {}
    if extra_rows:
        kwargs = dict(bops_budget=rows[0][1], latency=latency, latency_budget=rows[1][1])
    rss_before = _rss_mb()
    cpu0 = time.process_time()
    plan, ours_s = timed(lambda: allocate(table, budget, mip_gap=MIP_GAP, time_limit=time_limit, **kwargs))
    cpu = time.process_time() - cpu0
    peak = _peak_rss_mb()
    cpu0, t0 = time.process_time(), time.perf_counter()
    plan.summary()
    plan.to_dict()
    outputs = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}
    outputs["peak_rss_mb"] = _peak_rss_mb()
    out = {
        "layers": layers,
        "rows": ["bytes", "bops", "latency"] if extra_rows else ["bytes"],
        "table_seconds": table_s,
        "table_cpu_seconds": table_cpu,
        "table_validation_seconds": _VALIDATION["seconds"],
        "table_validation_cpu_seconds": _VALIDATION["cpu_seconds"],
        "load_average": {"start": load_start, "after_allocate": _load()},
        "cetopt": {
            "seconds": ours_s,
            "cpu_seconds": cpu,
            "peak_rss_mb": peak,
            "rss_before_mb": rss_before,
            "status": plan.status,
            "solver": plan.solver,
            "objective": plan.predicted_loss,
            "bound": plan.bound,
            "certified_gap": plan.gap,
        },
        "outputs": outputs,
    }
    deadline = time_limit + 60
    runners = {
        "pulp_cbc": lambda: pulp_allocate(table, budget, rows, time_limit),
        "highs_milp": lambda: highs_allocate(table, budget, rows, time_limit),
    }
    for name, fn in runners.items():
        if name not in baselines:
            out[name] = {"status": "not run", "reason": _SKIP_REASON.get(name, "")}
            continue
        out[name] = _baseline(fn, time_limit, deadline)
        objective = out[name].get("objective")
        if out[name]["finished"]:
            out[name]["speedup"] = out[name]["seconds"] / ours_s
        if objective is not None:
            out[name]["objective_rel_diff"] = (plan.predicted_loss - objective) / abs(objective)
    out["load_average"]["end"] = _load()
    return out


_SKIP_REASON = {
    "pulp_cbc": "10^6 rows are 6·10^6 PuLP LpVariable objects: several GB of Python objects on a "
    "23 GB machine shared with other jobs, so not attempted",
}


def _case_in_subprocess(layers, extra_rows, time_limit, baselines) -> dict:
    args = [sys.executable, "-m", "benchmarks.bench_allocation_speed", str(layers), str(int(extra_rows))]
    args += [str(time_limit), ",".join(baselines)]
    run = subprocess.run(args, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return {"layers": layers, "error": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    sizes = [1_000, 10_000] if quick else [10_000, 100_000, 1_000_000]
    time_limit = 20.0 if quick else 60.0
    cases = {}
    for layers in sizes:
        baselines = ["pulp_cbc", "highs_milp"] if layers < 1_000_000 else ["highs_milp"]
        for extra in (False, True):
            key = f"{layers}_{'bytes_bops_latency' if extra else 'bytes'}"
            cases[key] = _case_in_subprocess(layers, extra, time_limit, baselines)
            print(key, json.dumps(cases[key]["cetopt"] if "cetopt" in cases[key] else cases[key]), flush=True)
    return {
        "bits": list(BITS),
        "mip_gap": MIP_GAP,
        "budget": "8x; BOPs at 0.55 and latency at 0.6 of their all-8-bit totals",
        "baseline_time_limit_s": time_limit,
        "cases": cases,
        "targets": {
            "1000000_bytes": {"seconds": 3.0, "peak_rss_mb": 1024, "certified_gap": MIP_GAP},
            "1000000_bytes_bops_latency": {"seconds": 30.0, "certified_gap": MIP_GAP},
        },
    }


if __name__ == "__main__":
    n, extra, limit, which = sys.argv[1:5]
    warnings.simplefilter("ignore")
    result = one_case(int(n), extra == "1", float(limit), which.split(","))
    print(json.dumps(result))
