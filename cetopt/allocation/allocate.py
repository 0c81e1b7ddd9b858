"""``allocate``: choose each layer's bit width by an integer program; ``pareto``: sweep the budget.

The integer program has one binary per (layer, bits), exactly one chosen per layer, and minimises
the sum of sensitivities under a byte budget, optionally also under BOPs and latency budgets, with
tie groups (layers forced to the same bits) and per-layer bit ranges.

Ties are merged before solving: a tie group becomes one "super-layer" whose option ``k`` puts every
member at bits ``k``, so the program stays a multiple-choice knapsack. It is then solved as
:mod:`cetopt.allocation.search` describes: the convex-hull greedy (byte budget alone) or the
Lagrangian dual (several budgets) give a plan and a proven bound; only when their gap misses
``mip_gap`` does a MILP, restricted to the layers that the multipliers leave undecided, go to the
chosen solver through :func:`cetopt.solve`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from cetopt.allocation.costs import fp32_weight_bytes, option_bytes, parse_budget
from cetopt.allocation.inputs import Groups, bit_limits, check_options, positive_amount, tie_groups
from cetopt.allocation.plan import LayerValues, NameIndex, Plan
from cetopt.allocation.search import MultiChoice, relative_gap
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import AllocationArgumentError, DataShapeError, InfeasibleBudgetError
from cetopt.solving.executors import map_tasks

__all__ = ["OptionChoice", "ParetoFront", "allocate", "choose_options", "pareto"]


def _check_minimum(problem: MultiChoice, limits, units: list[str]) -> None:
    for j, (name, limit, unit) in enumerate(zip(problem.names, limits, units)):
        lowest = problem.minimum(j)
        if lowest > limit * (1 + 1e-12):
            raise InfeasibleBudgetError(
                f"the {name} budget of {limit:.6g} {unit} is below the minimum of {lowest:.6g} {unit}, "
                "reached with every layer at its smallest allowed bit width",
                minimum=lowest,
            )


class _Setup(NamedTuple):
    """Everything ``allocate`` needs besides the byte budget: shared by a budget sweep."""

    table: SensitivityTable
    groups: Groups
    problem: MultiChoice
    extra_limits: list[float]
    units: list[str]
    layer_bytes: np.ndarray
    index: NameIndex


def _setup(
    table,
    ties,
    min_bits,
    max_bits,
    bops_budget,
    activation_bits,
    latency,
    latency_budget,
    time_limit,
    mip_gap,
) -> _Setup:
    if not isinstance(table, SensitivityTable):
        raise AllocationArgumentError(f"table must be a cetopt.SensitivityTable, got {type(table).__name__}")
    check_options(time_limit, mip_gap, activation_bits)
    groups = tie_groups(table, ties)
    allowed = groups.all(bit_limits(table, min_bits, max_bits))
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        names = [table.layers[i] for i in groups.members(int(empty[0]))]
        raise AllocationArgumentError(f"tied layers {names} share no allowed bit width")
    layer_bytes = option_bytes(table)
    resources, names, units, limits = [groups.sum(layer_bytes)], ["byte"], ["bytes"], []
    bits = np.asarray(table.bits, dtype=np.float64)
    if bops_budget is not None:
        limits.append(positive_amount("bops_budget", bops_budget))
        if table.macs is None:
            raise AllocationArgumentError("a BOPs budget needs table.macs (multiply-accumulates per layer)")
        resources.append(groups.sum(table.macs.astype(np.float64)[:, None] * bits[None, :] * activation_bits))
        names.append("BOPs")
        units.append("BOPs")
    if latency_budget is not None:
        limits.append(positive_amount("latency_budget", latency_budget))
        try:
            lat = np.asarray(latency, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataShapeError(f"latency must be a numeric array of shape {table.values.shape}") from exc
        if lat.shape != table.values.shape or not np.isfinite(lat).all():
            raise DataShapeError(
                f"latency must be a finite array of shape {table.values.shape}, got {lat.shape}"
            )
        resources.append(groups.sum(lat))
        names.append("latency")
        units.append("(latency units)")
    problem = MultiChoice(groups.sum(table.values), resources, allowed, names)
    return _Setup(table, groups, problem, limits, units, layer_bytes, NameIndex(table.layers))


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
        Weight bytes, a ratio against float32 (``"10x"``, at least 1), or average bits
        (``"3.2bits"``); see :func:`cetopt.allocation.parse_budget`.
    solver : str or Solver
        Any registered solver (a user's own included), for the MILP when one is needed.
    time_limit : float, optional
        Seconds in all; on expiry the best plan found is returned with status ``time_limit``.
    mip_gap : float
        Relative optimality gap accepted as optimal. A plan whose certified gap is above it is
        never ``optimal``: it comes back ``time_limit`` or ``stopped``, with its gap.
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
        Return the greedy's (byte budget alone) or the Lagrangian's (several budgets) plan without a
        MILP when its certificate meets ``mip_gap``, and give the MILP only the undecided layers
        otherwise. Set False to always solve the whole MILP.

    Raises
    ------
    BudgetError
        A budget cannot be read or is not a positive finite amount (a ``ValueError``).
    AllocationArgumentError, UnknownLayerError, DataShapeError
        Another argument is malformed; the message names it.
    InfeasibleBudgetError
        A budget is below the smallest reachable value; ``.minimum`` holds it.
    SolverFailedError
        The solver failed, or ended without any plan and none was found otherwise.
    """
    t0 = time.perf_counter()
    setup = _setup(
        table,
        ties,
        min_bits,
        max_bits,
        bops_budget,
        activation_bits,
        latency,
        latency_budget,
        time_limit,
        mip_gap,
    )
    plan, _ = _allocate_one(setup, budget, solver, time_limit, mip_gap, use_greedy, None, t0)
    return plan


def _allocate_one(setup: _Setup, budget, solver, time_limit, mip_gap, use_greedy, multipliers, t0):
    limits = [parse_budget(budget, setup.table), *setup.extra_limits]
    _check_minimum(setup.problem, limits, setup.units)
    incumbent = setup.problem.incumbent(limits, multipliers, mip_gap)
    answer = setup.problem.solve(
        limits, incumbent, solver, time_limit, mip_gap, use_heuristics=use_greedy, t0=t0
    )
    broken = setup.problem.over_budget(answer.choice, limits)
    if broken:  # never reached by a verified answer: a last line of defence
        raise AssertionError(f"internal error: the plan breaks the {', '.join(broken)} budget")
    plan = _make_plan(setup, answer, limits, time.perf_counter() - t0)
    return plan, answer.multipliers


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
    binary per option, one-hot rows, one budget row) over the groups the greedy's multiplier leaves
    undecided, through :func:`cetopt.solve`.

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
    t0 = time.perf_counter()
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
    check_options(time_limit, mip_gap, 1)
    budget = positive_amount("budget", budget)
    problem = MultiChoice(cost, [size], allowed, ["size"])
    _check_minimum(problem, [budget], ["units"])
    incumbent = problem.incumbent([budget], None, mip_gap)
    answer = problem.solve([budget], incumbent, solver, time_limit, mip_gap, use_heuristics=use_greedy, t0=t0)
    return OptionChoice(answer.choice, answer.status, answer.bound, answer.solver)


def _make_plan(setup: _Setup, answer, limits, seconds: float) -> Plan:
    table = setup.table
    layer_choice = setup.groups.layer_choice(answer.choice)
    rows = np.arange(table.num_layers)
    layer_bytes = setup.layer_bytes[rows, layer_choice]
    layer_loss = table.values[rows, layer_choice]
    loss = float(layer_loss.sum())
    totals = dict(zip(setup.problem.names, setup.problem.totals(answer.choice)))
    bits = np.asarray(table.bits, dtype=np.int16 if max(table.bits) < 2**15 else np.int64)[layer_choice]
    names, index = table.layers, setup.index
    groups = {}
    if table.groups is not None:
        groups = LayerValues(names, np.asarray(table.group_sizes, dtype=np.int64)[layer_choice], index)
    return Plan(
        bits=LayerValues(names, bits, index),
        predicted_loss=loss,
        bytes=float(layer_bytes.sum()),
        budget_bytes=float(limits[0]),
        fp32_bytes=fp32_weight_bytes(table),
        status=answer.status,
        bound=answer.bound,
        gap=relative_gap(loss, answer.bound),
        solve_time=seconds,
        solver=answer.solver,
        method=table.method,
        bops=totals.get("BOPs"),
        latency=totals.get("latency"),
        layer_bytes=LayerValues(names, layer_bytes, index),
        layer_loss=LayerValues(names, layer_loss, index),
        layer_params=LayerValues(names, table.params, index),
        kept_float=tuple(table.meta.get("kept_float", ())),
        groups=groups,
    )


class ParetoFront:
    """Plans over a sweep of budgets: predicted loss increase against bytes.

    Attributes
    ----------
    plans : list of Plan
        One plan per budget, sorted by budget (several budgets can give the same plan once the
        budget no longer binds, e.g. when every layer already sits at its widest bits).
    bytes : ndarray
        Each plan's quantized-weight bytes (codes + per-channel scale and bit width).
    predicted_loss : ndarray
        Each plan's predicted loss increase (the summed sensitivities).
    """

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
        import io
        from pathlib import Path

        import matplotlib

        from cetopt._io import atomic_write_bytes

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ratio = np.array([p.compression_ratio for p in self.plans])
        ax.plot(self.bytes / 1024, self.predicted_loss, "o-", color="tab:blue")
        shown: set[tuple[float, float]] = set()
        for x, y, r, p in zip(self.bytes / 1024, self.predicted_loss, ratio, self.plans):
            if (round(x, 6), round(y, 12)) in shown:  # saturated budgets repeat a plan: label it once
                continue
            shown.add((round(x, 6), round(y, 12)))
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
        buffer = io.BytesIO()  # rendered in memory, then written by the one atomic writer
        fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or None)
        atomic_write_bytes(path, buffer.getvalue())
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
    """Allocate for each budget and return the frontier; save its plot to ``plot`` if given.

    The budgets share one setup: the tie merging, the byte costs and the convex hull are built once,
    and with several budget rows each budget's Lagrangian starts from the multipliers of the one
    before it (budgets in increasing order). Budgets that still need a MILP are solved in parallel
    (``workers`` threads). Budgets below the minimum size are skipped; other errors raise.
    ``executor``: where those MILPs run, as in :func:`cetopt.solving.executors.get_executor`
    (``"thread"``, the default, or ``"ray"``).
    """
    known = {"solver", "time_limit", "mip_gap", "use_greedy"}
    solve_kwargs = {k: allocate_kwargs.pop(k) for k in list(allocate_kwargs) if k in known}
    solver = solve_kwargs.get("solver", "highs")
    time_limit = solve_kwargs.get("time_limit")
    mip_gap = solve_kwargs.get("mip_gap", 1e-4)
    use_greedy = solve_kwargs.get("use_greedy", True)
    setup = _setup(
        table,
        allocate_kwargs.pop("ties", ()),
        allocate_kwargs.pop("min_bits", None),
        allocate_kwargs.pop("max_bits", None),
        allocate_kwargs.pop("bops_budget", None),
        allocate_kwargs.pop("activation_bits", 32),
        allocate_kwargs.pop("latency", None),
        allocate_kwargs.pop("latency_budget", None),
        time_limit,
        mip_gap,
    )
    if allocate_kwargs:
        raise AllocationArgumentError(f"pareto got unknown arguments: {sorted(allocate_kwargs)}")
    parsed = sorted(((parse_budget(b, table, "budgets"), b) for b in budgets), key=lambda pair: pair[0])
    plans, pending, lam = [], [], None
    for budget_bytes, _ in parsed:  # cheap passes, in order, each warm-started from the last
        t0 = time.perf_counter()
        limits = [budget_bytes, *setup.extra_limits]
        try:
            _check_minimum(setup.problem, limits, setup.units)
        except InfeasibleBudgetError:
            continue
        incumbent = setup.problem.incumbent(limits, lam, mip_gap)
        lam = incumbent.multipliers
        pending.append((limits, incumbent, t0))

    def finish(item):
        limits, incumbent, t0 = item
        try:
            answer = setup.problem.solve(
                limits, incumbent, solver, time_limit, mip_gap, use_heuristics=use_greedy, t0=t0
            )
        except InfeasibleBudgetError:
            return None
        return _make_plan(setup, answer, limits, time.perf_counter() - t0)

    plans = [p for p in map_tasks(finish, pending, executor, workers) if p is not None]
    if not plans:
        raise InfeasibleBudgetError("every budget is below the minimum size", minimum=float("nan"))
    front = ParetoFront(plans)
    if plot is not None:
        front.plot(plot)
    return front
