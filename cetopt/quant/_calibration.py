"""One pass of a float model over calibration data, with forward hooks on named layers."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from cetopt._modes import to_eval
from cetopt.errors import CetoptError, DataShapeError, NonFiniteError
from cetopt.nn.quantized import QuantizedMixin

__all__ = ["StopForward", "is_data_mismatch", "module_calls", "paired_layers", "run_with_hooks"]

# What torch and Python say when inputs do not fit a layer: shapes, sizes, dtypes, channels.
_MISMATCH = re.compile(
    r"shape|size|dimension|dtype|channels|cannot be multiplied|must match|expected (scalar )?type"
    r"|expected .*input|mismatch|out of (range|bounds)",
    re.IGNORECASE,
)
_OUT_OF_MEMORY = re.compile(r"allocate|out of memory", re.IGNORECASE)


@contextlib.contextmanager
def module_calls():
    """Within this block every layer runs through its own call: torch's fused transformer fast path
    (which reads ``linear1.weight``, ``out_proj.weight``... without calling those modules, so their
    hooks never fire) is turned off."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


class StopForward(Exception):
    """Raised by a hook of :func:`run_with_hooks` once it has what it needs from a batch."""


class _HookFailure(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def is_data_mismatch(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a model's forward, says its inputs or targets do not fit the model.

    Only shape, size and dtype mismatches count; running out of memory (``MemoryError`` or torch's
    "can't allocate memory") or any other failure is not a data problem and keeps its own type.
    """
    if not isinstance(exc, (RuntimeError, ValueError, IndexError, TypeError)):
        return False
    text = str(exc)
    return not _OUT_OF_MEMORY.search(text) and bool(_MISMATCH.search(text))


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
    missing = [n for n, m in layers.items() if getattr(m, "bias", None) is None and _has_bias_slot(m)]
    if need_bias and missing:
        raise CetoptError(
            f"quantized layers without a bias cannot be corrected: {missing}; "
            "quantize with bias_correction=<data> (it adds the biases)"
        )
    return layers


def _has_bias_slot(layer: nn.Module) -> bool:
    """Whether a quantized layer type carries a bias at all (an Embedding, attention's packed
    in-projection do not get one added)."""
    from cetopt.nn.quantized import QuantizedEmbedding, QuantizedMultiheadAttention

    return not isinstance(layer, (QuantizedEmbedding, QuantizedMultiheadAttention))


def _inputs(batch, index: int = 0):
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
        raise NonFiniteError(f"batch {index} of the calibration data holds NaN or infinity in its inputs")
    return x


def _guarded(hook: Callable) -> Callable:
    """``hook``, with its own errors marked so they are not mistaken for the model's."""

    def run(module, args, output):
        try:
            return hook(module, args, output)
        except StopForward:
            raise
        except Exception as exc:
            raise _HookFailure(exc) from exc

    return run


def _guarded_kwargs(hook: Callable) -> Callable:
    """:func:`_guarded` for a hook that takes the call's keyword arguments."""

    def run(module, args, kwargs, output):
        try:
            return hook(module, args, kwargs, output)
        except StopForward:
            raise
        except Exception as exc:
            raise _HookFailure(exc) from exc

    return run


def run_with_hooks(
    model: nn.Module,
    hooks: Mapping[str, Callable],
    data: Iterable,
    max_batches: int | None = None,
    *,
    call_hooks: Iterable[tuple[str, Callable]] = (),
) -> None:
    """Run ``model`` in eval mode over ``data`` with ``hooks[name]`` as the forward hook of layer ``name``.

    ``call_hooks`` adds ``(name, hook)`` pairs whose hooks also get the call's keyword arguments,
    ``hook(module, args, kwargs, output)`` (several may share a module).

    The model's train/eval mode is restored and the hooks removed afterwards. A hook may raise
    :class:`StopForward` to skip the rest of a batch's forward pass (the layers after it). An error
    raised by a hook propagates unchanged.

    Raises
    ------
    DataShapeError
        If the model cannot run on a batch because of its shape or dtype, or ``data`` yields no
        batches. Any other failure of the model (e.g. out of memory) is raised as it is.
    NonFiniteError
        If a batch's inputs hold NaN or infinity.
    """
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(_guarded(hook)) for name, hook in hooks.items()]
    handles += [
        modules[name].register_forward_hook(_guarded_kwargs(hook), with_kwargs=True)
        for name, hook in call_hooks
    ]
    saved = to_eval(model)
    batches = 0
    calls = module_calls()
    calls.__enter__()
    try:
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            with contextlib.suppress(StopForward):
                model(_inputs(batch, batches))
            batches += 1
    except _HookFailure as failure:
        raise failure.error from None
    except NonFiniteError:
        raise
    except Exception as exc:
        if is_data_mismatch(exc):
            raise DataShapeError(f"the model cannot run on the calibration data: {exc}") from exc
        raise
    finally:
        calls.__exit__(None, None, None)
        saved.restore()
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise DataShapeError("calibration data yielded no batches")
