"""Empirical bias correction: remove the mean output shift each quantized layer introduces.

Rounding weights shifts the mean of a layer's output: ``E[(Q(W) − W) x] ≠ 0`` in general, and a
shifted mean moves every later activation (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019). With calibration data the shift of output channel
``c`` is measured directly, on the float model's own inputs to that layer, and subtracted from
the bias. It needs no gradient and no labels, and changes nothing on disk but the biases.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.quant._calibration import paired_layers, run_with_hooks

__all__ = ["correct_bias"]


def _channel_rows(layer: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """``output`` as (samples, channels): a Linear's channels are its last dimension (after any
    leading ones, e.g. a sequence), a convolution's are dimension 1."""
    if isinstance(layer, nn.Linear):
        return output.reshape(-1, output.shape[-1])
    return output.transpose(0, 1).reshape(output.shape[1], -1).T


@torch.no_grad()
def output_means(model: nn.Module, names: list[str], data, max_batches: int | None, geometry: dict) -> dict:
    """Mean output of each named layer per channel over ``data`` (float64).

    ``geometry[name]`` is the float layer that says where the output's channels are.
    """
    sums = {n: 0 for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def measure(module, args, output):
            rows = _channel_rows(geometry[name], output.detach().double())
            sums[name] = sums[name] + rows.sum(dim=0)
            counts[name] += rows.shape[0]

        return measure

    run_with_hooks(model, {n: hook(n) for n in names}, data, max_batches)
    return {n: sums[n] / max(counts[n], 1) for n in names}


@torch.no_grad()
@in_eval_mode("original", "quantized")
def correct_bias(
    original: nn.Module, quantized: nn.Module, data, *, max_batches: int | None = None
) -> nn.Module:
    """A copy of ``quantized`` whose biases cancel each quantized layer's mean output shift.

    Parameters
    ----------
    original : nn.Module
        The float model ``quantized`` was made from (same layer names). Not modified.
    quantized : nn.Module
        From :func:`cetopt.quantize`; every quantized layer must have a bias (quantize with
        ``bias_correction=`` data, which adds one where the float layer has none). Not modified.
    data : iterable
        Calibration batches: ``(inputs, targets)`` pairs or input tensors.
    max_batches : int, optional
        Use only the first batches.

    Returns
    -------
    nn.Module
        The corrected copy, in eval mode.
    """
    from cetopt.quant._sites import Accumulator, bias_of, pairs

    layers = paired_layers(original, quantized, need_bias=True)
    corrected = copy.deepcopy(quantized).eval()
    accumulators = [Accumulator(p, False, True, 0) for p in pairs(original, corrected, layers)]
    hooks = [hook for acc in accumulators for hook in acc.hooks()]
    run_with_hooks(original, {}, data, max_batches, call_hooks=hooks)
    for acc in accumulators:
        for use in acc.pair.target.uses:
            module = acc.pair.quantized.get(use.module)
            bias = None if module is None else bias_of(use.handler, module)
            shift = None if bias is None else acc.quantized_output_means(use.module)
            if shift is not None:
                bias.sub_((shift - acc.float_output_means(use.module)).to(bias.dtype))
    return corrected
