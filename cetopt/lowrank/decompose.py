"""``decompose``: replace layers by low-rank plus sparse approximations, written back by the rewriter.

Four methods (:mod:`cetopt.lowrank.fit` has the derivations):

* ``"admm"`` — activation-aware L + S: the layer's output after its (BatchNorm and) activation is
  kept close to the original on calibration data;
* ``"weight_space"`` — OATS-style alternation of truncated SVD and top-k on ``W √diag(XXᵀ)``;
* ``"svd"`` — plain truncated SVD (no sparse part);
* ``"prune"`` — plain magnitude pruning (no low-rank part).

Each decomposed layer becomes a :class:`~cetopt.nn.FactorizedLinear` / ``FactorizedConv``: two thin
layers (rank r) plus the nonzeros of S and their positions. Its stored weights are exactly
``r (m + n) + nnz`` values (positions are an index buffer, not parameters); the bias is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.analysis._common import progress_bar
from cetopt.errors import UnreachableBudgetError
from cetopt.graph import Factorize, rewrite
from cetopt.lowrank.fit import (
    STRUCTURES,
    LowRankSparse,
    fit_admm,
    fit_prune,
    fit_svd,
    fit_weight_space,
)
from cetopt.lowrank.layers import LayerData, check_layers, collect_each, supported_layers, weight_matrix

__all__ = ["METHODS", "Decomposition", "LayerResult", "decompose", "fit_layer", "resolve_budget"]

METHODS = ("admm", "weight_space", "svd", "prune")


@dataclass(frozen=True)
class LayerResult:
    """One decomposed layer.

    Attributes
    ----------
    rank, nnz : int
    params : int
        Stored weight values, ``rank · (m + n) + nnz`` (biases excluded).
    dense_params : int
        Weight values of the original layer, ``m · n``.
    error : float
        Relative post-activation error on the calibration columns.
    history : tuple of float
        The method's objective per iteration.
    """

    rank: int
    nnz: int
    params: int
    dense_params: int
    error: float
    history: tuple[float, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Decomposition:
    """The result of :func:`decompose`: the new model and what was done to each layer."""

    model: nn.Module
    layers: dict[str, LayerResult]
    method: str
    decisions: list[Factorize] = field(repr=False)

    @property
    def params(self) -> int:
        """Weight values of the decomposed layers after decomposition."""
        return sum(r.params for r in self.layers.values())

    @property
    def dense_params(self) -> int:
        return sum(r.dense_params for r in self.layers.values())

    @property
    def ratio(self) -> float:
        """``dense_params / params`` over the decomposed layers."""
        return self.dense_params / max(self.params, 1)


def _per_layer(spec, name: str):
    if isinstance(spec, Mapping):
        return spec.get(name, 0)
    return spec


def resolve_budget(data: LayerData, rank, nnz, method: str, structure: str) -> tuple[int, int]:
    """Turn a layer's requested rank and sparsity into integers, or raise if they cannot be reached.

    ``nnz`` is a count of entries (int) or a fraction of the weight's entries (float in [0, 1]);
    with row or column structure it is rounded down to whole rows or columns.

    Raises
    ------
    UnreachableBudgetError
    """
    m, n = data.weight.shape
    name = data.name
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(m, n):
        raise UnreachableBudgetError(
            f"rank {rank!r} for layer {name!r} cannot be reached: its {m}×{n} weight allows 0..{min(m, n)}",
            name,
        )
    if isinstance(nnz, float):
        if not 0.0 <= nnz <= 1.0:
            raise UnreachableBudgetError(f"sparse fraction {nnz} for layer {name!r} is outside [0, 1]", name)
        nnz = round(nnz * m * n)
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= m * n:
        raise UnreachableBudgetError(
            f"{nnz!r} nonzeros for layer {name!r} cannot be reached: its weight has {m * n} entries", name
        )
    unit = {"unstructured": 1, "rows": n, "columns": m}[structure]
    nnz = nnz // unit * unit
    if method == "svd" and (nnz or not rank):
        raise UnreachableBudgetError(f"method 'svd' needs rank ≥ 1 and no sparse part (layer {name!r})", name)
    if method == "prune" and (rank or not nnz):
        raise UnreachableBudgetError(
            f"method 'prune' needs rank 0 and at least one {'entry' if unit == 1 else structure[:-1]} "
            f"(layer {name!r})",
            name,
        )
    if rank == 0 and nnz == 0:
        raise UnreachableBudgetError(f"layer {name!r} would keep nothing (rank 0 and no nonzeros)", name)
    return rank, nnz


def fit_layer(
    data: LayerData,
    rank: int,
    nnz: int,
    method: str,
    *,
    structure: str = "unstructured",
    iterations: int = 30,
    init: LowRankSparse | None = None,
    target_inputs: torch.Tensor | None = None,
) -> LowRankSparse:
    """Fit one layer (after :func:`resolve_budget`); the result is in the layer's own weight space.

    ``target_inputs`` (``admm`` only) are the inputs defining the target output, for sequential
    calibration (see :func:`cetopt.lowrank.fit_admm`).
    """
    if target_inputs is not None and method != "admm":
        raise ValueError(f"target_inputs needs method 'admm', got {method!r}")
    if method == "svd":
        return fit_svd(data.weight, rank)
    if method == "prune":
        return fit_prune(data.weight, nnz, structure)
    if method == "weight_space":
        return fit_weight_space(data.weight, rank, nnz, data.factors, structure=structure)
    scaled_init = None if init is None else init.scale_rows(data.scale)
    fit = fit_admm(
        data.effective_weight,
        data.effective_bias,
        data.inputs,
        rank,
        nnz,
        activation=data.activation,
        structure=structure,
        iterations=iterations,
        init=scaled_init,
        target_inputs=target_inputs,
        factors=data.factors,
    )
    return fit.scale_rows(1.0 / data.scale)


def factorize_decision(name: str, module: nn.Module, fit: LowRankSparse) -> Factorize:
    """The rewriter decision that writes ``fit`` back into layer ``name``."""
    shape = module.weight.shape
    first = fit.right.to(torch.float32).reshape(fit.rank, *shape[1:])
    second = fit.left.to(torch.float32)
    sparse = fit.sparse.to(torch.float32).reshape(shape) if fit.nnz else None
    return Factorize(name, first, second, sparse)


def _budget(modules, name: str, rank, nnz, method: str, structure: str) -> tuple[int, int]:
    """:func:`resolve_budget` from the layer's weight alone (before any calibration pass)."""
    shape = SimpleNamespace(name=name, weight=weight_matrix(modules[name]))
    return resolve_budget(shape, _per_layer(rank, name), _per_layer(nnz, name), method, structure)


def _check_args(method: str, structure: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")


@in_eval_mode("model")
def decompose(
    model: nn.Module,
    calibration,
    *,
    rank: int | Mapping[str, int],
    nnz: int | float | Mapping[str, int | float] = 0,
    method: str = "admm",
    structure: str = "unstructured",
    layers: Sequence[str] | None = None,
    max_columns: int = 2048,
    iterations: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> Decomposition:
    """Approximate layers by ``L + S`` (rank ≤ r, at most k nonzeros) and write them back.

    Parameters
    ----------
    model : nn.Module
        Never modified.
    calibration : Tensor or iterable of batches
        Inputs (or ``(inputs, targets)`` batches) to fit on.
    rank : int or dict
        Rank of L, for every layer or per layer name (a missing name gets rank 0).
    nnz : int, float or dict
        Nonzeros of S: a count, or a fraction of the weight's entries; per layer with a dict.
    method : {"admm", "weight_space", "svd", "prune"}
    structure : {"unstructured", "rows", "columns"}
        Sparsity pattern of S (rows/columns: whole output rows or input columns of the
        ``(out, fan_in)`` weight matrix).
    layers : sequence of str, optional
        Layers to decompose; default the keys of a dict ``rank`` (or ``nnz``), else every Linear
        and Conv1d/Conv2d layer.
    max_columns : int
        Calibration columns kept per layer.
    iterations : int
        The most ADMM iterations (each fit stops earlier once its residuals are small, see
        :func:`cetopt.lowrank.fit_admm`).
    seed : int
        Seed of the column subsampling.
    progress : bool
        Show a progress bar over the layers on stderr.

    Returns
    -------
    Decomposition

    Raises
    ------
    UnreachableBudgetError
        A rank or sparsity that a layer cannot reach (names the layer).
    CalibrationShapeError
        Calibration data of the wrong shape or type.
    NonFiniteError
        Calibration data holding NaN or infinity (names the batch).
    UnsupportedLayerError
        A named layer is not a Linear/Conv1d/Conv2d.
    """
    _check_args(method, structure)
    if layers is None:
        keyed = rank if isinstance(rank, Mapping) else nnz if isinstance(nnz, Mapping) else None
        layers = list(keyed) if keyed is not None else supported_layers(model)
    layers = list(layers)
    modules = dict(model.named_modules())
    check_layers(modules, layers)
    budgets = {name: _budget(modules, name, rank, nnz, method, structure) for name in layers}
    decisions, results = [], {}
    each = collect_each(model, calibration, layers, max_columns=max_columns, seed=seed)
    with progress_bar(len(layers), f"decompose ({method})", progress) as bar:
        for data in each:
            bar.set_description(f"decompose ({method}): {data.name}")
            fit = fit_layer(data, *budgets[data.name], method, structure=structure, iterations=iterations)
            decisions.append(factorize_decision(data.name, modules[data.name], fit))
            error = data.relative_error(fit.dense())
            results[data.name] = LayerResult(
                fit.rank, fit.nnz, fit.params, data.weight.numel(), error, fit.history
            )
            bar.update()
    return Decomposition(rewrite(model, decisions), results, method, decisions)
