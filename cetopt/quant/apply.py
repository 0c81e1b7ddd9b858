"""``quantize``: write a bit allocation into a model through the rewriter."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.graph.decisions import Quantize
from cetopt.graph.rewriter import rewrite

__all__ = ["quantize"]


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
