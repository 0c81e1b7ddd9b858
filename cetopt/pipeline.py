"""``compress``: sensitivity → allocation → quantization in one call."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.allocation import Plan, allocate
from cetopt.analysis import SensitivityTable, channel_bits, channel_sensitivity, sensitivity
from cetopt.errors import CetoptError, JointMenuError
from cetopt.quant.apply import quantize

__all__ = ["CompressionResult", "compress"]


@dataclass(frozen=True, eq=False)
class CompressionResult:
    """What :func:`compress` produced: the quantized model, the plan and the sensitivity table.

    ``seconds`` holds the wall-clock time of each step (``sensitivity``, ``allocation``,
    ``quantization`` — which includes the calibration — and ``total``), ``cpu_seconds`` the CPU
    time this process spent on each (all threads; steadier than wall time on a shared machine).
    Under ``method="auto"``, ``table.meta["auto"]`` says which estimator ran and why. With
    ``joint=True``, ``joint`` holds the joint menu's search (:class:`cetopt.lowrank.JointResult`:
    every plan it applied and measured, which one it returned and whether it fell back to
    bits only), and ``plan`` puts float layers (dense or float factors) at 32 bits.
    """

    model: nn.Module
    plan: Plan
    table: SensitivityTable
    seconds: dict = field(default_factory=dict)
    cpu_seconds: dict = field(default_factory=dict)
    joint: object | None = None


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
        defaults to theirs: 16 per layer, 64 per channel).
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
        layer only (not with ``per_channel``); of ``allocate_options`` it takes none.
    joint_options : dict, optional
        Other keywords of :func:`cetopt.lowrank.joint_compress` (``kinds``, ``factor_bits``,
        ``refine``, ``menu_options`` ...).
    **allocate_options
        Any other keyword of :func:`cetopt.allocate` (``bops_budget``, ``ties``, ``min_bits`` ...).
    """
    if joint and (per_channel or allocate_options):
        why = "per_channel=True" if per_channel else f"allocate options {sorted(allocate_options)}"
        raise JointMenuError(
            f"joint=True chooses per layer under a byte budget alone; it does not take {why}"
        )
    estimate = channel_sensitivity if per_channel else sensitivity
    options = {} if probes is None else {"probes": probes}
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
            seed=seed,
            progress=progress,
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
    quantized = quantize(
        model,
        channel_bits(plan) if per_channel else plan,
        gptq=data if gptq else None,
        bias_correction=data if bias_correction else None,
        sequential=sequential and (gptq or bias_correction),
        progress=progress,
        act_order=act_order,
    )
    clock.lap("quantization")
    return CompressionResult(
        model=quantized, plan=plan, table=table, seconds=clock.wall, cpu_seconds=clock.cpu
    )


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
