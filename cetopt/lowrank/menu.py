"""The menu allocation: each layer gets a menu of compressions; one integer program picks one per layer.

A menu option is one way to store a layer, with two measured errors — the layer's relative
post-activation error on the calibration columns (:meth:`LayerData.relative_error`) and the
network's relative output error ``‖f(x; W') − f(x)‖² / ‖f(x)‖²`` on calibration inputs with only that
layer changed — and its exact cost in parameters and bytes:

==================  ======================  ================================================
kind                parameters              bytes
==================  ======================  ================================================
``dense``           m·n                     4·m·n
``quant`` (b bits)  m·n                     ⌈m·n·b/8⌉ + 5·m
``quant`` (b, g)    m·n                     ⌈m·n·b/8⌉ + m·(2·⌈n/g⌉ + 1)
factorised, fp32    r(m+n) + nnz            4·r(m+n) + sparse(nnz)
factorised, b bits  r(m+n) + nnz            ⌈r·n·b/8⌉ + 5r + ⌈m·r·b/8⌉ + 5m + sparse(nnz)
==================  ======================  ================================================

with the factorised kinds ``svd``, ``prune`` (rank 0), ``weight_space`` and ``admm`` (L + S), and
``sparse(nnz) = 4·nnz + min(⌈m·n/8⌉, nnz·idx)`` — float32 values plus their positions as a bitmask
or as ``idx``-byte indices (2 bytes when m·n ≤ 65536, else 4), whichever is smaller. Quantized
weights are counted as :func:`cetopt.save` packs them (codes back to back, a float32 scale and a
uint8 bit width per output channel); the positions are a packing model (in memory they are an
int64 buffer). A group-wise ``quant`` option (``group`` g, from ``build_menu(groups=...)``, the
``(bits, group)`` columns of a sensitivity table with ``group_sizes``) stores a float16 scale per
``g`` input columns instead, as :func:`cetopt.allocation.option_bytes` counts it.
:func:`stored_bytes` measures the same quantities on a written-back model.

:meth:`Menu.choose` hands the (layers × options) table to
:func:`cetopt.allocation.choose_options`, the multiple-choice knapsack behind the bit allocation:
one binary per option, exactly one per layer, the summed error (the output error by default)
minimised under a parameter or a byte budget. Restricting ``kinds`` gives single-method menus;
with every kind the one MILP decides per layer between keeping, quantizing, factorising, pruning,
and factorising with quantized factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from cetopt._modes import in_eval_mode, to_eval
from cetopt.allocation import choose_options
from cetopt.analysis._common import progress_bar
from cetopt.graph import Quantize, rewrite
from cetopt.lowrank.decompose import factorize_decision, fit_layer
from cetopt.lowrank.fit import LowRankSparse, fit_svd_ranks
from cetopt.lowrank.layers import (
    LayerData,
    check_menu_layers,
    collect,
    collect_each,
    layer_errors,
    menu_layers,
)
from cetopt.lowrank.suffix import output_errors
from cetopt.nn.factorized import FactorizedConv, FactorizedLinear
from cetopt.nn.quantized import QuantizedMixin
from cetopt.nn.unfold import is_matmul_layer
from cetopt.quant import quantize_weight

__all__ = [
    "KINDS",
    "Menu",
    "MenuOption",
    "MenuPlan",
    "build_menu",
    "option_matrix",
    "sparse_bytes",
    "stored_bytes",
    "stored_params",
]

KINDS = ("dense", "quant", "svd", "prune", "weight_space", "admm")
_CHANNEL_BYTES = 5


def sparse_bytes(nnz: int, numel: int) -> int:
    """Bytes of ``nnz`` float32 values and their positions in a tensor of ``numel`` entries."""
    if nnz == 0:
        return 0
    index = 2 if numel <= 65536 else 4
    return 4 * nnz + min(math.ceil(numel / 8), nnz * index)


def _quant_bytes(params: int, channels: int, bits: int, group: int | None = None) -> int:
    if group:
        columns = math.ceil(params / max(channels, 1))
        return math.ceil(params * bits / 8) + channels * (2 * max(math.ceil(columns / group), 1) + 1)
    return math.ceil(params * bits / 8) + _CHANNEL_BYTES * channels


@dataclass(frozen=True)
class MenuOption:
    """One way to store one layer.

    Attributes
    ----------
    layer, kind : str
    rank, nnz : int
        Of the factorised kinds (0 for ``dense`` and ``quant``).
    bits : int or None
        Bit width of the weights (``quant``) or of both factors; None for float32.
    group : int or None
        ``quant`` only: a float16 scale per this many input columns (None: per output channel).
    params, bytes : int
        Exact stored weight values and bytes (see the module docstring).
    error : float
        Relative post-activation error of the layer on the calibration columns.
    output_error : float
        Relative error of the network's output with only this layer changed.
    loss : float
        Increase of the task loss with only this layer changed (NaN until scored, e.g. by
        :func:`cetopt.lowrank.score_menu`): the quantity the bit allocation minimises.
    act_bits : int or None
        ``quant`` only: the layer's input activations quantized at this many bits as the int8
        runtime runs them (``cetopt.deploy``, ``fake-int8``); None: float activations. Options
        with activation bits join a menu only under a BOPs budget
        (``joint_compress(bops_budget=...)``); their ``loss`` adds the activations' own measured
        loss increase to the weights'.
    """

    layer: str
    kind: str
    rank: int
    nnz: int
    bits: int | None
    params: int
    bytes: int
    error: float
    fit: LowRankSparse | None = field(default=None, repr=False, compare=False)
    output_error: float = float("nan")
    approx: torch.Tensor | None = field(default=None, repr=False, compare=False)
    loss: float = float("nan")
    group: int | None = None
    act_bits: int | None = None

    @property
    def label(self) -> str:
        parts = [self.kind]
        if self.rank:
            parts.append(f"r{self.rank}")
        if self.nnz:
            parts.append(f"nnz{self.nnz}")
        if self.bits:
            parts.append(f"{self.bits}b")
        if self.group:
            parts.append(f"g{self.group}")
        if self.act_bits:
            parts.append(f"a{self.act_bits}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        keys = ("layer", "kind", "rank", "nnz", "bits", "group", "params", "bytes", "error", "output_error")
        keys += ("loss", "act_bits")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class MenuPlan:
    """One option per layer, chosen by :meth:`Menu.choose`."""

    options: dict[str, MenuOption]
    resource: str
    budget: float
    objective: str
    status: str
    bound: float | None
    solver: str

    @property
    def params(self) -> int:
        return sum(o.params for o in self.options.values())

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.options.values())

    @property
    def predicted_error(self) -> float:
        """Summed error (of the plan's objective) of the chosen options."""
        return sum(getattr(o, self.objective) for o in self.options.values())

    def to_dict(self) -> dict:
        return {
            "resource": self.resource,
            "budget": self.budget,
            "objective": self.objective,
            "params": self.params,
            "bytes": self.bytes,
            "predicted_error": self.predicted_error,
            "status": self.status,
            "bound": self.bound,
            "solver": self.solver,
            "choice": {name: o.label for name, o in self.options.items()},
        }


@dataclass
class Menu:
    """Per-layer options with their measured error and exact cost (see :func:`build_menu`)."""

    layers: list[str]
    options: dict[str, list[MenuOption]]

    @property
    def dense_params(self) -> int:
        return sum(self.options[n][0].params for n in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(self.options[n][0].bytes for n in self.layers)

    def table(
        self, kinds: Sequence[str] | None = None, objective: str = "output_error"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(error, params, bytes, allowed)``, shape (layers, max options); ``dense`` is always allowed."""
        width = max(len(self.options[n]) for n in self.layers)
        arrays = [np.zeros((len(self.layers), width)) for _ in range(3)]
        allowed = np.zeros((len(self.layers), width), dtype=bool)
        keep = set(KINDS if kinds is None else kinds) | {"dense"}
        for i, name in enumerate(self.layers):
            for j, o in enumerate(self.options[name]):
                arrays[0][i, j], arrays[1][i, j] = getattr(o, objective), o.params
                arrays[2][i, j] = o.bytes
                allowed[i, j] = o.kind in keep
        return (*arrays, allowed)

    def choose(
        self,
        budget: float,
        *,
        resource: str = "params",
        kinds: Sequence[str] | None = None,
        quantized_factors: bool = True,
        objective: str = "output_error",
        solver="highs",
        time_limit: float | None = None,
        use_greedy: bool = True,
    ) -> MenuPlan:
        """Pick one option per layer minimising the summed error within ``budget``.

        Parameters
        ----------
        budget : float
            Parameters or bytes, summed over the menu's layers.
        resource : {"params", "bytes"}
        kinds : sequence of str, optional
            Kinds allowed (``dense`` always is); default all.
        quantized_factors : bool
            Allow factorised options whose factors are quantized.
        objective : {"output_error", "error"}
            The network's output error per layer change, or the layer's post-activation error.
        solver, time_limit, use_greedy
            As in :func:`cetopt.allocation.choose_options`.

        Raises
        ------
        InfeasibleBudgetError
            The budget is below the smallest reachable total.
        """
        if resource not in ("params", "bytes"):
            raise ValueError(f"resource must be 'params' or 'bytes', got {resource!r}")
        unknown = sorted(set(kinds or ()) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; known: {KINDS}")
        if objective not in ("output_error", "error", "loss"):
            raise ValueError(f"objective must be 'output_error', 'error' or 'loss', got {objective!r}")
        error, params, size, allowed = self.table(kinds, objective)
        floats, factored = self._masks()
        if resource == "params":
            allowed &= floats
        if not quantized_factors:
            allowed &= floats | ~factored
        cost_size = params if resource == "params" else size
        out = choose_options(
            error,
            cost_size,
            float(budget),
            allowed=allowed,
            solver=solver,
            time_limit=time_limit,
            use_greedy=use_greedy,
        )
        chosen = {n: self.options[n][int(k)] for n, k in zip(self.layers, out.choice)}
        return MenuPlan(chosen, resource, float(budget), objective, out.status, out.bound, out.solver)

    def _masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Options in float32 (a parameter budget does not see bits), and factorised options."""
        width = max(len(self.options[n]) for n in self.layers)
        floats = np.zeros((len(self.layers), width), dtype=bool)
        factored = np.zeros_like(floats)
        for i, name in enumerate(self.layers):
            for j, o in enumerate(self.options[name]):
                floats[i, j] = o.bits is None
                factored[i, j] = o.kind not in ("dense", "quant")
        return floats, factored

    @in_eval_mode("model")
    def apply(self, model: nn.Module, plan: MenuPlan) -> nn.Module:
        """Write ``plan`` back through the rewriter; ``model`` is not modified."""
        modules = dict(model.named_modules())
        decisions = []
        for name, o in plan.options.items():
            if o.kind == "quant":
                decisions.append(Quantize(name, o.bits, group_size=o.group))
            elif o.kind != "dense":
                decisions.append(factorize_decision(name, modules[name], o.fit))
                if o.bits:
                    decisions += [Quantize(f"{name}.first", o.bits), Quantize(f"{name}.second", o.bits)]
        return rewrite(model, decisions)

    @in_eval_mode("model")
    def refit_sequential(
        self,
        model: nn.Module,
        plan: MenuPlan,
        calibration,
        *,
        max_columns: int = 2048,
        iterations: int = 20,
        seed: int = 0,
    ) -> MenuPlan:
        """Refit ``plan``'s activation-aware layers one by one on inputs from the compressed network.

        In menu order, each ``admm`` layer (float or with quantized factors) is fitted again at the
        same rank and nonzeros, starting from its menu fit, on the inputs it sees once the layers
        before it carry their (refitted) choices, to match its original post-activation output in
        the uncompressed network (the target of :func:`cetopt.lowrank.fit_admm` with
        ``target_inputs``). The other layers keep their options. The refitted options carry
        their new layer error (against the original output) and no output error (NaN).

        Parameters
        ----------
        model : nn.Module
            The model the menu was built on; never modified.
        plan : MenuPlan
            From :meth:`choose`.
        calibration : Tensor or iterable of batches
            As in :func:`build_menu`.
        max_columns, iterations, seed
            As in :func:`build_menu` (the same ``seed`` keeps original and compressed columns aligned).

        Returns
        -------
        MenuPlan
            Same ranks, at most the same nonzeros, so at most the same parameters.
        """
        chosen = dict(plan.options)
        for i, name in enumerate(self.layers):
            o = chosen.get(name)
            if o is None or o.kind != "admm":
                continue
            upstream = {n: chosen[n] for n in self.layers[:i] if n in chosen}
            current = self.apply(model, replace(plan, options=upstream))
            original = collect(model, calibration, [name], max_columns=max_columns, seed=seed)[name]
            seen = collect(current, calibration, [name], max_columns=max_columns, seed=seed)[name]
            fit = fit_layer(
                seen, o.rank, o.nnz, "admm", iterations=iterations, init=o.fit, target_inputs=original.inputs
            )
            chosen[name] = _refit_option(seen, original, fit, o.bits)
        return replace(plan, options=chosen)

    def to_dict(self) -> dict:
        return {n: [o.to_dict() for o in self.options[n]] for n in self.layers}


def _refit_option(seen: LayerData, original: LayerData, fit: LowRankSparse, bits: int | None) -> MenuOption:
    """An ``admm`` option for a sequential refit; its error is against the original output."""
    option = (
        _float_option(seen, "admm", fit)
        if bits is None
        else _quantized_factor_option(seen, "admm", fit, bits)
    )
    ref = original.output(original.weight)
    error = float((seen.output(option.approx) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
    return replace(option, error=error, output_error=float("nan"))


def _grid(full: int, fractions: Sequence[float]) -> list[int]:
    return sorted({max(1, round(f * full)) for f in fractions if round(f * full) < full} or {1})


def _option(data: LayerData, kind, rank, nnz, bits, params, size, approx, fit=None) -> MenuOption:
    error = data.relative_error(approx)
    return MenuOption(data.name, kind, rank, nnz, bits, params, size, error, fit, approx=approx)


def _float_option(data: LayerData, kind: str, fit: LowRankSparse) -> MenuOption:
    m, n = data.weight.shape
    size = 4 * fit.rank * (m + n) + sparse_bytes(fit.nnz, m * n)
    approx = (fit.left.float() @ fit.right.float() + fit.sparse.float()).double()  # as written back
    return _option(data, kind, fit.rank, fit.nnz, None, fit.params, size, approx, fit)


def _dequantized(weight: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """What :class:`~cetopt.graph.Quantize` stores for a float32 weight, dequantized."""
    qw = quantize_weight(weight.to(torch.float32), bits, group_size=group)
    return qw.dequantize().to(torch.float64)


def _quantized_factor_option(data: LayerData, kind: str, fit: LowRankSparse, bits: int) -> MenuOption:
    m, n = data.weight.shape
    r = fit.rank
    approx = _dequantized(fit.left, bits) @ _dequantized(fit.right, bits) + fit.sparse.float().double()
    size = _quant_bytes(r * n, r, bits) + _quant_bytes(m * r, m, bits) + sparse_bytes(fit.nnz, m * n)
    return _option(data, kind, r, fit.nnz, bits, fit.params, size, approx, fit)


def option_matrix(option: MenuOption, weight: torch.Tensor) -> torch.Tensor:
    """The weight matrix (float64, ``m × n``) that ``option`` stores for a layer whose matrix is ``weight``.

    The option's ``approx`` when it carries one; otherwise what the menu measured: float32 factors
    and sparse values as written back, factors and ``quant`` weights rounded to nearest by
    :class:`~cetopt.graph.Quantize`'s quantizer.
    """
    if option.approx is not None:  # a weight measured as applied (e.g. GPTQ-rounded codes)
        return option.approx.to(torch.float64)
    if option.kind == "dense":
        return weight.to(torch.float64)
    if option.kind == "quant":
        return _dequantized(weight, option.bits, option.group)
    fit = option.fit
    if option.bits is None:
        return (fit.left.float() @ fit.right.float() + fit.sparse.float()).double()
    return (
        _dequantized(fit.left, option.bits) @ _dequantized(fit.right, option.bits)
        + fit.sparse.float().double()
    )


def _quant_option(data: LayerData, bits: int, group: int | None = None) -> MenuOption:
    m, n = data.weight.shape
    approx = _dequantized(data.weight, bits, group)
    option = _option(data, "quant", 0, 0, bits, m * n, _quant_bytes(m * n, m, bits, group), approx)
    return replace(option, group=group)


def _fits(data: LayerData, grids: dict, kinds: set, iterations: int, bar) -> list[tuple[str, LowRankSparse]]:
    """Every factorised fit of one layer; the Gram matrix, its factors and W's SVD are shared."""
    m, n = data.weight.shape
    full = min(m, n)
    fits: list[tuple[str, LowRankSparse]] = []
    if "svd" in kinds:
        fits += [("svd", fit) for fit in fit_svd_ranks(data.weight, _grid(full, grids["rank_fractions"]))]
    if "prune" in kinds:
        densities = [d for d in grids["prune_densities"] if round(d * m * n)]
        fits += [("prune", fit_layer(data, 0, round(d * m * n), "prune")) for d in densities]
    ls = [
        (r, round(d * m * n))
        for r in (_grid(full, grids["ls_rank_fractions"]) if {"weight_space", "admm"} & kinds else [])
        for d in grids["ls_densities"]
    ]
    bar.reset(total=len(ls))
    for r, k in ls:
        ws = fit_layer(data, r, k, "weight_space")
        if "weight_space" in kinds:
            fits.append(("weight_space", ws))
        if "admm" in kinds:
            fits.append(("admm", fit_layer(data, r, k, "admm", iterations=iterations, init=ws)))
        bar.update()
    return fits


def _layer_options(data: LayerData, bits, factor_bits, grids: dict, kinds: set, iterations: int, bar, groups):
    m, n = data.weight.shape
    options = [_option(data, "dense", 0, 0, None, m * n, 4 * m * n, data.weight)]
    if "quant" in kinds:
        options += [_quant_option(data, b, g) for b, g in zip(bits, groups)]
    for kind, fit in _fits(data, grids, kinds, iterations, bar):
        if fit.params >= m * n:
            continue
        options.append(_float_option(data, kind, fit))
        if fit.rank:
            options += [_quantized_factor_option(data, kind, fit, b) for b in factor_bits]
    return options


def _quant_only_options(model: nn.Module, name: str, x: torch.Tensor, bits, groups) -> list[MenuOption]:
    """``dense`` and the ``quant`` options of a layer that cannot be unfolded (a grouped conv)."""
    module = dict(model.named_modules())[name]
    weight = module.weight.detach().reshape(module.weight.shape[0], -1).to(torch.float64)
    m, n = weight.shape
    approx = [_dequantized(weight, b, g) for b, g in zip(bits, groups)]
    errors = layer_errors(model, name, x, approx)
    options = [MenuOption(name, "dense", 0, 0, None, m * n, 4 * m * n, 0.0, approx=weight)]
    for (b, g), w, error in zip(zip(bits, groups), approx, errors):
        size = _quant_bytes(m * n, m, b, g)
        options.append(MenuOption(name, "quant", 0, 0, b, m * n, size, error, approx=w, group=g))
    return options


@in_eval_mode("model")
def build_menu(
    model: nn.Module,
    calibration,
    *,
    layers: Sequence[str] | None = None,
    kinds: Sequence[str] = KINDS,
    bits: Sequence[int] = (2, 3, 4, 6, 8),
    groups: Sequence[int | None] | None = None,
    factor_bits: Sequence[int] = (4, 8),
    rank_fractions: Sequence[float] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
    prune_densities: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
    ls_rank_fractions: Sequence[float] = (1 / 32, 1 / 16, 1 / 8, 1 / 4),
    ls_densities: Sequence[float] = (0.01, 0.03, 0.1),
    max_columns: int = 2048,
    max_examples: int = 512,
    iterations: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> Menu:
    """Measure every option of every layer on calibration data.

    Layers are handled one at a time: their calibration columns are gathered a few layers at a time
    (:func:`cetopt.lowrank.collect_each`), every fit of a layer shares its Gram matrix, Cholesky
    factor and SVD, and the layer's output errors are measured right after its fits, all options
    in batched passes over the network after the layer (:func:`cetopt.lowrank.output_errors`).

    Parameters
    ----------
    model : nn.Module
        Never modified.
    calibration : Tensor or iterable of batches
    layers : sequence of str, optional
        Default every Linear/Conv1d/Conv2d (:func:`cetopt.lowrank.menu_layers`). Layers that cannot
        be decomposed (:func:`cetopt.lowrank.supported_layers` leaves them out: grouped or
        depthwise convolutions, ``padding="same"``) get ``dense`` and ``quant`` options only,
        their ``error`` measured on their own output (:func:`cetopt.lowrank.layer_errors`).
    kinds : sequence of str
        Which kinds to measure (``dense`` is always on the menu).
    bits : sequence of int
        Bit widths of the ``quant`` options.
    groups : sequence of int or None, optional
        One group size per entry of ``bits`` (``None``: per output channel), so that each
        ``quant`` option is the pair ``(bits[k], groups[k])`` — the columns of a sensitivity table
        with ``group_sizes`` (``table.bits``, ``table.groups``). Default: every option per channel.
        Factors of factorised options are quantized per channel.
    factor_bits : sequence of int
        Bit widths for the factors of every factorised option with rank ≥ 1 (empty: none).
    rank_fractions : sequence of float
        Ranks of the ``svd`` options, as fractions of ``min(m, n)``.
    prune_densities : sequence of float
        Kept fractions of the ``prune`` options.
    ls_rank_fractions, ls_densities : sequence of float
        The (rank, sparsity) grid of the L + S kinds.
    max_columns, iterations, seed
        As in :func:`cetopt.lowrank.decompose` (``iterations``: the most ADMM iterations).
    max_examples : int
        Calibration examples on which the output errors (and the errors of the layers that
        get ``quant`` options only) are measured.
    progress : bool
        Show progress bars on stderr (layers, and the (rank, sparsity) fits of the current layer).

    Returns
    -------
    Menu
        Options whose parameter count reaches the dense layer's are left out.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {KINDS}")
    names = list(layers) if layers is not None else menu_layers(model)
    modules = dict(model.named_modules())
    check_menu_layers(modules, names)
    whole = [n for n in names if is_matmul_layer(modules[n])]
    groups = [None] * len(bits) if groups is None else [g or None for g in groups]
    if len(groups) != len(bits):
        raise ValueError(f"groups has {len(groups)} entries for {len(bits)} bit widths; give one per width")
    pairs = list(zip(bits, groups))
    quant = (list(bits), groups) if "quant" in kinds else ([], [])
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"the (bits, group) quant options must be distinct, got {pairs}")
    grids = {
        "rank_fractions": rank_fractions,
        "prune_densities": prune_densities,
        "ls_rank_fractions": ls_rank_fractions,
        "ls_densities": ls_densities,
    }
    x = _calibration_inputs(calibration, max_examples)
    options: dict[str, list[MenuOption]] = {}
    each = iter(collect_each(model, calibration, whole, max_columns=max_columns, seed=seed))
    layer_bar = progress_bar(len(names), "menu: layers", progress)
    with layer_bar, progress_bar(0, "menu: L + S fits", progress) as fit_bar:
        for i, name in enumerate(names):
            layer_bar.set_description(f"menu: layer {i + 1}/{len(names)} {name}")
            if is_matmul_layer(modules[name]):
                data = next(each)
                menu = _layer_options(data, bits, factor_bits, grids, set(kinds), iterations, fit_bar, groups)
            else:
                menu = _quant_only_options(model, name, x, *quant)
            options[name] = _with_output_errors(model, name, x, menu)
            layer_bar.update()
    return Menu(names, options)


def _calibration_inputs(calibration, max_examples: int) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        return calibration[:max_examples]
    kept, count = [], 0
    for batch in calibration:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        kept.append(x[: max_examples - count])
        count += kept[-1].shape[0]
        if count >= max_examples:
            break
    return torch.cat(kept)


def _with_output_errors(model: nn.Module, name: str, x: torch.Tensor, menu: list[MenuOption]):
    """Fill ``output_error`` (network output error, only this layer changed); drop ``approx``."""
    changed = [o for o in menu if o.kind != "dense"]
    saved = to_eval(model)
    try:
        errors = iter(output_errors(model, name, x, [o.approx for o in changed]))
    finally:
        saved.restore()
    return [replace(o, output_error=0.0 if o.kind == "dense" else next(errors), approx=None) for o in menu]


def _module_bytes(module: nn.Module) -> int:
    if isinstance(module, QuantizedMixin):
        channels = module.weight_q.shape[0]
        if module.weight_group is not None:  # a float16 scale per group and a uint8 bit width
            scales = 2 * module.weight_scale.numel() + channels
        else:
            scales = _CHANNEL_BYTES * channels
        return math.ceil(module.weight_storage_bits() / 8) + scales
    if isinstance(module, (FactorizedLinear, FactorizedConv)):
        total = 0 if module.rank == 0 else _module_bytes(module.first) + _module_bytes(module.second)
        if module.sparse is not None:
            numel = math.prod(module.sparse.shape)
            total += sparse_bytes(module.sparse.values.numel(), numel)
        return total
    return 4 * module.weight.numel()


def stored_bytes(model: nn.Module, layers: Sequence[str]) -> int:
    """Bytes of the named layers' weights as they are stored in ``model`` (biases excluded)."""
    modules = dict(model.named_modules())
    return sum(_module_bytes(modules[name]) for name in layers)


def stored_params(model: nn.Module, layers: Sequence[str]) -> int:
    """Weight values of the named layers in ``model``: factors plus sparse nonzeros, biases excluded."""
    modules = dict(model.named_modules())
    total = 0
    for name in layers:
        module = modules[name]
        if isinstance(module, (FactorizedLinear, FactorizedConv)):
            total += module.first.weight.numel() + module.second.weight.numel()
            total += 0 if module.sparse is None else module.sparse.values.numel()
        elif isinstance(module, QuantizedMixin):
            total += module.weight_q.numel()
        else:
            total += module.weight.numel()
    return total
