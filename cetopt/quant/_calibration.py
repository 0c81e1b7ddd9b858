"""One pass of a float model over calibration data, with forward hooks on named layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from torch import nn

from cetopt.errors import DataShapeError

__all__ = ["run_with_hooks"]


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def run_with_hooks(
    model: nn.Module, hooks: Mapping[str, Callable], data: Iterable, max_batches: int | None = None
) -> None:
    """Run ``model`` in eval mode over ``data`` with ``hooks[name]`` as the forward hook of layer ``name``.

    The model's train/eval mode is restored and the hooks removed afterwards.

    Raises
    ------
    DataShapeError
        If the model cannot run on a batch, or ``data`` yields no batches.
    """
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            model(_inputs(batch))
            batches += 1
    except (RuntimeError, ValueError) as exc:
        raise DataShapeError(f"the model cannot run on the calibration data: {exc}") from exc
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise DataShapeError("calibration data yielded no batches")
