"""One pass of a float model over calibration data, with forward hooks on named layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from cetopt._modes import to_eval
from cetopt.errors import CetoptError, DataShapeError, NonFiniteError
from cetopt.nn.quantized import QuantizedMixin

__all__ = ["paired_layers", "run_with_hooks"]


def paired_layers(original: nn.Module, quantized: nn.Module, *, need_bias: bool = False) -> dict:
    """The quantized layers of ``quantized`` by name, each checked to have a float twin in ``original``.

    Raises
    ------
    CetoptError
        If ``original`` lacks one of the names, or (with ``need_bias``) a quantized layer has no bias.
    """
    floats = dict(original.named_modules())
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantizedMixin)}
    absent = [n for n in layers if n not in floats]
    if absent:
        raise CetoptError(f"the original model has no layers named {absent}")
    missing = [n for n, m in layers.items() if getattr(m, "bias", None) is None]
    if need_bias and missing:
        raise CetoptError(
            f"quantized layers without a bias cannot be corrected: {missing}; "
            "quantize with bias_correction=<data> (it adds the biases)"
        )
    return layers


def _inputs(batch, index: int = 0):
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
        raise NonFiniteError(f"batch {index} of the calibration data holds NaN or infinity in its inputs")
    return x


def run_with_hooks(
    model: nn.Module, hooks: Mapping[str, Callable], data: Iterable, max_batches: int | None = None
) -> None:
    """Run ``model`` in eval mode over ``data`` with ``hooks[name]`` as the forward hook of layer ``name``.

    The model's train/eval mode is restored and the hooks removed afterwards.

    Raises
    ------
    DataShapeError
        If the model cannot run on a batch, or ``data`` yields no batches.
    NonFiniteError
        If a batch's inputs hold NaN or infinity.
    """
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    saved = to_eval(model)
    batches = 0
    try:
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            model(_inputs(batch, batches))
            batches += 1
    except NonFiniteError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise DataShapeError(f"the model cannot run on the calibration data: {exc}") from exc
    finally:
        saved.restore()
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise DataShapeError("calibration data yielded no batches")
