"""Run analyses on a model in eval mode and give the caller's object back exactly as it was.

Every analysis (sensitivities, calibration, fitting, LEO, saving) needs the model's inference
behaviour: BatchNorm on its running statistics, dropout off. Switching with ``model.eval()`` and
back with ``model.train(was_training)`` is wrong for models whose submodules are in different
modes (a frozen eval-mode BatchNorm inside a train-mode model comes back in train mode), so the
switch here records each submodule's own ``training`` flag, and each parameter's
``requires_grad`` and ``.grad``, and puts every one of them back on exit, even after an error.

We switch the user's object rather than analyse a deep copy: a copy of a large model costs its
full memory again, and the functional calls of the estimators need the original's parameters.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

__all__ = ["ModelState", "eval_mode", "in_eval_mode", "to_eval"]

F = TypeVar("F", bound=Callable)


class ModelState:
    """A snapshot of every submodule's ``training`` flag and every parameter's grad state.

    Parameters
    ----------
    model : nn.Module
    """

    def __init__(self, model: nn.Module):
        self._modes = [(m, m.training) for m in model.modules()]
        self._params = [(p, p.requires_grad, p.grad) for p in model.parameters()]

    def restore(self) -> None:
        """Put every recorded flag back, submodule by submodule (never through ``train(mode)``)."""
        for module, training in self._modes:
            module.training = training
        for param, requires_grad, grad in self._params:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
            if param.grad is not grad:
                param.grad = grad


def to_eval(model: nn.Module) -> ModelState:
    """Record ``model``'s state, switch it to eval mode, and return the record to ``restore()``."""
    state = ModelState(model)
    model.eval()
    return state


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with ``models`` in eval mode; restore each one's exact state on exit."""
    states = [to_eval(m) for m in models]
    try:
        yield
    finally:
        for state in reversed(states):
            state.restore()


def in_eval_mode(*names: str) -> Callable[[F], F]:
    """Decorate a public entry point so the model arguments ``names`` run under :func:`eval_mode`."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:  # let the call itself report the bad arguments
                return fn(*args, **kwargs)
            models = [bound[n] for n in names if isinstance(bound.get(n), nn.Module)]
            with eval_mode(*models):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
