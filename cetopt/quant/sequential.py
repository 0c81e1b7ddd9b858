"""Sequential calibration: GPTQ rounding and bias correction on the inputs the quantized model sees.

:func:`cetopt.quant.gptq_round` and :func:`cetopt.quant.correct_bias` calibrate every layer on the
float model's own inputs, in one pass. Here the layers are taken in execution order and each one is
calibrated on the inputs it receives once the layers before it are quantized and calibrated, as
the GPTQ paper does: layer ``k``'s codes are re-rounded with the Gram matrix of those inputs, then
its bias is set so that its mean output per channel equals the float layer's mean output on the
float model's inputs. The mean shift the earlier layers left behind is therefore cancelled too,
not only the layer's own. Scales, bit widths and bytes stay as they are.

It costs one pass over the float model, then one pass per quantized layer that stops right after
that layer (the layers after it do not run): the layer's inputs are kept for that one layer (never
more than one layer's at a time), its Gram matrix is accumulated from them, and the corrected
layer's output is computed on them directly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.analysis._common import progress_bar
from cetopt.nn.unfold import is_matmul_layer
from cetopt.quant._calibration import StopForward, paired_layers, run_with_hooks
from cetopt.quant.bias_correction import _channel_rows, output_means
from cetopt.quant.gptq import (
    GRAM_BYTES,
    GramBlocks,
    accumulate_rows,
    gram_spans,
    reround,
    warn_round_to_nearest,
)

__all__ = ["calibrate_sequentially"]


def _execution_order(model: nn.Module, names: list[str], data) -> tuple[list[str], dict[str, int]]:
    """``names`` in the order their layers first run on a batch of ``data``, and their calls per batch."""
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            calls[name] = calls.get(name, 0) + 1

        return record

    run_with_hooks(model, {n: hook(n) for n in names}, data, 1)
    return list(calls) + [n for n in names if n not in calls], calls


def _layer_inputs(model: nn.Module, name: str, data, max_batches: int | None, stop: bool) -> list:
    """Every input layer ``name`` of ``model`` receives over ``data``, detached (and cloned unless
    the pass stops right after the layer, before anything could modify them in place)."""
    inputs: list[torch.Tensor] = []

    def capture(module, args, output):
        x = args[0].detach()
        inputs.append(x if stop else x.clone())
        if stop:
            raise StopForward

    run_with_hooks(model, {name: capture}, data, max_batches)
    return inputs


@torch.no_grad()
@in_eval_mode("original", "quantized")
def calibrate_sequentially(
    original: nn.Module,
    quantized: nn.Module,
    data,
    *,
    gptq: bool = True,
    bias_correction: bool = True,
    damp: float = 0.01,
    max_batches: int | None = None,
    max_gram_bytes: int = GRAM_BYTES,
    progress: bool = True,
    act_order: bool = True,
) -> nn.Module:
    """A copy of ``quantized`` calibrated layer by layer, each on the quantized model's own inputs.

    Parameters
    ----------
    original : nn.Module
        The float model ``quantized`` was made from (same layer names). Not modified.
    quantized : nn.Module
        From :func:`cetopt.quantize`. Not modified.
    data : iterable
        Calibration batches: ``(inputs, targets)`` pairs or input tensors. Iterated ``layers + 2``
        times, so it must be re-iterable (a list or a DataLoader).
    gptq : bool
        Re-round each Linear / Conv1d / Conv2d layer's codes by GPTQ (other layers keep theirs).
    bias_correction : bool
        Set each layer's bias so its mean output matches the float layer's; every quantized layer
        needs a bias (quantize with ``bias_correction=`` data, which adds them).
    damp : float
        GPTQ's diagonal damping, relative to the Gram matrix's mean diagonal.
    max_batches : int, optional
        Use only the first batches.
    max_gram_bytes : int
        GPTQ's memory bound per layer (see :func:`cetopt.quant.gptq_round`).
    progress : bool
        Show a progress bar over the layers.
    act_order : bool
        GPTQ's column order: decreasing input energy (act-order), else the columns' own order.

    Returns
    -------
    nn.Module
        The calibrated copy, in eval mode.
    """
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    if iter(data) is data:
        raise TypeError(
            "sequential calibration reads the data once per layer: pass a list or a DataLoader, "
            f"not a one-shot {type(data).__name__}"
        )
    floats = dict(original.named_modules())
    calibrated = copy.deepcopy(quantized).eval()
    layers = paired_layers(original, calibrated, need_bias=bias_correction)
    names, calls = _execution_order(original, list(layers), data)
    targets = output_means(original, names, data, max_batches, floats) if bias_correction else {}
    with progress_bar(len(names), "calibrating layers", progress) as bar:
        for name in names:
            bar.set_postfix_str(name, refresh=False)
            inputs = _layer_inputs(calibrated, name, data, max_batches, stop=calls.get(name, 0) == 1)
            if gptq and is_matmul_layer(floats[name]):
                _round(name, layers[name], floats[name], inputs, damp, max_gram_bytes, act_order)
            if bias_correction:
                _correct(layers[name], floats[name], inputs, targets[name])
            del inputs
            bar.update(1)
    return calibrated


def _round(
    name: str,
    layer: nn.Module,
    float_layer: nn.Module,
    inputs: list,
    damp: float,
    max_bytes: int,
    act_order: bool = True,
):
    """GPTQ-round ``layer`` (in place) against the Gram matrix of ``inputs``."""
    spans = gram_spans(float_layer, max_bytes)
    if spans is None:
        warn_round_to_nearest(name, float_layer, max_bytes)
        return
    gram = GramBlocks(spans, [torch.zeros(b - a, b - a, dtype=torch.float64) for a, b in spans])
    for x in inputs:
        accumulate_rows(gram, float_layer, x)
    reround(layer, float_layer.weight, gram, damp, name=name, act_order=act_order)


def _correct(layer: nn.Module, float_layer: nn.Module, inputs: list, target: torch.Tensor) -> None:
    """Shift ``layer``'s bias (in place) so its mean output on ``inputs`` is ``target``."""
    total, count = 0, 0
    for x in inputs:
        rows = _channel_rows(float_layer, layer(x).double())
        total, count = total + rows.sum(dim=0), count + rows.shape[0]
    layer.bias.sub_((total / max(count, 1) - target).to(layer.bias.dtype))
