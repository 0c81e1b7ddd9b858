"""``compress``: sensitivity → allocation → quantization in one call."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.allocation import Plan, allocate, option_bytes, parse_budget
from cetopt.analysis import SensitivityTable, channel_bits, channel_sensitivity, sensitivity
from cetopt.errors import CetoptError, InfeasibleBudgetError, JointMenuError
from cetopt.quant.apply import quantize

__all__ = ["CompressionResult", "UniformCheck", "check_against_uniform", "compress", "uniform_plan"]


@dataclass(frozen=True, eq=False)
class CompressionResult:
    """What :func:`compress` produced: the quantized model, the plan and the sensitivity table.

    ``seconds`` holds the wall-clock time of each step (``sensitivity``, ``allocation``,
    ``quantization`` — which includes the calibration — and ``total``), ``cpu_seconds`` the CPU
    time this process spent on each (all threads; steadier than wall time on a shared machine).
    Under ``method="auto"``, ``table.meta["auto"]`` says which estimator ran and why. With
    ``joint=True``, ``joint`` holds the joint menu's search (:class:`cetopt.lowrank.JointResult`:
    every plan it applied and measured, which one it returned and whether it fell back to
    bits only), and ``plan`` puts float layers (dense or float factors) at 32 bits. With
    ``holdout``, ``check`` holds the comparison with the uniform plan (:class:`UniformCheck`).
    """

    model: nn.Module
    plan: Plan
    table: SensitivityTable
    seconds: dict = field(default_factory=dict)
    cpu_seconds: dict = field(default_factory=dict)
    joint: object | None = None
    check: UniformCheck | None = None


@in_eval_mode("model")
def compress(
    model: nn.Module,
    data,
    budget: float | str,
    *,
    method: str = "auto",
    per_channel: bool = False,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    solver="highs",
    time_limit: float | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    probes: int | None = None,
    seed: int = 0,
    progress: bool = True,
    gptq: bool = True,
    bias_correction: bool = True,
    sequential: bool = True,
    group_sizes: Sequence[int | None] | None = None,
    act_order: bool = True,
    on_step: Callable[[str], None] | None = None,
    joint: bool = False,
    joint_options: dict | None = None,
    score_gptq: bool = False,
    holdout=None,
    **allocate_options,
) -> CompressionResult:
    """Quantize ``model``'s weights to mixed precision within ``budget``.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    data : iterable of (inputs, targets)
        Calibration batches for the sensitivities (held-out data, not the test set).
    budget : float or str
        Weight bytes, ``"10x"`` (against float32) or ``"3.2bits"``.
    method : str
        Sensitivity estimator: ``"auto"`` (the cheaper of ``measured`` and ``cet`` here, see
        :mod:`cetopt.analysis.auto`) or any of :data:`cetopt.analysis.METHODS` per layer;
        ``"auto"``, ``"cet"`` or ``"measured"`` per channel.
    per_channel : bool
        Give every output channel its own bit width, from per-channel sensitivities
        (:func:`cetopt.channel_sensitivity`). The plan's rows are then ``"layer[c]"``.
    bits : sequence of int
        Candidate bit widths.
    solver, time_limit
        Passed to :func:`cetopt.allocate`.
    loss_fn, probes, seed
        Passed to :func:`cetopt.sensitivity` or :func:`cetopt.channel_sensitivity` (``probes``
        defaults to theirs: 16 per layer, 64 per channel); ``loss_fn`` also to
        :func:`check_against_uniform` with ``holdout``. ``loss_fn="kl_to_float"`` scores every
        option, and compares the plans, by the divergence of the quantized model's outputs from
        the float model's on the same inputs (with ``joint`` too: every menu option and plan).
    progress : bool
        Progress bars (on stderr) for the sensitivities and the calibration.
    gptq : bool
        Round the codes with GPTQ on ``data`` (:func:`cetopt.quant.gptq_round`), so each layer's
        output stays close; scales, bits and bytes are unchanged.
    bias_correction : bool
        Cancel each quantized layer's mean output shift, measured on ``data``
        (:func:`cetopt.quant.correct_bias`); no gradient steps.
    sequential : bool
        Run GPTQ and bias correction layer by layer on the inputs the quantized model gives each
        layer (:func:`cetopt.quant.calibrate_sequentially`; two passes over ``data`` per layer), so
        each layer also compensates the errors of the layers before it. ``False`` calibrates every
        layer at once on the float model's inputs. Ignored when both ``gptq`` and
        ``bias_correction`` are off.
    group_sizes : sequence of int or None, optional
        Scale granularities the allocation may choose per layer, e.g. ``(None, 128, 64, 32)``
        (``None``: a scale per output channel; ``g``: a float16 scale per ``g`` input columns).
        Each (bits, group) option up to 4 bits is scored and the ILP picks both, each option's
        scale bytes counted in the budget; ``plan.groups`` holds the choice. Per layer only.
    act_order : bool
        GPTQ's act-order (columns in decreasing input energy).
    on_step : callable, optional
        Called with ``"sensitivity"``, ``"allocation"`` and ``"quantization"`` as each step starts
        (the command line prints a stage line from it).
    joint : bool
        Choose per layer among quantization, low rank, sparsity and their mixes (the joint menu,
        :func:`cetopt.lowrank.joint_compress`): every option scored in the loss units of the
        sensitivities (quantized options take the table's values, the others their measured loss
        increase), one multiple-choice knapsack (``group_sizes`` add their (bits, group) options),
        plans applied as here (GPTQ, bias correction) and compared on a check split of ``data``
        that nothing was fitted on; the bits-only plan — the plan and model this call makes with
        ``joint=False`` — is returned unless another beats it there past the noise margin. Per
        layer only (not with ``per_channel``); of ``allocate_options`` it takes ``bops_budget``
        alone, which makes activation bits menu options too (``joint_options={"activation_bits":
        (4, 8)}``; the returned model then runs those layers in ``fake-int8``).
    joint_options : dict, optional
        Other keywords of :func:`cetopt.lowrank.joint_compress` (``kinds``, ``factor_bits``,
        ``refine``, ``menu_options`` ...).
    score_gptq : bool
        Score every option on the weights GPTQ rounds it to on ``data`` (``sensitivity(...,
        gptq=data)``), the perturbation that ``gptq=True`` then applies, instead of
        round-to-nearest. Per layer only.
    holdout : iterable of (inputs, targets), optional
        Batches not in ``data`` (never the test set). The allocated plan is then checked against
        the uniform plan of the same options within the budget (:func:`check_against_uniform`):
        both are applied as below and the one with the lower loss on ``holdout`` is returned;
        ``result.check`` says which, with both losses. Per layer only, not with ``joint``.
    **allocate_options
        Any other keyword of :func:`cetopt.allocate` (``bops_budget``, ``ties``, ``min_bits`` ...).
    """
    joint_takes = {"bops_budget"}  # a second row of the joint knapsack (activation bits join the menu)
    if joint and (per_channel or set(allocate_options) - joint_takes):
        why = (
            "per_channel=True"
            if per_channel
            else f"allocate options {sorted(set(allocate_options) - joint_takes)}"
        )
        raise JointMenuError(
            f"joint=True chooses per layer under a byte budget alone; it does not take {why}"
        )
    if (score_gptq or holdout is not None) and (per_channel or joint):
        what = "score_gptq" if score_gptq else "holdout"
        raise CetoptError(f"{what} works with per-layer bit plans only (not per_channel or joint)")
    if joint:  # before measuring anything: every table row needs a menu
        from cetopt.analysis import quantizable_layers
        from cetopt.lowrank.joint import check_joint_layers

        check_joint_layers(model, quantizable_layers(model))
    estimate = channel_sensitivity if per_channel else sensitivity
    options = {} if probes is None else {"probes": probes}
    if score_gptq:
        options.update(gptq=data, act_order=act_order)
    if group_sizes is not None:
        if per_channel:
            raise CetoptError("group_sizes works with per-layer plans only; pass per_channel=False")
        options["group_sizes"] = group_sizes
    step = on_step or (lambda name: None)
    clock = _StepClock()
    step("sensitivity")
    table = estimate(model, data, bits, method, loss_fn=loss_fn, seed=seed, progress=progress, **options)
    clock.lap("sensitivity")
    step("allocation")
    if joint:
        from cetopt.lowrank.joint import joint_compress

        quantized, plan, search = joint_compress(
            model,
            data,
            table,
            budget,
            loss_fn=loss_fn,
            solver=solver,
            time_limit=time_limit,
            gptq=gptq,
            bias_correction=bias_correction,
            sequential=sequential,
            act_order=act_order,
            seed=seed,
            progress=progress,
            bops_budget=allocate_options.get("bops_budget"),
            **{
                # the same estimator on the fit split (the check split never seen by it)
                "sensitivity_fn": lambda batches: estimate(
                    model, batches, bits, method, loss_fn=loss_fn, seed=seed, progress=False, **options
                ),
                **dict(joint_options or {}),
            },
        )
        clock.lap("joint")
        return CompressionResult(
            model=quantized, plan=plan, table=table, seconds=clock.wall, cpu_seconds=clock.cpu, joint=search
        )
    plan = allocate(table, budget, solver, time_limit, **allocate_options)
    clock.lap("allocation")
    step("quantization")
    apply = {
        "gptq": data if gptq else None,
        "bias_correction": data if bias_correction else None,
        "sequential": sequential and (gptq or bias_correction),
        "progress": progress,
        "act_order": act_order,
    }
    check = None
    if holdout is not None:
        quantized, plan, check = check_against_uniform(
            model, table, plan, holdout, loss_fn=loss_fn, quantize_options=apply, **allocate_options
        )
    else:
        quantized = quantize(model, channel_bits(plan) if per_channel else plan, **apply)
    clock.lap("quantization")
    return CompressionResult(
        model=quantized, plan=plan, table=table, seconds=clock.wall, cpu_seconds=clock.cpu, check=check
    )


@dataclass(frozen=True)
class UniformCheck:
    """The allocated plan against the uniform plan of the same options, on held-out batches.

    Attributes
    ----------
    chosen : str
        ``"plan"`` (the allocation's) or ``"uniform"``: the one with the lower held-out loss (the
        allocation's plan on ties).
    base_loss : float
        Held-out loss of the float model.
    plan_loss : float
        Held-out loss of the allocated plan as applied.
    uniform_loss : float or None
        Held-out loss of the uniform plan as applied; None when no uniform plan fits the budget
        or it is the allocated plan itself.
    uniform_option : str or None
        The uniform plan's option (``"3 bits, group 128"``).
    plan_bytes, uniform_bytes : float or None
        Their weight bytes.
    loss : str
        The loss compared (``"cross_entropy"``, ``"next_token"``, ``"kl_to_float"``: then
        ``base_loss`` is 0 and the others are the divergences from the float model).
    """

    chosen: str
    base_loss: float
    plan_loss: float
    uniform_loss: float | None
    uniform_option: str | None
    plan_bytes: float
    uniform_bytes: float | None
    loss: str = "cross_entropy"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def uniform_plan(table: SensitivityTable, budget: float | str, **allocate_options) -> Plan | None:
    """The plan putting every layer of ``table`` at one and the same option, within ``budget``.

    Of the table's options (columns) whose uniform plan fits, the one with the most bytes (the
    lowest summed sensitivity among equals); it is solved by :func:`cetopt.allocate` on that one
    column, so it is a :class:`Plan` like any other. None when no uniform plan fits (or the
    ``allocate_options`` rule it out).
    """
    limit = parse_budget(budget, table)
    totals = option_bytes(table).sum(axis=0)
    fits = np.flatnonzero(totals <= limit * (1 + 1e-12))
    if not fits.size:
        return None
    k = int(min(fits, key=lambda j: (-totals[j], float(table.values[:, j].sum()))))
    column = replace(
        table,
        bits=[table.bits[k]],
        groups=None if table.groups is None else [table.groups[k]],
        values=table.values[:, [k]],
        stderr=None if table.stderr is None else table.stderr[:, [k]],
    )
    try:
        return allocate(column, limit, **allocate_options)
    except (InfeasibleBudgetError, CetoptError):
        return None


def _holdout_losses(model: nn.Module, candidates: list[nn.Module], batches, loss_fn) -> list[float]:
    """The mean loss of ``model`` and of each candidate on ``batches`` (weighted by batch size);
    with a reference loss (``kl_to_float``) each batch's targets are ``model``'s own logits on it,
    computed batch by batch (nothing kept)."""
    from cetopt.analysis.objective import is_reference_loss, model_logits
    from cetopt.quant._calibration import module_calls

    reference = is_reference_loss(loss_fn)
    total = sum(len(x) for x, _ in batches)
    sums = [0.0] * (1 + len(candidates))
    with torch.no_grad(), module_calls():
        for x, y in batches:
            out = model(x)
            if reference:
                y = model_logits(out).float()
            for i, m in enumerate([model, *candidates]):
                sums[i] += float(loss_fn(out if i == 0 else m(x), y)) * len(x) / total
    return sums


def _same_plan(a: Plan, b: Plan) -> bool:
    groups_a, groups_b = getattr(a, "groups", None) or {}, getattr(b, "groups", None) or {}
    return all(
        int(a.bits[n]) == int(b.bits[n]) and int(groups_a.get(n) or 0) == int(groups_b.get(n) or 0)
        for n in a.bits
    )


@in_eval_mode("model")
def check_against_uniform(
    model: nn.Module,
    table: SensitivityTable,
    plan: Plan,
    holdout,
    *,
    loss_fn: Callable | str | None = None,
    quantize_options: dict | None = None,
    applied: dict[str, nn.Module] | None = None,
    **allocate_options,
) -> tuple[nn.Module, Plan, UniformCheck]:
    """Apply ``plan`` and the uniform plan of ``table``'s options at its budget; keep the better.

    Per-layer sensitivities add up errors that interact, so a mixed plan can lose to the uniform
    one the same options contain. Both are applied (:func:`cetopt.quantize` with
    ``quantize_options``, e.g. ``gptq``, ``bias_correction``, ``sequential``) and their mean loss
    measured on ``holdout``; the one with the lower loss is returned (the allocated plan on ties),
    so the result is never worse on held-out data than its own uniform point.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    table : SensitivityTable
        The table ``plan`` was allocated from.
    plan : Plan
        From :func:`cetopt.allocate`; its ``budget_bytes`` is the uniform plan's budget.
    holdout : iterable of (inputs, targets)
        Batches used neither for the sensitivities nor for calibration if possible; never the
        test set (inputs alone with ``loss_fn="next_token"``).
    loss_fn : callable or str, optional
        As in :func:`cetopt.sensitivity`; ``"kl_to_float"`` compares the two plans by their
        divergence from the float model on the same held-out inputs (paired: far more power
        than the task loss on the same batches).
    quantize_options : dict, optional
        Keywords of :func:`cetopt.quantize` both plans are applied with.
    applied : dict, optional
        ``"plan"`` and/or ``"uniform"`` → that plan already applied with ``quantize_options``
        (e.g. a benchmark's own rows), used instead of applying it again.
    **allocate_options
        Keywords of :func:`cetopt.allocate` (``ties``, ``min_bits`` ...) for the uniform plan.

    Returns
    -------
    (model, plan, check)
        The chosen plan's quantized copy of ``model``, the plan, and the :class:`UniformCheck`.
    """
    from cetopt.analysis.objective import _batches, is_reference_loss, next_token_loss, resolve_loss

    loss = resolve_loss(loss_fn)
    self_targets = loss is next_token_loss or is_reference_loss(loss)
    batches = _batches(holdout, None, self_targets=self_targets)
    options = dict(quantize_options or {})
    done = dict(applied or {})
    mixed = done["plan"] if "plan" in done else quantize(model, plan, **options)
    uniform = uniform_plan(table, plan.budget_bytes, **allocate_options)
    if uniform is None or _same_plan(plan, uniform):
        base, mixed_loss = _holdout_losses(model, [mixed], batches, loss)
        label = None if uniform is None else _option_label(table, uniform)
        check = UniformCheck("plan", base, mixed_loss, None, label, plan.bytes, None, _name(loss_fn))
        return mixed, plan, check
    flat = done["uniform"] if "uniform" in done else quantize(model, uniform, **options)
    base, mixed_loss, flat_loss = _holdout_losses(model, [mixed, flat], batches, loss)
    label = _option_label(table, uniform)
    chosen = "uniform" if flat_loss < mixed_loss else "plan"
    check = UniformCheck(
        chosen, base, mixed_loss, flat_loss, label, plan.bytes, uniform.bytes, _name(loss_fn)
    )
    return (flat, uniform, check) if chosen == "uniform" else (mixed, plan, check)


def _name(loss_fn) -> str:
    from cetopt.analysis.estimators import _loss_name

    return _loss_name(loss_fn)


def _option_label(table: SensitivityTable, plan: Plan) -> str:
    name = next(iter(plan.bits))
    group = (getattr(plan, "groups", None) or {}).get(name) or 0
    return f"{int(plan.bits[name])} bits" + (f", group {int(group)}" if group else "")


class _StepClock:
    """Wall and CPU seconds of consecutive steps, and their total."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = self._last = (time.perf_counter(), time.process_time())

    def lap(self, step: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[step], self.cpu[step] = now[0] - self._last[0], now[1] - self._last[1]
        self.wall["total"], self.cpu["total"] = now[0] - self._start[0], now[1] - self._start[1]
        self._last = now
