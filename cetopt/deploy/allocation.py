"""Weight × activation bit allocation: one multiple-choice knapsack over (weight bits, activation bits).

Every layer gets one option per pair ``(w, a)``: its cost is the weight sensitivity at ``w`` plus
the measured loss increase of quantizing the layer's input activations at ``a`` (0 for float,
``a = 32``); its weight is the bytes :func:`cetopt.save` writes at ``w``; its BOPs are
``MACs × w × a``, which now count what the ``int8`` runtime actually runs. With a byte budget
alone this is :func:`cetopt.allocation.choose_options`; a BOPs budget adds one more knapsack row,
solved as a MILP through :func:`cetopt.solve` (any registered solver).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from cetopt.allocation import choose_options, option_bytes, parse_budget
from cetopt.analysis.table import SensitivityTable
from cetopt.deploy.activations import calibrate_activations
from cetopt.errors import InfeasibleBudgetError, SolverFailedError

__all__ = ["WAPlan", "activation_sensitivity", "allocate_wa"]


def _mean_loss(model: nn.Module, batches: list, loss_fn: Callable) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += float(loss_fn(model(x), y)) * len(x)
            count += len(x)
    return total / max(count, 1)


def activation_sensitivity(
    model: nn.Module,
    data: Iterable,
    bits: Sequence[int] = (4, 8),
    *,
    layers: Sequence[str] | None = None,
    method: str = "minmax",
    loss_fn: Callable | None = None,
) -> np.ndarray:
    """Measured loss increase of quantizing one layer's input activations, shape ``(layers, bits)``.

    Each entry quantizes only that layer's input (``fake-int8`` grid calibrated on ``data`` with
    ``method``), everything else as it is in ``model``, a model with quantized layers (e.g. the
    weight plan's own model, or every layer at 8 bits).

    Parameters
    ----------
    layers : sequence of str, optional
        Row order (e.g. ``table.layers``); default every quantized layer in module order.
    """
    from cetopt.deploy.activations import ActivationRanges, quantizable_layers
    from cetopt.deploy.runtime import deployment_model, runtime

    loss_fn = loss_fn or nn.functional.cross_entropy
    batches = [(x, y) for x, y in data]
    deploy = deployment_model(model).eval()
    base = _mean_loss(deploy, batches, loss_fn)
    from cetopt.deploy.runtime import is_deploy_layer

    modules = dict(deploy.named_modules())
    names = (
        list(layers)
        if layers is not None
        else [n for n in quantizable_layers(deploy) if is_deploy_layer(modules[n])]
    )
    out = np.zeros((len(names), len(bits)))
    for j, b in enumerate(bits):
        ranges = calibrate_activations(deploy, batches, method=method, bits=b)
        for i, name in enumerate(names):
            # only the input grid: the output is then the next layer's input, measured on its own
            one = ActivationRanges({name: ranges.inputs[name]}, {name: _identity_grid(ranges, name)})
            fake = runtime(model, "fake-int8", activations=one)
            out[i, j] = _mean_loss(fake, batches, loss_fn) - base
    return out


def _identity_grid(ranges, name):
    """An output "grid" that leaves the output float."""
    return _NoQuant(ranges.outputs[name])


class _NoQuant:
    """Stands in for an output grid: leaves the tensor as it is."""

    def __init__(self, grid):
        self.bits, self.axis, self.lo, self.hi = grid.bits, None, grid.lo, grid.hi
        self.scale, self.zero_point = grid.scale, grid.zero_point
        self.per_channel = False

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class WAPlan:
    """A weight and an activation bit width per layer.

    Attributes
    ----------
    weight_bits, activation_bits : dict of str to int
        32 activation bits: the layer's activations stay float.
    predicted_loss : float
    bytes : float
    bops : float
    status, solver : str
    bound : float or None
    seconds : float
    """

    weight_bits: dict
    activation_bits: dict
    predicted_loss: float
    bytes: float
    bops: float
    status: str
    solver: str
    bound: float | None
    seconds: float

    def to_dict(self) -> dict:
        """Plain JSON."""
        return dict(self.__dict__)


def allocate_wa(
    table: SensitivityTable,
    activation_values: np.ndarray,
    budget: float | str,
    *,
    activation_bits: Sequence[int] = (4, 8),
    allow_float_activations: bool = True,
    bops_budget: float | None = None,
    solver="highs",
    time_limit: float | None = None,
    mip_gap: float = 1e-4,
) -> WAPlan:
    """Choose weight and activation bits per layer: least predicted loss within the budgets.

    Parameters
    ----------
    table : SensitivityTable
        Weight sensitivities (:func:`cetopt.sensitivity`); ``table.macs`` for a BOPs budget.
    activation_values : ndarray, shape (layers, len(activation_bits))
        :func:`activation_sensitivity` of the same layers.
    budget : float or str
        Weight bytes, as :func:`cetopt.allocate` reads it.
    activation_bits : sequence of int
    allow_float_activations : bool
        Also offer 32-bit (float) activations at no loss.
    bops_budget : float, optional
        Limit on Σ MACs × weight bits × activation bits.
    solver, time_limit, mip_gap : as in :func:`cetopt.allocate`.
    """
    t0 = time.perf_counter()
    a_bits = list(activation_bits) + ([32] if allow_float_activations else [])
    a_cost = np.concatenate(
        [
            np.asarray(activation_values, dtype=np.float64),
            np.zeros((table.num_layers, len(a_bits) - len(activation_bits))),
        ],
        axis=1,
    )
    w_bits = list(table.bits)
    pairs = [(w, a) for w in range(len(w_bits)) for a in range(len(a_bits))]
    cost = np.stack([table.values[:, w] + a_cost[:, a] for w, a in pairs], axis=1)
    size = np.stack([option_bytes(table)[:, w] for w, _ in pairs], axis=1)
    limit = parse_budget(budget, table)
    if bops_budget is None:
        res = choose_options(cost, size, limit, solver=solver, time_limit=time_limit, mip_gap=mip_gap)
        choice, status, bound, name = res.choice, res.status, res.bound, res.solver
    else:
        if table.macs is None:
            raise ValueError("a BOPs budget needs table.macs")
        bops = np.stack([table.macs * w_bits[w] * a_bits[a] for w, a in pairs], axis=1).astype(np.float64)
        choice, status, bound, name = _two_row_mck(
            cost, size, bops, limit, bops_budget, solver, time_limit, mip_gap
        )
    rows = np.arange(table.num_layers)
    w_of = {table.layers[i]: int(w_bits[pairs[c][0]]) for i, c in enumerate(choice)}
    a_of = {table.layers[i]: int(a_bits[pairs[c][1]]) for i, c in enumerate(choice)}
    macs = table.macs if table.macs is not None else np.zeros(table.num_layers)
    return WAPlan(
        w_of,
        a_of,
        float(cost[rows, choice].sum()),
        float(size[rows, choice].sum()),
        float(sum(macs[i] * w_of[n] * a_of[n] for i, n in enumerate(table.layers))),
        status,
        name,
        bound,
        time.perf_counter() - t0,
    )


def _two_row_mck(cost, size, bops, byte_limit, bops_limit, solver, time_limit, mip_gap):
    from cetopt import MILP, solve

    groups, options = cost.shape
    n = groups * options
    for name, resource, limit in (("byte", size, byte_limit), ("BOPs", bops, bops_limit)):
        lowest = float(resource.min(axis=1).sum())
        if lowest > limit * (1 + 1e-12):
            raise InfeasibleBudgetError(
                f"the {name} budget {limit:.6g} is below its minimum {lowest:.6g}", minimum=lowest
            )
    one_hot = sp.csr_matrix(
        (np.ones(n), (np.repeat(np.arange(groups), options), np.arange(n))), shape=(groups, n)
    )
    scale = float(np.abs(cost).max()) or 1.0  # loss increases ~1e-6 sit below solver tolerances
    problem = MILP(
        c=cost.ravel() / scale,
        A=sp.vstack([one_hot, sp.csr_matrix(size.reshape(1, n)), sp.csr_matrix(bops.reshape(1, n))]).tocsr(),
        row_lower=np.concatenate([np.ones(groups), [-np.inf, -np.inf]]),
        row_upper=np.concatenate([np.ones(groups), [byte_limit, bops_limit]]),
        col_upper=np.ones(n),
        integrality=np.ones(n, dtype=bool),
    )
    solution = solve(problem, solver, time_limit, mip_gap)
    if solution.x is None:
        if solution.status.value == "infeasible":
            raise InfeasibleBudgetError(
                "no plan meets the byte and BOPs budgets together", minimum=float("nan")
            )
        raise SolverFailedError(
            f"solver ended with status {solution.status.value}: {solution.message}", solution
        )
    bound = None if solution.bound is None else solution.bound * scale
    return solution.x.reshape(cost.shape).argmax(axis=1), solution.status.value, bound, solution.solver
