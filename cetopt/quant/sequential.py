"""Sequential calibration: GPTQ rounding and bias correction on the inputs the quantized model sees.

:func:`cetopt.quant.gptq_round` and :func:`cetopt.quant.correct_bias` calibrate every layer on the
float model's own inputs, in one pass. Here the layers are taken in execution order and each one is
calibrated on the inputs it receives once the layers before it are quantized and calibrated, as
the GPTQ paper does: layer ``k``'s codes are re-rounded with the Gram matrix of those inputs, then
its bias is set so that its mean output per channel equals the float layer's mean output on the
float model's inputs. The mean shift the earlier layers left behind is therefore cancelled too,
not only the layer's own. Scales, bit widths and bytes stay as they are. It costs two calibration
passes per quantized layer (one for the inputs, one for the corrected layer's output), plus one
over the float model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.nn.unfold import is_matmul_layer
from cetopt.quant._calibration import paired_layers, run_with_hooks
from cetopt.quant.bias_correction import output_means
from cetopt.quant.gptq import input_gram, reround

__all__ = ["calibrate_sequentially"]


def _execution_order(model: nn.Module, names: list[str], data) -> list[str]:
    """``names`` in the order their layers first run on a batch of ``data``."""
    seen: list[str] = []

    def hook(name):
        def record(module, args, output):
            if name not in seen:
                seen.append(name)

        return record

    run_with_hooks(model, {n: hook(n) for n in names}, data, 1)
    return seen + [n for n in names if n not in seen]


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
) -> nn.Module:
    """A copy of ``quantized`` calibrated layer by layer, each on the quantized model's own inputs.

    Parameters
    ----------
    original : nn.Module
        The float model ``quantized`` was made from (same layer names). Not modified.
    quantized : nn.Module
        From :func:`cetopt.quantize`. Not modified.
    data : iterable
        Calibration batches: ``(inputs, targets)`` pairs or input tensors. Iterated ``2 × layers + 2``
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
    names = _execution_order(original, list(layers), data)
    targets = output_means(original, names, data, max_batches, floats) if bias_correction else {}
    for name in names:
        layer = layers[name]
        if gptq and is_matmul_layer(floats[name]):
            gram = input_gram(calibrated, [name], data, max_batches, floats)[name]
            reround(layer, floats[name].weight, gram, damp)
        if bias_correction:
            mean = output_means(calibrated, [name], data, max_batches, floats)[name]
            layer.bias.sub_((mean - targets[name]).to(layer.bias.dtype))
    return calibrated
