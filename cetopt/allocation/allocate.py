"""``allocate``: choose each layer's bit width by an integer program; ``pareto``: sweep the budget.

The integer program has one binary per (layer, bits), exactly one chosen per layer, and minimises
the sum of sensitivities under a byte budget, optionally also under BOPs and latency budgets, with
tie groups (layers forced to the same bits) and per-layer bit ranges.

Ties are merged before solving: a tie group becomes one "super-layer" whose option ``k`` puts every
member at bits ``k``, so the program stays a multiple-choice knapsack. With the byte budget as the
only row, the convex-hull greedy (:mod:`cetopt.allocation.mck`) solves the LP relaxation exactly
and rounds it; when its certified gap already meets ``mip_gap`` the plan is returned without a MILP
solve. Otherwise the MILP goes to the chosen solver through :func:`cetopt.solve`, warm-started from
the greedy choice when that is feasible.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from cetopt.allocation.costs import fp32_weight_bytes, option_bytes, parse_budget
from cetopt.allocation.mck import mck_greedy
from cetopt.allocation.plan import Plan
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import DataShapeError, InfeasibleBudgetError, SolverFailedError
from cetopt.problem import MILP, Status
from cetopt.solving import solve
from cetopt.solving.executors import map_tasks

__all__ = ["OptionChoice", "ParetoFront", "allocate", "choose_options", "pareto"]


def _allowed(table: SensitivityTable, min_bits, max_bits) -> np.ndarray:
    bits = np.asarray(table.bits)
    lo = np.full(table.num_layers, -np.inf)
    hi = np.full(table.num_layers, np.inf)
    for arr, spec in ((lo, min_bits), (hi, max_bits)):
        if spec is None:
            continue
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(table.layers))
            if unknown:
                raise KeyError(f"bit limits name layers not in the table: {unknown}")
            for name, value in spec.items():
                arr[table.layers.index(name)] = value
        else:
            arr[:] = spec
    allowed = (bits[None, :] >= lo[:, None]) & (bits[None, :] <= hi[:, None])
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        name = table.layers[int(empty[0])]
        raise ValueError(
            f"layer {name!r} has no bit width within its limits [{lo[empty[0]]}, {hi[empty[0]]}] "
            f"among {list(table.bits)}"
        )
    return allowed


def _tie_groups(table: SensitivityTable, ties: Sequence[Sequence[str]]) -> list[list[int]]:
    parent = list(range(table.num_layers))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index = {name: i for i, name in enumerate(table.layers)}
    for tie in ties:
        missing = [name for name in tie if name not in index]
        if missing:
            raise KeyError(f"tie group names layers not in the table: {missing}")
        for a, b in itertools.pairwise(tie):
            parent[find(index[a])] = find(index[b])
    groups: dict[int, list[int]] = {}
    for i in range(table.num_layers):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _group_sum(per_layer: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    return np.stack([per_layer[g].sum(axis=0) for g in groups])


def _dominated(cost: np.ndarray, resources: list[np.ndarray], allowed: np.ndarray) -> np.ndarray:
    """Options no plan needs: another allowed option of the group is no worse in cost and every resource."""
    stack = np.stack([cost, *resources])  # (R+1, G, K)
    le = np.all(stack[:, :, :, None] >= stack[:, :, None, :], axis=0)  # [g, k, j]: j no worse than k
    lt = np.any(stack[:, :, :, None] > stack[:, :, None, :], axis=0)
    k = cost.shape[1]
    first = np.arange(k)[None, :, None] > np.arange(k)[None, None, :]  # among exact equals keep the first
    beats = allowed[:, None, :] & le & (lt | first)
    return beats.any(axis=2) & allowed


def _milp(cost, resources, limits, allowed) -> MILP:
    groups, options = cost.shape
    n = groups * options
    one_hot = sp.csr_matrix(
        (np.ones(n), (np.repeat(np.arange(groups), options), np.arange(n))), shape=(groups, n)
    )
    rows = [one_hot] + [sp.csr_matrix(r.reshape(1, n)) for r in resources]
    return MILP(
        c=cost.ravel(),
        A=sp.vstack(rows).tocsr(),
        row_lower=np.concatenate([np.ones(groups), np.full(len(resources), -np.inf)]),
        row_upper=np.concatenate([np.ones(groups), limits]),
        col_upper=allowed.ravel().astype(np.float64),
        integrality=np.ones(n, dtype=bool),
    )


def _check_minimum(names: list[str], totals_min: list[float], limits: list[float], units: list[str]) -> None:
    for name, lowest, limit, unit in zip(names, totals_min, limits, units):
        if lowest > limit * (1 + 1e-12):
            raise InfeasibleBudgetError(
                f"the {name} budget of {limit:.6g} {unit} is below the minimum of {lowest:.6g} {unit}, "
                "reached with every layer at its smallest allowed bit width",
                minimum=lowest,
            )


def allocate(
    table: SensitivityTable,
    budget: float | str,
    solver="highs",
    time_limit: float | None = None,
    *,
    mip_gap: float = 1e-4,
    bops_budget: float | None = None,
    activation_bits: int = 32,
    latency: np.ndarray | None = None,
    latency_budget: float | None = None,
    ties: Sequence[Sequence[str]] = (),
    min_bits: int | Mapping[str, int] | None = None,
    max_bits: int | Mapping[str, int] | None = None,
    use_greedy: bool = True,
) -> Plan:
    """Choose a bit width per layer minimising the predicted loss increase within the budgets.

    Parameters
    ----------
    table : SensitivityTable
    budget : float or str
        Weight bytes, a ratio against float32 (``"10x"``), or average bits (``"3.2bits"``); see
        :func:`cetopt.allocation.parse_budget`.
    solver : str or Solver
        Any registered solver (a user's own included).
    time_limit : float, optional
        Seconds for the MILP; on expiry the best plan found is returned with status ``time_limit``.
    mip_gap : float
        Relative optimality gap accepted as optimal.
    bops_budget : float, optional
        Limit on Σ MACs × weight bits × ``activation_bits`` (needs ``table.macs``). Activations stay
        float in cetopt's quantized layers, hence the default of 32.
    latency, latency_budget : optional
        A user's latency table, shape ``(layers, bits)``, and its limit.
    ties : sequence of sequences of layer names
        Layers forced to the same bit width (e.g. the branches of a residual add).
    min_bits, max_bits : int or dict, optional
        Bit range, for all layers or per layer name.
    use_greedy : bool
        Return the convex-hull greedy's plan without a MILP when its certificate meets ``mip_gap``
        (byte budget only). Set False to always solve the MILP.

    Raises
    ------
    InfeasibleBudgetError
        A budget is below the smallest reachable value; ``.minimum`` holds it.
    SolverFailedError
        The solver ended without any plan (error, or a time limit before the first solution).
    """
    t0 = time.perf_counter()
    budget_bytes = parse_budget(budget, table)
    allowed_layers = _allowed(table, min_bits, max_bits)
    groups = _tie_groups(table, ties)
    allowed = np.stack([allowed_layers[g].all(axis=0) for g in groups])
    for g, ok in zip(groups, allowed):
        if not ok.any():
            raise ValueError(f"tied layers {[table.layers[i] for i in g]} share no allowed bit width")
    cost = _group_sum(table.values, groups)
    sizes = _group_sum(option_bytes(table), groups)
    resources, limits, names, units = [sizes], [budget_bytes], ["byte"], ["bytes"]
    bits = np.asarray(table.bits, dtype=np.float64)
    if bops_budget is not None:
        if table.macs is None:
            raise ValueError("a BOPs budget needs table.macs (multiply-accumulates per layer)")
        resources.append(_group_sum(table.macs[:, None] * bits[None, :] * activation_bits, groups))
        limits.append(float(bops_budget))
        names.append("BOPs")
        units.append("BOPs")
    if latency_budget is not None:
        lat = np.asarray(latency, dtype=np.float64)
        if lat.shape != table.values.shape or not np.isfinite(lat).all():
            raise DataShapeError(
                f"latency must be a finite array of shape {table.values.shape}, got {lat.shape}"
            )
        resources.append(_group_sum(lat, groups))
        limits.append(float(latency_budget))
        names.append("latency")
        units.append("(latency units)")
    big = np.inf
    _check_minimum(
        names, [float(np.where(allowed, r, big).min(axis=1).sum()) for r in resources], limits, units
    )

    greedy = mck_greedy(cost, sizes, budget_bytes, allowed)
    if use_greedy and len(resources) == 1 and greedy.gap <= mip_gap:
        choice = greedy.choice
        status, bound, solver_name = "optimal", greedy.lp_bound, "mck-greedy"
    else:
        choice, status, bound, solver_name = _solve_milp(
            cost, resources, limits, allowed, greedy, solver, time_limit, mip_gap, names
        )
    return _make_plan(
        table,
        groups,
        choice,
        status,
        bound,
        time.perf_counter() - t0,
        solver_name,
        budget_bytes,
        resources,
        names,
    )


class OptionChoice(NamedTuple):
    """Outcome of :func:`choose_options`: one option per group and what the solver proved."""

    choice: np.ndarray
    status: str
    bound: float | None
    solver: str


def choose_options(
    cost: np.ndarray,
    size: np.ndarray,
    budget: float,
    *,
    allowed: np.ndarray | None = None,
    solver="highs",
    time_limit: float | None = None,
    mip_gap: float = 1e-4,
    use_greedy: bool = True,
) -> OptionChoice:
    """The multiple-choice knapsack behind :func:`allocate`, for any menu of options.

    Picks one option per group (row) minimising the summed ``cost`` with the summed ``size`` at most
    ``budget``: the convex-hull greedy when its certificate meets ``mip_gap``, else the MILP (one
    binary per option, one-hot rows, one budget row) through :func:`cetopt.solve`.

    Parameters
    ----------
    cost, size : ndarray, shape (groups, options)
        Pad groups with fewer options with any value and mark the padding not ``allowed``.
    budget : float
    allowed : ndarray of bool, optional
    solver, time_limit, mip_gap, use_greedy : as in :func:`allocate`.

    Raises
    ------
    InfeasibleBudgetError
        The budget is below the smallest reachable size; ``.minimum`` holds it.
    """
    cost = np.asarray(cost, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    allowed = np.ones(cost.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if cost.shape != size.shape or cost.shape != allowed.shape or cost.ndim != 2:
        raise DataShapeError(
            "cost, size and allowed must share one 2-D shape, "
            f"got {cost.shape}, {size.shape}, {allowed.shape}"
        )
    if not allowed.any(axis=1).all():
        raise ValueError(f"group {int(np.flatnonzero(~allowed.any(axis=1))[0])} has no allowed option")
    _check_minimum(["size"], [float(np.where(allowed, size, np.inf).min(axis=1).sum())], [budget], ["units"])
    greedy = mck_greedy(cost, size, budget, allowed)
    if use_greedy and greedy.gap <= mip_gap:
        return OptionChoice(greedy.choice, "optimal", greedy.lp_bound, "mck-greedy")
    choice, status, bound, name = _solve_milp(
        cost, [size], [budget], allowed, greedy, solver, time_limit, mip_gap, ["size"]
    )
    return OptionChoice(choice, status, bound, name)


def _solve_milp(cost, resources, limits, allowed, greedy, solver, time_limit, mip_gap, names):
    keep = allowed & ~_dominated(cost, resources, allowed)
    # Loss increases are often ~1e-6: far below the solvers' absolute tolerances (HiGHS's dual
    # feasibility 1e-7 and MIP gap 1e-6), which then accept plans that are percents off. A positive
    # scale leaves the argmin unchanged.
    scale = float(np.abs(cost[keep]).max()) or 1.0
    problem = _milp(cost / scale, resources, np.asarray(limits, dtype=np.float64), keep)
    start = np.zeros(problem.num_cols)
    start[np.arange(cost.shape[0]) * cost.shape[1] + greedy.choice] = 1.0
    start = start if problem.violation(start) <= 1e-9 else None
    solution = solve(problem, solver, time_limit, mip_gap, start=start)
    if solution.status == Status.INFEASIBLE:
        raise InfeasibleBudgetError(
            f"no plan meets the {', '.join(names)} budgets together (each alone is reachable)",
            minimum=float("nan"),
        )
    if solution.x is None:
        raise SolverFailedError(
            f"solver {solution.solver!r} ended with status {solution.status.value} and no plan: "
            f"{solution.message}",
            solution,
        )
    choice = solution.x.reshape(cost.shape).argmax(axis=1)
    bound = None if solution.bound is None else solution.bound * scale
    return choice, solution.status.value, bound, solution.solver


def _make_plan(
    table, groups, group_choice, status, bound, seconds, solver_name, budget_bytes, resources, names
):
    layer_choice = np.empty(table.num_layers, dtype=np.int64)
    for g, k in zip(groups, group_choice):
        layer_choice[g] = k
    rows = np.arange(table.num_layers)
    layer_bytes = option_bytes(table)[rows, layer_choice]
    layer_loss = table.values[rows, layer_choice]
    loss = float(layer_loss.sum())
    gap = None if bound is None else (0.0 if loss == bound else abs(loss - bound) / max(abs(loss), 1e-300))
    totals = {name: float(r[np.arange(len(groups)), group_choice].sum()) for name, r in zip(names, resources)}
    return Plan(
        bits={name: int(table.bits[k]) for name, k in zip(table.layers, layer_choice)},
        predicted_loss=loss,
        bytes=float(layer_bytes.sum()),
        budget_bytes=budget_bytes,
        fp32_bytes=fp32_weight_bytes(table),
        status=status,
        bound=None if bound is None else float(bound),
        gap=gap,
        solve_time=seconds,
        solver=solver_name,
        method=table.method,
        bops=totals.get("BOPs"),
        latency=totals.get("latency"),
        layer_bytes=dict(zip(table.layers, layer_bytes.tolist())),
        layer_loss=dict(zip(table.layers, layer_loss.tolist())),
        layer_params=dict(zip(table.layers, table.params.tolist())),
    )


class ParetoFront:
    """Plans over a sweep of budgets: predicted loss increase against bytes."""

    def __init__(self, plans: list[Plan]):
        self.plans = sorted(plans, key=lambda p: p.budget_bytes)

    @property
    def bytes(self) -> np.ndarray:
        return np.array([p.bytes for p in self.plans])

    @property
    def predicted_loss(self) -> np.ndarray:
        return np.array([p.predicted_loss for p in self.plans])

    def to_dict(self) -> dict:
        return {"plans": [p.to_dict() for p in self.plans]}

    def plot(self, path, *, title: str | None = None) -> str:
        """Save the frontier as an image (PNG/PDF/SVG by extension); returns the path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ratio = np.array([p.compression_ratio for p in self.plans])
        ax.plot(self.bytes / 1024, self.predicted_loss, "o-", color="tab:blue")
        for x, y, r, p in zip(self.bytes / 1024, self.predicted_loss, ratio, self.plans):
            ax.annotate(
                f"{r:.1f}x, {p.average_bits:.2f} b",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        ax.set_xlabel("quantized weight size (KiB)")
        ax.set_ylabel("predicted loss increase")
        ax.set_title(title or f"Pareto frontier ({self.plans[0].method or 'user'} sensitivities)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return str(path)


def pareto(
    table: SensitivityTable,
    budgets: Sequence[float | str],
    *,
    plot=None,
    workers: int | None = None,
    executor=None,
    **allocate_kwargs,
) -> ParetoFront:
    """Allocate for each budget (in parallel) and return the frontier; save its plot to ``plot`` if given.

    Budgets below the minimum size are skipped with their error noted in no plan; other errors raise.
    ``executor``: where the budget solves run, as in :func:`cetopt.solving.executors.get_executor`.
    """

    def one(budget):
        try:
            return allocate(table, budget, **allocate_kwargs)
        except InfeasibleBudgetError:
            return None

    plans = [p for p in map_tasks(one, budgets, executor, workers) if p is not None]
    if not plans:
        raise InfeasibleBudgetError("every budget is below the minimum size", minimum=float("nan"))
    front = ParetoFront(plans)
    if plot is not None:
        front.plot(plot)
    return front
