"""Bit-allocation speed: ``cetopt.allocate`` end to end vs the formulation peers write.

The peer baseline is the one Sony MCT and HAWQ-V3 use: PuLP with one binary ``LpVariable`` per
(layer, bits), a one-hot constraint per layer, the budget rows, solved by PuLP's CBC. Both solve the
same synthetic sensitivity table (10^4 layers × 6 bit widths by default), first with the size budget
alone, then with size + BOPs + latency rows. Times are end to end (model building included) and
reported as ratios in the same run. The objective of both answers is compared, and cetopt's
certified gap (plan.bound is a proven lower bound) is reported.
"""

from __future__ import annotations

import warnings

import numpy as np

from benchmarks.harness import timed, with_deadline
from cetopt.allocation import allocate, option_bytes, parse_budget
from cetopt.analysis import SensitivityTable

BITS = (2, 3, 4, 5, 6, 8)
MIP_GAP = 1e-4


def synthetic_table(layers: int, seed: int = 0) -> tuple[SensitivityTable, np.ndarray]:
    """Sensitivities that fall ~4x per bit with noise; a latency table that grows with bits."""
    rng = np.random.default_rng(seed)
    params = rng.integers(1_000, 400_000, layers)
    values = (
        rng.lognormal(-6, 1.5, layers)[:, None]
        * 4.0 ** -np.array(BITS)[None, :]
        * rng.uniform(0.6, 1.4, (layers, len(BITS)))
    )
    table = SensitivityTable(
        layers=[f"layer{i}" for i in range(layers)],
        bits=BITS,
        values=values,
        params=params,
        channels=rng.integers(16, 512, layers),
        macs=params * rng.integers(1, 200, layers),
        method="synthetic",
    )
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


def one_case(table, latency, extra_rows: bool, time_limit: float) -> dict:
    budget = parse_budget("8x", table)
    bits = np.array(BITS, dtype=float)
    bops = table.macs[:, None] * bits[None, :] * 32
    bops_limit = 0.55 * float(bops[:, -1].sum())
    lat_limit = 0.6 * float(latency[:, -1].sum())
    kwargs = dict(bops_budget=bops_limit, latency=latency, latency_budget=lat_limit) if extra_rows else {}
    rows = [(bops, bops_limit), (latency, lat_limit)] if extra_rows else []
    plan, ours_s = timed(lambda: allocate(table, budget, mip_gap=MIP_GAP, time_limit=time_limit, **kwargs))
    peer, peer_s, finished = with_deadline(
        lambda: pulp_allocate(table, budget, rows, time_limit), 2 * time_limit + 60
    )
    out = {
        "rows": ["size", "bops", "latency"] if extra_rows else ["size"],
        "cetopt": {
            "seconds": ours_s,
            "status": plan.status,
            "solver": plan.solver,
            "objective": plan.predicted_loss,
            "bound": plan.bound,
            "certified_gap": plan.gap,
        },
        "pulp_cbc": {
            "seconds": peer_s,
            "finished": finished,
            **(peer or {"status": "killed at the deadline"}),
        },
        "speedup": peer_s / ours_s,
    }
    if peer and peer.get("objective") is not None:
        out["objective_rel_diff"] = (plan.predicted_loss - peer["objective"]) / abs(peer["objective"])
    return out


def run(quick: bool = False) -> dict:
    layers = 1_000 if quick else 10_000
    table, latency = synthetic_table(layers)
    time_limit = 60.0 if quick else 300.0
    cases = {
        "size_only": one_case(table, latency, False, time_limit),
        "size_bops_latency": one_case(table, latency, True, time_limit),
    }
    return {
        "layers": layers,
        "bits": list(BITS),
        "mip_gap": MIP_GAP,
        "cases": cases,
        "targets": {"size_only_speedup": 20.0, "size_bops_latency_speedup": 1.0, "certified_gap": MIP_GAP},
    }
