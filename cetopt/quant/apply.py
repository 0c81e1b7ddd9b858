"""``quantize``: write a bit allocation into a model through the rewriter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.graph.decisions import Quantize
from cetopt.graph.rewriter import rewrite

__all__ = ["gptq_option_weights", "quantize"]


@in_eval_mode("model")
def quantize(
    model: nn.Module,
    plan,
    *,
    clip_search: bool = True,
    gptq=None,
    bias_correction=None,
    sequential: bool = False,
    progress: bool = False,
    group_size: int | None = None,
    act_order: bool = True,
) -> nn.Module:
    """A copy of ``model`` with the planned layers quantized (integer codes, per-channel scales).

    Activations stay in floating point: the quantized layers dequantize their weights on the fly,
    so the model shrinks in memory and on disk (:func:`cetopt.save` packs the codes) but runs float
    kernels.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    plan : Plan or mapping
        A :class:`cetopt.Plan`, or a mapping of layer name → bits (an int, or one per channel).
        A plan's ``groups`` (from a table with group options) give each layer its group size.
    clip_search : bool
        Search the MSE-optimal clipping ratio per channel.
    gptq : iterable, optional
        Calibration batches. If given, the codes are re-rounded to keep each layer's output
        close on these inputs (:func:`cetopt.quant.gptq_round`); scales and bits are unchanged.
    bias_correction : iterable, optional
        Calibration batches. If given, each quantized layer gets a bias (added where the float
        layer has none) that cancels the mean output shift its rounding causes
        (:func:`cetopt.quant.correct_bias`).
    sequential : bool
        Calibrate layer by layer in execution order, each on the inputs the quantized model gives
        it, instead of all at once on the float model's inputs
        (:func:`cetopt.quant.calibrate_sequentially`): GPTQ then sees the earlier layers' errors,
        and bias correction cancels the mean shift they left. Needs ``gptq`` or
        ``bias_correction`` data (the same data when both are given); costs one calibration
        pass per layer, each stopping after that layer.
    progress : bool
        Show a progress bar over the layers being calibrated sequentially.
    group_size : int, optional
        A scale per group of this many input columns for every layer the plan gives no group
        size (:mod:`cetopt.quant.quantizer`); ``None``: per output channel.
    act_order : bool
        GPTQ rounds columns in decreasing input energy (act-order); ``False``: in their order.
    """
    bits = plan.bits if hasattr(plan, "bits") else plan
    if not isinstance(bits, Mapping):
        raise TypeError(
            f"plan must be a cetopt.Plan or a mapping of layer name to bits, got {type(plan).__name__}"
        )
    if sequential:
        _check_sequential_data(gptq, bias_correction)
    add_bias = bias_correction is not None
    groups = getattr(plan, "groups", None) or {}
    decisions = [
        Quantize(layer, b, clip_search, add_bias, groups.get(layer) or group_size)
        for layer, b in bits.items()
    ]
    quantized = rewrite(model, decisions)
    if sequential:
        from cetopt.quant.sequential import calibrate_sequentially

        data = gptq if gptq is not None else bias_correction
        return calibrate_sequentially(
            model,
            quantized,
            data,
            gptq=gptq is not None,
            bias_correction=add_bias,
            progress=progress,
            act_order=act_order,
        )
    if gptq is not None:
        from cetopt.quant.gptq import gptq_round

        quantized = gptq_round(model, quantized, gptq, act_order=act_order)
    if bias_correction is None:
        return quantized
    from cetopt.quant.bias_correction import correct_bias

    return correct_bias(model, quantized, bias_correction)


def _check_sequential_data(gptq, bias_correction) -> None:
    if gptq is None and bias_correction is None:
        raise ValueError(
            "sequential=True needs calibration data: pass gptq=<data> and/or bias_correction=<data>"
        )
    if gptq is not None and bias_correction is not None and gptq is not bias_correction:
        raise ValueError(
            "sequential calibration uses one data set: pass the same data to gptq and bias_correction"
        )


@in_eval_mode("model")
def gptq_option_weights(
    model: nn.Module,
    layers: Sequence[str],
    options: Sequence[tuple[int, int | None]],
    data,
    *,
    clip_search: bool = True,
    act_order: bool = True,
    progress: bool = False,
) -> dict[tuple[int, int | None], dict[str, torch.Tensor]]:
    """Each layer's weight as GPTQ rounds it at each ``(bits, group size)`` option, dequantized.

    One :func:`quantize` call with ``gptq=data`` per option, every named layer at that option and
    each rounded on the float model's inputs (not sequentially), so a layer's weight at an option
    is what GPTQ gives it when it is the only layer changed. Layers GPTQ does not round (an
    embedding) carry their round-to-nearest codes, as :func:`quantize` leaves them.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    layers : sequence of str
        Allocation rows (a tied weight under its first module's name).
    options : sequence of (int, int or None)
        ``(bits, group size)`` pairs; ``None``: a scale per output channel.
    data : iterable
        Calibration batches for GPTQ.
    clip_search, act_order
        As in :func:`quantize`.
    progress : bool
        A progress bar over the options.

    Returns
    -------
    dict
        ``(bits, group) → {layer: weight}``: float32, in the codes layout (output channels first,
        the quantized layer's ``weight_q`` shape).
    """
    from cetopt.analysis._common import progress_bar
    from cetopt.quant.quantizer import dequantize

    out: dict[tuple[int, int | None], dict[str, torch.Tensor]] = {}
    with progress_bar(len(options), "GPTQ per option", progress) as bar:
        for bits, group in options:
            plan = {name: int(bits) for name in layers}
            modules = dict(
                quantize(
                    model, plan, clip_search=clip_search, gptq=data, group_size=group, act_order=act_order
                ).named_modules()
            )
            out[(int(bits), group)] = {
                name: dequantize(
                    modules[name].weight_q,
                    modules[name].weight_scale,
                    modules[name].max_bits,
                    modules[name].weight_group,
                ).detach()
                for name in layers
            }
            bar.update(1)
    return out
