"""The joint menu: bits × rank × sparsity per layer in one multiple-choice knapsack, in loss units.

:func:`joint_compress` is what ``cetopt.compress(..., joint=True)`` runs. It builds the layer
menus of :func:`cetopt.lowrank.build_menu` (dense; quantized at the allocation's bit widths;
truncated SVD; magnitude pruning; weight-space and activation-aware L + S; every factorised option
again with quantized factors) and gives every option one score in the units the bit allocation
minimises, the **increase of the task loss** on the calibration data with only that layer
changed:

* every option is scored by the measured loss increase along its actual weight change
  (:func:`score_menu`; the network suffix from the layer on, :mod:`cetopt.analysis.replay`), the
  ``quant`` options on their GPTQ-rounded codes (:func:`gptq_quant_options`: the codes the
  write-back will round, not round-to-nearest ones), since the other kinds' fits are
  activation-aware too;
* the bits-only plan is solved on the sensitivity table :func:`cetopt.compress` allocates bits
  with (same estimator, same numbers, same knapsack), so it *is* ``compress``'s plan.

Plans are applied as :func:`cetopt.compress` applies a bit plan (:func:`apply_options`): the
factorised layers are written back in float32 first, then every quantized weight — plain layers
and the factors of factorised ones — goes through the same :func:`cetopt.quantize` call, with
GPTQ rounding and bias correction, layer by layer (sequential calibration).

Per-layer scores ignore how errors add up. So the search is checked against the truth: the joint
plan, the bits-only plan and the single-kind plans (low rank only, sparsity only) at the same byte
budget are all applied and their calibration loss measured; the joint plan is then refined — every
option re-scored on the network whose earlier layers carry the current plan's choices (the
measured interaction, layer by layer as sequential calibration goes), the knapsack solved again,
the new plan applied and measured. Everything is fitted on a fit split of the calibration data;
the plans are compared on the held-out check split (:func:`prefer_candidate`): a refined plan
replaces the plan it refines, and the best remaining plan replaces bits only, only past a paired,
Bonferroni-corrected noise margin. Otherwise bits only — ``compress``'s plan and model — is
returned. Where the budget is below every bits-only plan (2-bit codes plus the per-channel
scales exceed it), the other candidates still compete and the result lists bits-only as
infeasible.

Options are plain data records (:class:`cetopt.lowrank.MenuOption`): a new kind joins by adding
its options, with their bytes and loss, to each layer's list; the search stays one
multiple-choice knapsack. Group sizes are ``quant`` options at ``(bits, group)``; under a BOPs
budget (``bops_budget=``) activation bits are ``quant`` options at ``(bits, act_bits)``
(:func:`activation_options`), with a BOPs row (:func:`option_bops`) beside the byte row.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy import stats
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.allocation import Plan, choose_options, fp32_weight_bytes, parse_budget
from cetopt.allocation.plan import LayerValues
from cetopt.allocation.search import relative_gap
from cetopt.analysis._common import progress_bar
from cetopt.analysis.objective import (
    _batches,
    is_reference_loss,
    next_token_loss,
    reference_batches,
    resolve_loss,
)
from cetopt.analysis.replay import measure_trials
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import InfeasibleBudgetError, JointMenuError, SolverFailedError
from cetopt.graph import rewrite
from cetopt.lowrank.decompose import factorize_decision
from cetopt.lowrank.layers import menu_layers
from cetopt.lowrank.menu import KINDS, Menu, MenuOption, build_menu, option_matrix

__all__ = [
    "SINGLE_KINDS",
    "JointCandidate",
    "JointResult",
    "activation_options",
    "apply_options",
    "check_joint_layers",
    "gptq_quant_options",
    "joint_compress",
    "option_bops",
    "prefer_candidate",
    "rescore_sequential",
    "score_menu",
    "split_calibration",
]

Keep = Callable[[MenuOption], bool]

#: The single-kind plans the joint plan is checked against: name → which options it may use.
#: ``wa`` (weight × activation bits, :func:`cetopt.deploy.allocate_wa`'s plan) is only planned
#: under a BOPs budget, when the menu has options with activation bits.
SINGLE_KINDS: dict[str, Keep] = {
    "bits": lambda o: o.kind == "quant" and not o.act_bits,  # exactly compress's options (no dense)
    "lowrank": lambda o: o.kind == "dense" or (o.kind == "svd" and o.bits is None),
    "sparse": lambda o: o.kind in ("dense", "prune"),
    "wa": lambda o: o.kind == "quant",
}


def _all(option: MenuOption) -> bool:
    return True


def _key(option: MenuOption) -> tuple[int, int | None]:
    """A ``quant`` option's column in a sensitivity table: (bits, group size or None)."""
    return (int(option.bits), option.group or None)


def _columns(table: SensitivityTable) -> dict[tuple[int, int | None], int]:
    """The table's (bits, group) options → column index."""
    groups = table.groups or (None,) * len(table.bits)
    return {(int(b), g or None): j for j, (b, g) in enumerate(zip(table.bits, groups))}


class _BitsPlan:
    """What :func:`cetopt.quantize` reads from a plan: bits and group sizes per layer."""

    def __init__(self, bits: dict[str, int], groups: dict[str, int]):
        self.bits, self.groups = bits, groups


@dataclass(frozen=True)
class JointCandidate:
    """One plan of the search, applied and measured.

    Attributes
    ----------
    name : str
        ``bits``, ``lowrank``, ``sparse``, ``joint`` or ``joint_refined_<k>``.
    options : dict
        Layer name → the chosen :class:`MenuOption`.
    predicted_loss : float
        Sum of the chosen options' scores (their ``loss``: each layer changed alone).
    solved_loss : float
        The objective the knapsack minimised for this plan (the re-scored losses for a refined
        plan; ``predicted_loss`` otherwise).
    measured_loss : float
        Calibration loss increase of the plan as applied (:func:`apply_options`), all layers at once.
    bytes : int
    status, solver : str
        What the knapsack reported.
    bound : float or None
    bops : float or None
        Σ MACs × weight bits × activation bits of the plan (:func:`option_bops`), under a BOPs
        budget; None otherwise.
    check_loss : float or None
        Loss increase on the held-out check split (never seen by the fits, GPTQ, bias correction
        or the sensitivities); None without a check split.
    """

    name: str
    options: dict[str, MenuOption] = field(repr=False)
    predicted_loss: float
    solved_loss: float
    measured_loss: float
    bytes: int
    status: str
    solver: str
    bound: float | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    check_loss: float | None = None
    check_losses: np.ndarray | None = field(default=None, repr=False, compare=False)
    bops: float | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "bops": self.bops,
            "predicted_loss": self.predicted_loss,
            "solved_loss": self.solved_loss,
            "measured_loss": self.measured_loss,
            "check_loss": self.check_loss,
            "bytes": self.bytes,
            "status": self.status,
            "solver": self.solver,
            "choice": {n: o.label for n, o in self.options.items()},
        }


@dataclass(frozen=True, eq=False)
class JointResult:
    """What :func:`joint_compress` searched and what it returned.

    Attributes
    ----------
    chosen : str
        Name of the returned candidate.
    fell_back : bool
        True when the bits-only plan was returned: no plan using low rank or sparsity beat it on
        the check split by more than the noise margin (``selection``), or, without a check split,
        had a lower calibration loss.
    candidates : list of JointCandidate
        Every plan applied and measured, in the order they were tried.
    infeasible : dict
        Single-kind plans the budget cannot reach (or no solver answered verifiably): name → message.
    base_loss : float
        Calibration loss of the uncompressed model.
    budget_bytes : float
    rank_correlation : float or None
        Spearman correlation, over the candidates, of the predicted loss (summed per-layer scores)
        with the measured loss increase of the plan as applied (None below three candidates).
    menu : Menu
        The scored menu (built and scored on the fit split).
    selection : dict
        How the returned plan was chosen: the check split's size, the best other plan on it, the
        paired mean and standard error of its per-example loss difference to bits only, the
        one-sided critical value and the decision (empty without a check split).
    final_loss : float or None
        Calibration loss increase (all the calibration data) of the returned model, re-calibrated
        on all of it; None without a check split (then it is the chosen candidate's).
    fit_table : SensitivityTable or None
        The sensitivities on the fit split (what the candidates were solved on); pass it back with
        ``menu`` to reuse both across budgets.
    bops_budget : float or None
        The BOPs budget the plans were solved under (None: bytes alone).
    activation_bits : dict
        Layer → activation bits of the returned plan's layers whose inputs are quantized (the
        returned model runs them in ``fake-int8``); empty when every activation stays float.
    """

    chosen: str
    fell_back: bool
    candidates: list[JointCandidate]
    infeasible: dict[str, str]
    base_loss: float
    budget_bytes: float
    rank_correlation: float | None
    menu: Menu = field(repr=False)
    selection: dict = field(default_factory=dict)
    final_loss: float | None = None
    fit_table: SensitivityTable | None = field(default=None, repr=False)
    bops_budget: float | None = None
    activation_bits: dict = field(default_factory=dict)

    @property
    def best(self) -> JointCandidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    def candidate(self, name: str) -> JointCandidate | None:
        return next((c for c in self.candidates if c.name == name), None)

    def summary(self) -> str:
        """The candidates (predicted and measured loss increase, bytes) and the chosen options."""
        rows = [("plan", "bytes", "predicted Δloss", "measured Δloss", "check Δloss", "")]
        for c in self.candidates:
            mark = "<- chosen" if c.name == self.chosen else ""
            check = "" if c.check_loss is None else f"{c.check_loss:.4g}"
            values = (f"{c.bytes}", f"{c.predicted_loss:.4g}", f"{c.measured_loss:.4g}", check)
            rows.append((c.name, *values, mark))
        rows += [(name, "infeasible", "", "", "", "") for name in self.infeasible]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths[:5]))
        lines.append("")
        lines += [f"  {n}: {o.label}" for n, o in self.best.options.items()]
        rho = "n/a" if self.rank_correlation is None else f"{self.rank_correlation:.2f}"
        note = " (fell back to the bits-only plan)" if self.fell_back else ""
        final = self.best.measured_loss if self.final_loss is None else self.final_loss
        lines.append(
            f"joint menu: chose {self.chosen}{note}; calibration loss {self.base_loss:.4g} "
            f"+ {final:.4g}; predicted vs measured rank correlation {rho}"
        )
        sel = self.selection
        if sel.get("difference_mean") is not None:
            lines.append(
                f"check split ({sel['check_examples']} examples): {sel['champion']} − bits "
                f"{sel['difference_mean']:.4g} ± {sel['difference_stderr']:.4g} (z {sel['z']:.2f}): "
                f"{sel['decision']}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "fell_back_to_bits": self.fell_back,
            "base_loss": self.base_loss,
            "budget_bytes": self.budget_bytes,
            "rank_correlation": self.rank_correlation,
            "candidates": [c.to_dict() for c in self.candidates],
            "infeasible": dict(self.infeasible),
            "selection": dict(self.selection),
            "final_loss": self.final_loss,
            "bops_budget": self.bops_budget,
            "activation_bits": dict(self.activation_bits),
        }


def _dataset_loss(model: nn.Module, batches, loss_fn) -> float:
    """Mean loss over ``batches``, weighted by batch size as :func:`measure_trials` sums it."""
    total = sum(len(x) for x, _ in batches)
    value = None
    with torch.no_grad():
        for x, y in batches:
            part = loss_fn(model(x), y) * (len(x) / total)
            value = part if value is None else value + part
    return float(value)


def _example_losses(model: nn.Module, batches, loss_fn) -> np.ndarray:
    """``loss_fn`` on every example alone (one forward pass per batch), in batch order."""
    out: list[float] = []
    with torch.no_grad():
        for x, y in batches:
            pred = model(x)
            out += [float(loss_fn(pred[i : i + 1], y[i : i + 1])) for i in range(len(x))]
    return np.asarray(out, dtype=np.float64)


def split_calibration(data, fraction: float, seed: int = 0) -> tuple[list, list]:
    """``(fit, check)``: the calibration batches with a random ``fraction`` of examples held out.

    Every batch gives ``round(fraction · size)`` of its examples (at least one, never all) to the
    check split, drawn with ``seed``; batches of a single example go whole, one in
    ``1 / fraction``. Both splits keep the batches' shapes apart from their length.

    Raises
    ------
    JointMenuError
        ``fraction`` is not in (0, 1), or the check split would hold fewer than two examples or the
        fit split none.
    """
    if not 0 < fraction < 1:
        raise JointMenuError(
            f"holdout must be a fraction in (0, 1) (or 0 for no check split), got {fraction!r}"
        )
    batches = _batches(data, None)
    gen = torch.Generator().manual_seed(int(seed))
    fit, check = [], []
    if all(len(x) >= 2 for x, _ in batches):
        for x, y in batches:
            n = len(x)
            k = min(max(round(fraction * n), 1), n - 1)
            order = torch.randperm(n, generator=gen)
            held, kept = order[:k].sort().values, order[k:].sort().values
            fit.append((x[kept], y[kept]))
            check.append((x[held], y[held]))
    else:
        k = round(fraction * len(batches))
        held = set(torch.randperm(len(batches), generator=gen)[:k].tolist())
        for i, batch in enumerate(batches):
            (check if i in held else fit).append(batch)
    examples = sum(len(x) for x, _ in check)
    if examples < 2 or not fit:
        total = sum(len(x) for x, _ in batches)
        raise JointMenuError(
            f"holdout={fraction} leaves {examples} of {total} calibration examples for the check "
            "split and needs at least 2 there and 1 to fit on; pass more data or holdout=0 "
            "(choose on the calibration loss itself)"
        )
    return fit, check


def prefer_candidate(
    bits_losses: np.ndarray, candidate_losses: np.ndarray, *, comparisons: int = 1, confidence: float = 0.95
) -> dict:
    """Whether a plan beats bits only on held-out examples by more than the noise margin.

    Paired per-example loss differences ``d = candidate − bits``: the candidate wins when
    ``mean(d) + z · stderr(d) < 0``, with ``z`` the one-sided normal quantile at ``confidence``,
    Bonferroni-corrected for the ``comparisons`` plans the candidate was picked among (so the
    chance of preferring a plan that is no better, on the examples' distribution, stays below
    ``1 − confidence``).

    Returns
    -------
    dict
        ``difference_mean``, ``difference_stderr``, ``z``, ``margin`` and ``prefer`` (bool).
    """
    d = np.asarray(candidate_losses, dtype=np.float64) - np.asarray(bits_losses, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise JointMenuError(f"need at least two paired check losses, got {d.shape}")
    if not 0 < confidence < 1:
        raise JointMenuError(f"confidence must be in (0, 1), got {confidence!r}")
    mean = float(d.mean())
    stderr = float(d.std(ddof=1) / np.sqrt(len(d)))
    z = float(stats.norm.ppf(1 - (1 - confidence) / max(int(comparisons), 1)))
    return {
        "difference_mean": mean,
        "difference_stderr": stderr,
        "z": z,
        "margin": z * stderr,
        "prefer": bool(mean + z * stderr < 0),
    }


def _scoring(model: nn.Module, data, loss_fn) -> tuple[list, Callable]:
    """The batches and loss callable for scoring on ``model`` (a float model): a reference loss
    (``"kl_to_float"``) gets ``model``'s own logits as the targets."""
    loss_fn = resolve_loss(loss_fn)
    reference = is_reference_loss(loss_fn)
    batches = _batches(data, None, self_targets=reference or loss_fn is next_token_loss)
    return (reference_batches(model, batches) if reference else batches), loss_fn


def _trial_weight(option: MenuOption, weight: torch.Tensor) -> torch.Tensor:
    """The layer weight (its own shape and dtype) that ``option`` stands for."""
    return (
        option_matrix(option, weight.detach().reshape(weight.shape[0], -1))
        .reshape(weight.shape)
        .to(weight.dtype)
    )


def _measure_layer(model: nn.Module, name: str, options, batches, loss_fn, bar=None) -> np.ndarray:
    """Loss increase of each option of layer ``name`` on ``model``, only that layer changed."""
    weight = dict(model.named_modules())[name].weight
    if not options:
        return np.zeros(0)
    weights = [_trial_weight(o, weight) for o in options]
    trials = [(name, lambda w=w: w) for w in weights]
    losses, base, _ = measure_trials(model, batches, loss_fn, trials, bar)
    return np.asarray(losses) - base


@in_eval_mode("model")
def score_menu(
    model: nn.Module,
    menu: Menu,
    data,
    table: SensitivityTable | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None = None,
    progress: bool = False,
) -> Menu:
    """A copy of ``menu`` with every option's ``loss`` filled in (loss units).

    Parameters
    ----------
    model : nn.Module
        The model the menu was built on; not modified.
    menu : Menu
    data : iterable of (inputs, targets)
        Calibration batches; the loss is averaged over all of them.
    table : SensitivityTable, optional
        If given, ``quant`` options take its values (the bits it has), so a bits-only plan from the
        menu is the plan :func:`cetopt.allocate` gives on it; options it lacks are measured.
    loss_fn : callable or str, optional
        ``loss_fn(outputs, targets)``, ``"next_token"`` or ``"kl_to_float"`` (against ``model``'s
        own outputs), as in :func:`cetopt.sensitivity`; default cross-entropy.
    progress : bool
    """
    batches, loss_fn = _scoring(model, data, loss_fn)
    rows = {} if table is None else {n: i for i, n in enumerate(table.layers)}
    cols = {} if table is None else _columns(table)

    def from_table(o: MenuOption) -> bool:
        return o.kind == "quant" and o.layer in rows and _key(o) in cols

    scored: dict[str, list[MenuOption]] = {}
    total = sum(1 for n in menu.layers for o in menu.options[n] if o.kind != "dense" and not from_table(o))
    with progress_bar(total * len(batches), "joint menu: measure options", progress) as bar:
        for name in menu.layers:
            opts = menu.options[name]
            todo = [o for o in opts if o.kind != "dense" and not from_table(o)]
            values = iter(_measure_layer(model, name, todo, batches, loss_fn, bar))
            out = []
            for o in opts:
                if o.kind == "dense":
                    loss = 0.0
                elif from_table(o):
                    loss = float(table.values[rows[name], cols[_key(o)]])
                else:
                    loss = float(next(values))
                out.append(replace(o, loss=loss))
            scored[name] = out
    return Menu(list(menu.layers), scored)


@in_eval_mode("model")
def gptq_quant_options(
    model: nn.Module, menu: Menu, data, *, act_order: bool = True, progress: bool = False
) -> Menu:
    """A copy of ``menu`` whose ``quant`` options carry (``approx``) their GPTQ-rounded weights.

    :func:`cetopt.quant.gptq_option_weights` per (bit width, group size): one
    :func:`cetopt.quantize` call with ``gptq=data``, every menu layer with that option, each rounded
    on the float model's inputs; the options' ``loss`` is reset (NaN) so that :func:`score_menu`
    measures them on those weights. ``act_order`` as in :func:`cetopt.quantize`.
    """
    from cetopt.quant.apply import gptq_option_weights

    keys = {_key(o) for n in menu.layers for o in menu.options[n] if o.kind == "quant"}
    widths = sorted(keys, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    rounded: dict[tuple[str, tuple[int, int | None]], torch.Tensor] = {}
    with progress_bar(len(widths), "joint menu: GPTQ per bit width", progress) as bar:
        for b, g in widths:
            layers = [
                n
                for n in menu.layers
                if any(o.kind == "quant" and _key(o) == (b, g) for o in menu.options[n])
            ]
            weights = gptq_option_weights(model, layers, [(b, g)], data, act_order=act_order)[(b, g)]
            for n in layers:
                rounded[(n, (b, g))] = weights[n].reshape(weights[n].shape[0], -1).to(torch.float64)
            bar.update(1)
    options = {
        n: [
            replace(o, approx=rounded[(n, _key(o))], loss=float("nan")) if o.kind == "quant" else o
            for o in menu.options[n]
        ]
        for n in menu.layers
    }
    return Menu(list(menu.layers), options)


@in_eval_mode("model")
def rescore_sequential(
    model: nn.Module,
    menu: Menu,
    chosen: Mapping[str, MenuOption],
    data,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Every option's loss increase with the layers before it carrying ``chosen``: the interaction.

    In menu order, layer ``i``'s options are measured on the network whose layers ``< i`` hold
    their chosen option's weight (factors and sparse parts as stored, quantized weights rounded to
    nearest), against that network's own loss; then layer ``i`` takes its chosen option and the next
    layer is measured. The sum of the chosen options' re-scored values is the measured loss increase
    of the whole plan (telescoping, without GPTQ or bias correction).

    Returns
    -------
    dict
        Layer name → array of loss increases, one per option of ``menu.options[name]``.
    """
    batches, loss_fn = _scoring(model, data, loss_fn)
    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    originals = {n: modules[n].weight.detach().clone() for n in menu.layers}
    scores: dict[str, np.ndarray] = {}
    total = sum(len(menu.options[n]) for n in menu.layers) * len(batches)
    with progress_bar(total, "joint menu: re-score in sequence", progress) as bar, torch.no_grad():
        for name in menu.layers:
            layer = modules[name]
            saved = layer.weight.data
            layer.weight.data = originals[name]
            try:
                scores[name] = _measure_layer(work, name, menu.options[name], batches, loss_fn, bar)
            finally:
                layer.weight.data = saved
            if name in chosen:
                layer.weight.data = _trial_weight(chosen[name], originals[name])
    return scores


@in_eval_mode("model")
def apply_options(
    model: nn.Module,
    options: Mapping[str, MenuOption],
    data=None,
    *,
    gptq: bool = True,
    bias_correction: bool = True,
    sequential: bool = True,
    act_order: bool = True,
    activation_method: str = "minmax",
    progress: bool = False,
) -> nn.Module:
    """Write the chosen options into a copy of ``model`` as :func:`cetopt.compress` writes a bit plan.

    Factorised options are written back in float32 (:class:`~cetopt.graph.Factorize`); then every
    quantized weight — ``quant`` layers and the two factors of factorised options with ``bits`` —
    goes through one :func:`cetopt.quantize` call on that model, with GPTQ rounding and bias
    correction on ``data`` (layer by layer when ``sequential``), exactly the call ``compress`` makes.
    With only ``quant`` options the result is ``compress``'s model for the same bits.

    Options with activation bits (``act_bits``) then get their input activations quantized as
    :mod:`cetopt.deploy` runs them: the grids are calibrated on ``data`` (``activation_method``,
    :func:`cetopt.deploy.calibrate_activations`) and the result is
    ``cetopt.deploy.runtime(weights, "fake-int8", activations=...)`` (BatchNorms folded), with
    every other layer's activations left float.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    options : mapping
        Layer name → :class:`MenuOption` (layers not named stay as they are).
    data : iterable of (inputs, targets), optional
        Calibration batches; needed when ``gptq`` or ``bias_correction``.
    gptq, bias_correction, sequential, act_order, progress
        As in :func:`cetopt.compress`.
    activation_method : {"minmax", "percentile", "mse"}
        The activation ranges of options with ``act_bits``.
    """
    from cetopt.quant.apply import quantize

    acts = {name: int(o.act_bits) for name, o in options.items() if o.act_bits}
    if acts and data is None:
        raise JointMenuError(
            f"options with activation bits ({sorted(acts)[:3]}...) need calibration data for "
            "their activation ranges; pass data="
        )

    modules = dict(model.named_modules())
    decisions = [
        factorize_decision(name, modules[name], o.fit)
        for name, o in options.items()
        if o.kind not in ("dense", "quant")
    ]
    base = rewrite(model, decisions) if decisions else model
    bits: dict[str, int] = {}
    groups: dict[str, int] = {}
    for name, o in options.items():
        if o.kind == "quant":
            bits[name] = int(o.bits)
            if o.group:
                groups[name] = int(o.group)
        elif o.kind != "dense" and o.bits:
            bits[f"{name}.first"] = bits[f"{name}.second"] = int(o.bits)
    if not bits:
        return base if decisions else copy.deepcopy(model).eval()
    calibrate = data is not None and (gptq or bias_correction)
    weights = quantize(
        base,
        _BitsPlan(bits, groups),
        gptq=data if gptq and data is not None else None,
        bias_correction=data if bias_correction and data is not None else None,
        sequential=sequential and calibrate,
        act_order=act_order,
        progress=progress,
    )
    return _quantize_activations(weights, acts, data, activation_method) if acts else weights


def _quantize_activations(model: nn.Module, bits: Mapping[str, int], data, method: str) -> nn.Module:
    """``model`` with the named layers' inputs quantized at ``bits`` (``fake-int8``), the rest float."""
    from cetopt.deploy.activations import calibrate_activations
    from cetopt.deploy.runtime import deployment_model, runtime

    deploy = deployment_model(model).eval()
    ranges = calibrate_activations(deploy, _batches(data, None), bits=dict(bits), method=method)
    return runtime(model, "fake-int8", activations=ranges)


def option_bops(option: MenuOption, macs: float, shape: tuple[int, int]) -> float:
    """Bit operations of one option: MACs × weight bits × activation bits, as the deploy allocation.

    ``macs`` is the dense layer's multiply-accumulates per example and ``shape`` its weight
    matrix ``(m, n)``. ``dense`` and ``quant`` options: ``macs × w × a`` (``w = bits`` or 32,
    ``a = act_bits`` or 32). A factorised option runs its two factors (``r(m + n)`` of the
    ``m·n`` weights per output position) at its factor bits with float activations, and its
    sparse part (``nnz`` of them) in float32: ``macs / (m·n) × (r(m + n) · w · 32 + nnz · 32 · 32)``.
    """
    w, a = option.bits or 32, option.act_bits or 32
    if option.kind in ("dense", "quant"):
        return float(macs) * w * a
    m, n = shape
    positions = float(macs) / max(m * n, 1)
    return positions * (option.rank * (m + n) * w * 32 + option.nnz * 32 * 32)


def activation_options(
    model: nn.Module,
    menu: Menu,
    data,
    activation_bits: Sequence[int] = (8,),
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None = None,
    method: str = "minmax",
) -> Menu:
    """A copy of a scored ``menu`` in which every per-channel ``quant`` option of at most 8 bits
    also comes with its input activations at each of ``activation_bits``.

    The activations' own cost is :func:`cetopt.deploy.activation_sensitivity` on ``data``: the
    measured loss increase of quantizing only that layer's input at ``a`` bits, on the model with
    every menu layer at 8-bit weights (the deploy allocation's table); an option at ``(w, a)``
    scores its weights' ``loss`` plus that (the sum :func:`cetopt.deploy.allocate_wa` minimises).
    Group-wise options and weights above 8 bits stay float-activation only (the int8 kernels run
    neither). Options that already carry activation bits are kept as they are.

    Raises
    ------
    JointMenuError
        An activation bit width is not an integer in [2, 8], or the menu is not scored.
    """
    from cetopt.deploy.allocation import activation_sensitivity
    from cetopt.quant.apply import quantize

    widths = _activation_widths(activation_bits)
    if any(np.isnan(o.loss) for n in menu.layers for o in menu.options[n]):
        raise JointMenuError("activation_options needs a scored menu (score_menu first)")
    if any(o.act_bits for n in menu.layers for o in menu.options[n]):
        return Menu(list(menu.layers), {n: list(menu.options[n]) for n in menu.layers})
    batches, loss_fn = _scoring(model, data, loss_fn)  # a reference loss: the float model's outputs
    eight = quantize(model, {n: 8 for n in menu.layers})
    values = activation_sensitivity(
        eight, batches, widths, layers=menu.layers, method=method, loss_fn=loss_fn
    )
    options = {}
    for i, name in enumerate(menu.layers):
        opts = list(menu.options[name])
        opts += [
            replace(o, act_bits=a, loss=float(o.loss + values[i, j]))
            for o in menu.options[name]
            if o.kind == "quant" and not o.group and o.bits <= 8
            for j, a in enumerate(widths)
        ]
        options[name] = opts
    return Menu(list(menu.layers), options)


def _activation_widths(activation_bits: Sequence[int]) -> list[int]:
    try:
        widths = [int(a) for a in activation_bits]
    except (TypeError, ValueError):
        widths = []
    if not widths or any(a != b or not 2 <= a <= 8 for a, b in zip(widths, activation_bits)):
        raise JointMenuError(f"activation_bits must be integers in [2, 8], got {activation_bits!r}")
    if len(set(widths)) != len(widths):
        raise JointMenuError(f"activation_bits must be distinct, got {tuple(activation_bits)}")
    return widths


def _activation_part(menu: Menu) -> dict[str, np.ndarray]:
    """Per option, the activations' share of its ``loss`` (0 without activation bits)."""
    out = {}
    for name in menu.layers:
        weights = {
            (o.bits, o.group): o.loss for o in menu.options[name] if o.kind == "quant" and not o.act_bits
        }
        out[name] = np.array(
            [o.loss - weights[(o.bits, o.group)] if o.act_bits else 0.0 for o in menu.options[name]]
        )
    return out


def _solve(
    menu: Menu,
    scores: Mapping[str, np.ndarray],
    budget: float,
    keep: Keep,
    solver,
    time_limit,
    bops: tuple[Mapping[str, np.ndarray], float] | None = None,
):
    """The multiple-choice knapsack over ``menu``'s options allowed by ``keep``: one per layer.

    ``bops``: each layer's option BOPs and the BOPs budget, a second knapsack row.
    """
    width = max(len(menu.options[n]) for n in menu.layers)
    shape = (len(menu.layers), width)
    cost, size, allowed = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=bool)
    for i, name in enumerate(menu.layers):
        opts = menu.options[name]
        cost[i, : len(opts)] = scores[name]
        size[i, : len(opts)] = [o.bytes for o in opts]
        allowed[i, : len(opts)] = [keep(o) for o in opts]
    if not allowed.any(axis=1).all():
        raise InfeasibleBudgetError("some layer has no option of this kind", minimum=float("inf"))
    # a MILP answer that verification rejects (losses spanning many decades can trip a solver's
    # tolerances) is asked of the other MILP backends before giving up
    others = [name for name in ("highs", "cbc") if name != solver] if isinstance(solver, str) else []
    if bops is not None:
        ops = np.zeros(shape)
        for i, name in enumerate(menu.layers):
            ops[i, : len(menu.options[name])] = bops[0][name]
    for attempt in [solver, *others]:
        try:
            with np.errstate(invalid="ignore"):  # the hull's padding (inf − inf), masked out inside
                if bops is None:
                    out = choose_options(
                        cost, size, budget, allowed=allowed, solver=attempt, time_limit=time_limit
                    )
                else:
                    out = _choose_two(cost, size, ops, budget, bops[1], allowed, attempt, time_limit)
            break
        except SolverFailedError:
            if attempt == ([solver, *others])[-1]:
                raise
    chosen = {n: menu.options[n][int(k)] for n, k in zip(menu.layers, out.choice)}
    solved = float(cost[np.arange(len(menu.layers)), out.choice].sum())
    return chosen, solved, out


def _choose_two(cost, size, ops, budget, bops_budget, allowed, solver, time_limit):
    """The knapsack with a byte and a BOPs row, as :func:`cetopt.allocate` solves ``bops_budget``."""
    from cetopt.allocation.allocate import OptionChoice
    from cetopt.allocation.search import MultiChoice

    problem = MultiChoice(cost, [size, ops], allowed, ["byte", "BOPs"])
    limits = [float(budget), float(bops_budget)]
    for j, (name, limit) in enumerate(zip(problem.names, limits)):
        lowest = problem.minimum(j)
        if lowest > limit * (1 + 1e-12):
            raise InfeasibleBudgetError(
                f"the {name} budget of {limit:.6g} is below the minimum of {lowest:.6g} of these options",
                minimum=lowest,
            )
    incumbent = problem.incumbent(limits, None, 1e-4)
    answer = problem.solve(limits, incumbent, solver, time_limit, 1e-4)
    if problem.over_budget(answer.choice, limits):
        raise SolverFailedError("the knapsack's answer breaks a budget", None)
    return OptionChoice(answer.choice, answer.status, answer.bound, answer.solver)


def _same(a: Mapping[str, MenuOption], b: Mapping[str, MenuOption]) -> bool:
    return a.keys() == b.keys() and all(a[n] is b[n] for n in a)


def _check_menu(menu: Menu, table: SensitivityTable) -> None:
    if list(menu.layers) != list(table.layers):
        raise JointMenuError(
            f"the menu's layers {list(menu.layers)[:4]}... differ from the sensitivity table's "
            f"{list(table.layers)[:4]}...; build both on the same layers"
        )
    for name in menu.layers:
        have = {_key(o) for o in menu.options[name] if o.kind == "quant"}
        want = set(_columns(table))
        if have != want:
            raise JointMenuError(
                f"layer {name!r}: the menu's quant (bits, group) options {sorted(have, key=str)} "
                f"differ from the table's {sorted(want, key=str)}"
            )


def _fit_table(model: nn.Module, fit, table: SensitivityTable, loss_fn, seed: int) -> SensitivityTable:
    """``table``'s sensitivities again on the fit split: same estimator, same (bits, group) columns."""
    from cetopt.analysis.estimators import METHODS, sensitivity

    if table.method not in METHODS:
        raise JointMenuError(
            f"the sensitivity table's method {table.method!r} cannot be re-run on the fit split; "
            "pass sensitivity_fn= or fit_table=, or holdout=0"
        )
    options: dict = {}
    if table.groups is not None:
        options["group_sizes"] = sorted(set(table.groups), key=lambda g: -1 if g is None else g)
        grouped = [b for b, g in zip(table.bits, table.groups) if g]
        options["group_max_bits"] = max(grouped) if grouped else min(table.bits)
    return sensitivity(
        model,
        fit,
        sorted(set(table.bits)),
        table.method,
        loss_fn=loss_fn,
        layers=table.layers,
        seed=seed,
        progress=False,
        **options,
    )


def check_joint_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise :class:`JointMenuError` naming the ``layers`` a joint menu cannot hold.

    The menu holds Linear/Conv1d/Conv2d layers (:func:`cetopt.lowrank.menu_layers`); an
    embedding, say, is quantized by bit allocation but has no menu.
    """
    on_menu = set(menu_layers(model))
    off_menu = [n for n in layers if n not in on_menu]
    if not off_menu:
        return
    modules = dict(model.named_modules())
    kinds = sorted({type(modules[n]).__name__ if n in modules else "missing" for n in off_menu})
    raise JointMenuError(
        f"the joint menu holds Linear/Conv1d/Conv2d layers only; the sensitivity table also has "
        f"{off_menu[:4]}{'...' if len(off_menu) > 4 else ''} ({', '.join(kinds)}). Call "
        "cetopt.lowrank.joint_compress(model, data, table.subset(on_menu), budget, ...) with "
        "on_menu = [n for n in table.layers if n in cetopt.lowrank.menu_layers(model)] to "
        "choose for those and keep the others float, or use joint=False"
    )


@in_eval_mode("model")
def joint_compress(
    model: nn.Module,
    data,
    table: SensitivityTable,
    budget: float | str,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None = None,
    kinds: Sequence[str] = KINDS,
    factor_bits: Sequence[int] = (4, 8),
    refine: int = 2,
    singles: Sequence[str] = tuple(SINGLE_KINDS),
    holdout: float = 0.25,
    confidence: float = 0.95,
    sensitivity_fn: Callable[[list], SensitivityTable] | None = None,
    fit_table: SensitivityTable | None = None,
    solver="highs",
    time_limit: float | None = None,
    gptq: bool = True,
    bias_correction: bool = True,
    sequential: bool = True,
    act_order: bool = True,
    seed: int = 0,
    progress: bool = True,
    menu: Menu | None = None,
    menu_options: Mapping | None = None,
    keep_models: bool = False,
    refit: bool = True,
    bops_budget: float | None = None,
    activation_bits: Sequence[int] = (8,),
    activation_method: str = "minmax",
) -> tuple[nn.Module, Plan, JointResult]:
    """Choose, per layer, among quantization, low rank, sparsity and their mixes within ``budget``.

    See the module docstring for the method. Called by :func:`cetopt.compress` with
    ``joint=True``, which computes ``table`` first.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    data : iterable of (inputs, targets)
        Calibration batches (re-iterable: a list or a DataLoader).
    table : SensitivityTable
        The bit allocation's sensitivities (:func:`cetopt.sensitivity`) on ``data``; its
        ``(bits, group)`` columns are the menu's ``quant`` options (group sizes included).
    budget : float or str
        Weight bytes, ``"10x"`` or ``"3.2bits"`` (:func:`cetopt.allocation.parse_budget`).
    loss_fn : callable or str, optional
        The loss ``table`` was measured with, as in :func:`cetopt.sensitivity`: a callable
        ``loss_fn(outputs, targets)``, ``"next_token"`` or ``"kl_to_float"`` (every option, plan
        and check loss is then the KL divergence from the float model's outputs on the same
        inputs, computed once; the data's targets are not used); default cross-entropy.
    kinds : sequence of str
        Menu kinds (:data:`cetopt.lowrank.KINDS`); ``quant`` is always on.
    factor_bits : sequence of int
        Bit widths of the factors of the factorised options.
    refine : int
        Most rounds of sequential re-scoring and re-solving (0: none).
    singles : sequence of str
        Single-kind plans to measure besides ``bits`` (:data:`SINGLE_KINDS`).
    holdout : float
        Fraction of the calibration examples held out as the check split
        (:func:`split_calibration`, drawn with ``seed``): the menu, its scores, the sensitivities
        the candidates are solved on, GPTQ and bias correction all use the rest (the fit split),
        and the plans are compared on the check split. 0: no check split; the plan with the lowest
        calibration loss is returned, on the data everything was fitted on.
    confidence : float
        A plan other than bits only is returned only when its paired per-example loss difference
        to bits only on the check split is below zero with this one-sided confidence,
        Bonferroni-corrected over the plans it was the best of (:func:`prefer_candidate`).
    sensitivity_fn : callable, optional
        ``sensitivity_fn(batches) -> SensitivityTable``: the estimator of ``table`` run on the fit
        split (``cetopt.compress`` passes its own). Default: :func:`cetopt.sensitivity` with
        ``table.method`` and its columns.
    fit_table : SensitivityTable, optional
        The sensitivities on the fit split already (a previous result's ``fit_table``).
    solver, time_limit
        For the knapsacks (:func:`cetopt.allocation.choose_options`).
    gptq, bias_correction, sequential, act_order
        How plans are applied (:func:`apply_options`) and the ``quant`` options rounded
        (:func:`gptq_quant_options`), as in :func:`cetopt.compress`.
    seed : int
        The check split and the calibration-column sampling of the menu fits.
    progress : bool
    menu : Menu, optional
        A menu built (and scored or not) on ``model`` and the fit split (a previous result's
        ``menu`` with the same ``holdout`` and ``seed``), with quant options at the table's
        columns; then ``kinds``, ``factor_bits`` and ``menu_options`` are not used.
    menu_options : mapping, optional
        Other keywords of :func:`cetopt.lowrank.build_menu` (grids, ``max_columns`` ...).
    refit : bool
        With a check split, calibrate a chosen plan other than bits only again on all the data
        (default); ``False`` returns the very model the check split validated (calibrated on the
        fit split). Bits only is always ``compress``'s model, calibrated on all the data.
    keep_models : bool
        Keep every candidate's compressed model (``JointCandidate.model``, calibrated on the fit
        split), e.g. to test them all.
    bops_budget : float, optional
        A limit on Σ MACs × weight bits × activation bits (:func:`option_bops`; needs
        ``table.macs``), a second row of the same knapsack. Activation bits then join the menu
        (:func:`activation_options`): every per-channel ``quant`` option of at most 8 bits also at
        each of ``activation_bits``, scored by its weights' loss plus its activations' measured
        loss, and applied as :mod:`cetopt.deploy` runs it (``fake-int8``). Bits only is then
        ``compress(..., bops_budget=...)``'s plan (float activations, 32 bits in the BOPs), and
        ``wa`` (weight × activation bits only, :func:`cetopt.deploy.allocate_wa`'s menu) joins the
        single-kind plans.
    activation_bits : sequence of int
        Activation bit widths offered under a BOPs budget (integers in [2, 8]).
    activation_method : {"minmax", "percentile", "mse"}
        The activation ranges (:func:`cetopt.deploy.calibrate_activations`).

    Returns
    -------
    (model, plan, result)
        The compressed copy, its :class:`cetopt.Plan` (bits per layer, 32 for float layers; bytes
        and scores of the chosen options) and the :class:`JointResult`. With a check split, the
        chosen plan is applied again with GPTQ and bias correction on all the calibration data;
        when bits only is chosen, that is ``cetopt.compress``'s plan on ``table`` and its model.

    Raises
    ------
    InfeasibleBudgetError
        The budget is below the smallest plan of the whole menu.
    JointMenuError
        A given ``menu`` does not match ``table``, ``holdout`` leaves too few examples, or a BOPs
        budget comes without ``table.macs``.
    """
    t0 = time.perf_counter()
    # with a reference loss every plan is compared with the float model's outputs, computed once
    everything, loss_fn = _scoring(model, data, loss_fn)
    budget_bytes = parse_budget(budget, table)
    if menu is None:
        check_joint_layers(model, table.layers)
    unknown = sorted(set(singles) - set(SINGLE_KINDS))
    if unknown:
        raise JointMenuError(f"unknown single kinds {unknown}; known: {sorted(SINGLE_KINDS)}")
    if bops_budget is not None:
        if table.macs is None:
            raise JointMenuError("bops_budget needs table.macs (multiply-accumulates per layer)")
        if not (np.isfinite(bops_budget) and bops_budget > 0):
            raise JointMenuError(f"bops_budget must be a positive number, got {bops_budget!r}")
        _activation_widths(activation_bits)
    if holdout:
        fit, check = split_calibration(everything, holdout, seed)
        if fit_table is None:
            fit_table = (
                sensitivity_fn(fit)
                if sensitivity_fn is not None
                else _fit_table(model, fit, table, loss_fn, seed)
            )
        if list(fit_table.layers) != list(table.layers) or _columns(fit_table) != _columns(table):
            raise JointMenuError(
                "the fit split's sensitivity table has other layers or (bits, group) columns than "
                f"the table given: {fit_table!r} vs {table!r}"
            )
    else:
        fit, check, fit_table = everything, None, table
    if menu is None:
        menu = build_menu(
            model,
            fit,
            layers=table.layers,
            kinds=sorted(set(kinds) | {"quant"}, key=KINDS.index),
            bits=table.bits,
            groups=table.groups,
            factor_bits=factor_bits,
            seed=seed,
            progress=progress,
            **dict(menu_options or {}),
        )
    _check_menu(menu, table)
    if any(np.isnan(o.loss) for n in menu.layers for o in menu.options[n]):
        if gptq:
            menu = gptq_quant_options(model, menu, fit, act_order=act_order, progress=progress)
        menu = score_menu(model, menu, fit, None if gptq else fit_table, loss_fn=loss_fn, progress=progress)
    ops = None
    if bops_budget is not None:
        menu = activation_options(
            model, menu, fit, activation_bits, loss_fn=loss_fn, method=activation_method
        )
        modules = dict(model.named_modules())
        macs = dict(zip(table.layers, np.asarray(table.macs, dtype=np.float64)))
        shapes = {
            n: tuple(modules[n].weight.reshape(modules[n].weight.shape[0], -1).shape) for n in menu.layers
        }
        layer_ops = {
            n: np.array([option_bops(o, macs[n], shapes[n]) for o in menu.options[n]]) for n in menu.layers
        }
        ops = (layer_ops, float(bops_budget))
    elif any(o.act_bits for n in menu.layers for o in menu.options[n]):
        raise JointMenuError("the menu has options with activation bits; pass bops_budget= to use them")
    act_part = _activation_part(menu)
    has_acts = any(o.act_bits for n in menu.layers for o in menu.options[n])
    base_loss = _dataset_loss(model, fit, loss_fn)
    check_base = None if check is None else _example_losses(model, check, loss_fn)
    scores = {n: np.array([o.loss for o in menu.options[n]]) for n in menu.layers}

    def table_scores(t: SensitivityTable) -> dict[str, np.ndarray]:
        """The bits-only objective: the table's values on the quant options (compress's plan)."""
        rows, cols = {n: i for i, n in enumerate(t.layers)}, _columns(t)
        return {
            n: np.array(
                [t.values[rows[n], cols[_key(o)]] if o.kind == "quant" else o.loss for o in menu.options[n]]
            )
            for n in menu.layers
        }

    def apply(options, batches):
        return apply_options(
            model,
            options,
            batches,
            gptq=gptq,
            bias_correction=bias_correction,
            sequential=sequential,
            act_order=act_order,
            activation_method=activation_method,
        )

    def plan_bops(options) -> float | None:
        if ops is None:
            return None
        index = {n: {id(o): k for k, o in enumerate(menu.options[n])} for n in menu.layers}
        return float(sum(ops[0][n][index[n][id(o)]] for n, o in options.items()))

    candidates: list[JointCandidate] = []
    infeasible: dict[str, str] = {}
    best: tuple[float, nn.Module | None] = (float("inf"), None)
    planned = [("bits", SINGLE_KINDS["bits"])]
    planned += [(s, SINGLE_KINDS[s]) for s in singles if s != "bits" and (s != "wa" or has_acts)]
    planned.append(("joint", _all))
    solve_info = {}
    with progress_bar(len(planned) + refine, "joint menu: plans applied and measured", progress) as bar:

        def evaluate(name, options, solved, out):
            nonlocal best
            new = apply(options, fit)
            measured = _dataset_loss(new, fit, loss_fn) - base_loss
            held = None if check is None else _example_losses(new, check, loss_fn)
            candidates.append(
                JointCandidate(
                    name=name,
                    options=options,
                    predicted_loss=float(sum(o.loss for o in options.values())),
                    solved_loss=solved,
                    measured_loss=measured,
                    bytes=int(sum(o.bytes for o in options.values())),
                    status=out.status,
                    solver=out.solver,
                    bound=out.bound,
                    model=new if keep_models or (check is not None and not refit) else None,
                    check_loss=None if held is None else float(held.mean() - check_base.mean()),
                    check_losses=held,
                    bops=plan_bops(options),
                )
            )
            solve_info[name] = out
            if measured < best[0]:  # strictly lower: ties keep the earlier plan (bits first)
                best = (measured, new)
            bar.update(1)

        for name, keep in planned:
            try:
                objective = table_scores(fit_table) if name == "bits" else scores
                options, solved, out = _solve(menu, objective, budget_bytes, keep, solver, time_limit, ops)
            except (InfeasibleBudgetError, SolverFailedError) as exc:
                if name == "joint":
                    raise  # the joint menu holds every other plan: nothing fits
                infeasible[name] = str(exc)
                bar.update(1)
                continue
            evaluate(name, options, solved, out)
        current = candidates[-1]
        for k in range(1, refine + 1):
            if current is None:
                break
            rescored = rescore_sequential(model, menu, current.options, fit, loss_fn=loss_fn)
            # the re-scoring changes weights only: activation bits keep their measured share
            rescored = {n: rescored[n] + act_part[n] for n in menu.layers}
            try:
                options, solved, out = _solve(menu, rescored, budget_bytes, _all, solver, time_limit, ops)
            except SolverFailedError:
                break  # no verified answer on the re-scored losses: keep what was measured
            if any(_same(options, c.options) for c in candidates):
                break  # the measured interaction leads back to a plan already measured
            evaluate(f"joint_refined_{k}", options, solved, out)
            current = candidates[-1]
    rho = None
    if len(candidates) >= 3:
        value = stats.spearmanr(
            [c.predicted_loss for c in candidates], [c.measured_loss for c in candidates]
        ).statistic
        rho = None if np.isnan(value) else float(value)
    selection: dict = {}
    final_loss = None
    if check is None:
        chosen = min(candidates, key=lambda c: c.measured_loss)  # first of equals: bits
        returned, options, out = best[1], chosen.options, solve_info[chosen.name]
        bits_plan = chosen.name == "bits"
    else:
        chosen, selection = _select(candidates, confidence)
        selection["check_examples"] = len(check_base)
        selection["fit_examples"] = int(sum(len(x) for x, _ in fit))
        if chosen.name == "bits":  # compress's plan on the full table, calibrated on everything
            options, _, out = _solve(
                menu, table_scores(table), budget_bytes, SINGLE_KINDS["bits"], solver, time_limit, ops
            )
        else:
            options, out = chosen.options, solve_info[chosen.name]
        bits_plan = chosen.name == "bits"
        returned = apply(options, everything) if bits_plan or refit else chosen.model
        if not keep_models:
            candidates = [replace(c, model=None) for c in candidates]
        final_loss = _dataset_loss(returned, everything, loss_fn) - _dataset_loss(model, everything, loss_fn)
    result = JointResult(
        chosen=chosen.name,
        fell_back=chosen.name == "bits",
        candidates=candidates,
        infeasible=infeasible,
        base_loss=base_loss,
        budget_bytes=budget_bytes,
        rank_correlation=rho,
        menu=menu,
        selection=selection,
        final_loss=final_loss,
        fit_table=None if check is None else fit_table,
        bops_budget=None if bops_budget is None else float(bops_budget),
        activation_bits={n: int(o.act_bits) for n, o in options.items() if o.act_bits},
    )
    plan = _plan(table, options, bits_plan, out, budget_bytes, time.perf_counter() - t0)
    if ops is not None:
        plan = replace(plan, bops=plan_bops(options))
    return returned, plan, result


def _refinement_chain(
    others: list[JointCandidate], confidence: float, comparisons: int
) -> tuple[list[JointCandidate], list[dict]]:
    """The candidates that compete with bits only: each refined joint plan must earn its place.

    ``joint_refined_k`` replaces the plan it refines (``joint``, then the last refinement kept) only
    when it beats it on the check split past the margin (:func:`prefer_candidate`), at the same
    Bonferroni-corrected level as the test against bits only (``comparisons``: the candidates
    other than bits); otherwise the earlier, less searched plan stays (ties go to the plan with
    fewer free choices, as they go to bits only). Refinements are close variants of one plan, so
    the lowest check loss among them is mostly the check split's noise: picking it would fit the
    check split as the fit split was fitted.
    """
    chain = [c for c in others if c.name == "joint" or c.name.startswith("joint_refined_")]
    if len(chain) < 2:
        return others, []
    current, steps = chain[0], []
    for c in chain[1:]:
        test = prefer_candidate(
            current.check_losses, c.check_losses, comparisons=comparisons, confidence=confidence
        )
        steps.append({"candidate": c.name, "against": current.name, **test})
        if test["prefer"]:
            current = c
    return [c for c in others if c not in chain] + [current], steps


def _select(candidates: list[JointCandidate], confidence: float) -> tuple[JointCandidate, dict]:
    """The returned candidate by the check split: bits only unless another beats it past the noise."""
    bits = next((c for c in candidates if c.name == "bits"), None)
    others = [c for c in candidates if c.name != "bits"]
    pool, steps = _refinement_chain(others, confidence, len(others))
    champion = min(pool, key=lambda c: c.check_loss)
    chain = {"refinements": steps} if steps else {}
    if bits is None:
        return champion, {
            "champion": champion.name,
            **chain,
            "decision": "bits only is infeasible: best on the check split",
        }
    test = prefer_candidate(
        bits.check_losses, champion.check_losses, comparisons=len(others), confidence=confidence
    )
    decision = (
        f"{champion.name} beats bits only past the margin"
        if test["prefer"]
        else "bits only: no plan beats it past the margin"
    )
    return (champion if test["prefer"] else bits), {
        "champion": champion.name,
        "comparisons": len(others),
        "confidence": confidence,
        **test,
        **chain,
        "decision": decision,
    }


def _plan(
    table: SensitivityTable,
    options: Mapping[str, MenuOption],
    bits_plan: bool,
    out,
    budget_bytes: float,
    seconds: float,
) -> Plan:
    """A :class:`cetopt.Plan` for the chosen options (float layers at 32 bits)."""
    names = list(table.layers)
    chosen = [options[n] for n in names]
    bits = np.array([o.bits or 32 for o in chosen], dtype=np.int16)
    size = np.array([o.bytes for o in chosen], dtype=np.float64)
    if bits_plan:  # compress's plan: the table's values
        index = _columns(table)
        loss = np.array([table.values[i, index[_key(o)]] for i, o in enumerate(chosen)], dtype=np.float64)
    else:
        loss = np.array([o.loss for o in chosen], dtype=np.float64)
    predicted = float(loss.sum())
    exact = bits_plan  # the solver's bound is about this objective only for compress's table
    groups = {n: int(o.group) for n, o in zip(names, chosen) if o.kind == "quant" and o.group}
    return Plan(
        bits=LayerValues(names, bits),
        predicted_loss=predicted,
        bytes=float(size.sum()),
        budget_bytes=float(budget_bytes),
        fp32_bytes=fp32_weight_bytes(table),
        status=out.status,
        bound=out.bound if exact else None,
        gap=relative_gap(predicted, out.bound) if exact else None,
        solve_time=seconds,
        solver=out.solver,
        method=table.method,
        layer_bytes=LayerValues(names, size),
        layer_loss=LayerValues(names, loss),
        layer_params=LayerValues(names, np.asarray(table.params)),
        groups=LayerValues(names, np.array([groups.get(n, 0) for n in names], dtype=np.int64))
        if groups
        else {},
    )
