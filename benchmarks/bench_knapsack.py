"""Multiple-choice knapsack: L groups × 8 options, one budget row — the shape of a bit-allocation ILP.

For each L, in one run and on the same instance:

* build time of a ``cetopt.MILP`` (arrays) vs the formulation peers write (PuLP, one ``LpVariable``
  per option, as Sony MCT and HAWQ-V3 do);
* solve time of every cetopt backend (HiGHS cold, HiGHS warm-started from the convex-hull greedy,
  CBC, cvxpy) vs the PuLP-modelled CBC solve;
* where HiGHS spends its time (presolve / solve / sub-MIP heuristics, LP iterations by source), and
  a HiGHS run with sub-MIP heuristics switched off for comparison.

Speeds are reported as ratios against the PuLP baseline measured in the same run.
"""

from __future__ import annotations

import warnings

import numpy as np

import cetopt
from benchmarks.harness import best_of, timed, with_deadline
from cetopt.allocation.mck import mck_greedy
from cetopt.testing.solver_contract import multiple_choice_knapsack

BITS = np.arange(1, 9)
MIP_GAP = 1e-4


FAMILIES = ("allocation", "uniform")


def instance(groups: int, family: str = "allocation", seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """A knapsack instance of one of two families.

    ``allocation``: loss falls ~4× per extra bit (with noise), size grows linearly in bits, budget a
    little above uniform 3 bits. ``uniform``: sorted uniform weights and costs, budget at the mean
    weight — flatter hulls with many near-ties, the case where HiGHS leans on sub-MIP heuristics.
    """
    rng = np.random.default_rng(seed)
    if family == "uniform":
        weight = np.sort(rng.uniform(1, 10, (groups, len(BITS))), axis=1)
        cost = np.sort(rng.uniform(0, 1, (groups, len(BITS))), axis=1)[:, ::-1] * rng.uniform(
            0.5, 2, (groups, 1)
        )
        return cost.copy(), weight, float(weight.mean(axis=1).sum())
    params = rng.lognormal(9, 1.2, groups).round() + 16
    scale = rng.lognormal(0, 1.5, groups)
    noise = rng.uniform(0.7, 1.3, (groups, len(BITS)))
    cost = np.sort(scale[:, None] * 4.0 ** (-BITS[None, :].astype(float)) * noise, axis=1)[:, ::-1].copy()
    weight = params[:, None] * BITS[None, :] / 8.0 + 4.0  # bytes, plus one fp32 scale
    budget = float(weight[:, 2].sum() * 1.05)  # a little above uniform 3 bits
    return cost, weight, budget


def build_pulp(cost: np.ndarray, weight: np.ndarray, budget: float):
    import pulp

    groups, options = cost.shape
    prob = pulp.LpProblem("mck", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{g}_{k}", cat="Binary") for k in range(options)] for g in range(groups)]
    prob += pulp.lpSum(cost[g, k] * x[g][k] for g in range(groups) for k in range(options))
    for g in range(groups):
        prob += pulp.lpSum(x[g]) == 1
    prob += pulp.lpSum(weight[g, k] * x[g][k] for g in range(groups) for k in range(options)) <= budget
    return prob


def solve_pulp(prob, time_limit: float) -> dict:
    import pulp

    def go():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=MIP_GAP)
        prob.solve(solver)
        return {
            "pulp_status": pulp.LpStatus[prob.status],
            "pulp_sol_status": pulp.LpSolution[prob.sol_status],
            "objective": pulp.value(prob.objective),
        }

    value, seconds, finished = with_deadline(go, deadline(time_limit))
    return {"seconds": seconds, "finished": finished, **(value or {"status": KILLED})}


KILLED = "killed: still running at the deadline, past its own time limit"


def deadline(time_limit: float) -> float:
    """Wall-clock allowance of one solve before the benchmark kills it (heuristics may ignore time limits)."""
    return 2 * time_limit + 60


def _record(sol: cetopt.Solution) -> dict:
    row = {
        "status": sol.status.value,
        "objective": sol.objective,
        "bound": sol.bound,
        "gap": sol.gap,
        "solver_time": sol.time,
    }
    for key in ("timing", "lp_iterations", "nodes"):
        if key in sol.stats:
            row[key] = sol.stats[key]
    return row


def one_size(groups: int, family: str, time_limit: float, with_pulp: bool) -> dict:
    cost, weight, budget = instance(groups, family)
    problem, build_s = best_of(lambda: multiple_choice_knapsack(cost, weight, budget, sense="min"), 3)
    out: dict = {
        "groups": groups,
        "family": family,
        "options": len(BITS),
        "columns": problem.num_cols,
        "build_cetopt_s": build_s,
    }
    greedy, greedy_s = timed(lambda: mck_greedy(cost, weight, budget))
    start = np.zeros(problem.num_cols)
    start[np.arange(groups) * len(BITS) + greedy.choice] = 1.0
    out["greedy"] = {
        "seconds": greedy_s,
        "objective": greedy.cost,
        "lp_bound": greedy.lp_bound,
        "certified_gap": greedy.gap,
    }
    runs = {
        "highs_cold": dict(solver="highs"),
        "highs_warm": dict(solver="highs", start=start),
        "highs_warm_no_submip": dict(
            solver="highs",
            start=start,
            options={"mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False},
        ),
        "cbc": dict(solver="cbc"),
    }
    if groups <= 10_000:
        runs["cvxpy"] = dict(solver="cvxpy")
    out["solves"] = {}
    for name, kw in runs.items():
        print(f"   {family} L={groups} {name}", flush=True)
        value, seconds, finished = with_deadline(
            lambda kw=kw: _record(cetopt.solve(problem, time_limit=time_limit, mip_gap=MIP_GAP, **kw)),
            deadline(time_limit),
        )
        out["solves"][name] = {"seconds": seconds, "finished": finished, **(value or {"status": KILLED})}
    if with_pulp:
        print(f"   {family} L={groups} pulp build + cbc", flush=True)
        prob, pulp_build_s = timed(lambda: build_pulp(cost, weight, budget))
        out["build_pulp_s"] = pulp_build_s
        out["build_speedup_vs_pulp"] = pulp_build_s / build_s
        out["solves"]["pulp_cbc"] = solve_pulp(prob, time_limit)
        base = out["solves"]["pulp_cbc"]["seconds"]
        out["solve_speedup_vs_pulp_cbc"] = {k: base / v["seconds"] for k, v in out["solves"].items()}
    return out


def run(quick: bool = False) -> dict:
    # Load every backend (and PuLP) here, so no forked timing child pays for an import.
    cetopt.available_solvers()
    for name in ("highs", "cbc", "cvxpy"):
        cetopt.get_solver(name)
    import pulp  # noqa: F401

    from solvers._highs_banner import mute_highs_banner

    mute_highs_banner()
    sizes = [100, 1_000] if quick else [100, 1_000, 10_000, 100_000]
    time_limit = 20.0 if quick else 120.0
    results = [
        one_size(groups, family, time_limit, with_pulp=True) for family in FAMILIES for groups in sizes
    ]
    summary = {}
    for at in (r for r in results if r["groups"] == 10_000):
        warm, pulp_cbc = at["solves"]["highs_warm"], at["solves"]["pulp_cbc"]
        summary[at["family"]] = {
            "L": 10_000,
            "build_speedup_vs_pulp": at["build_speedup_vs_pulp"],
            "target_build_speedup": 20.0,
            "highs_warm_speedup_vs_pulp_cbc": at["solve_speedup_vs_pulp_cbc"]["highs_warm"],
            "target_solve_speedup": 1.0,
            "objective_rel_diff_vs_pulp_cbc": abs(warm["objective"] - pulp_cbc["objective"])
            / abs(pulp_cbc["objective"]),
            "mip_gap": MIP_GAP,
        }
    return {"time_limit_s": time_limit, "mip_gap": MIP_GAP, "sizes": results, "summary": summary}
