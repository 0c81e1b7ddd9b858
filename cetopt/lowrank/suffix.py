"""The network's output with one layer's weight replaced, for many candidate weights in one batched pass.

For a layer ``l`` and candidate weights ``W_1 … W_K``, :func:`output_errors` returns
``‖f(x; W_k) − f(x)‖² / ‖f(x)‖²`` for every k. The calibration examples are repeated K times along
the batch; the layer maps the k-th copy of its input through ``W_k``, and everything after it runs
once on the stacked batch. Everything before it is not recomputed: a recording pass (stopped at
the layer) stores the output of every leaf module called before it, and in the batched pass those
modules return their stored outputs, repeated. So a layer costs about one forward of the network
*prefix* plus K forwards of its *suffix* over the examples, instead of K full forwards.

Examples are taken in chunks and options in groups so that the stored prefix and one batched suffix
pass each stay within :data:`ACTIVATION_BYTES`. The first group of each layer also carries the
original weight; if its output differs from the reference (a model whose examples are not
independent along dimension 0), the layer falls back to one plain forward per option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATION_BYTES", "output_errors"]

ACTIVATION_BYTES = 256 * 2**20


class _Stop(Exception):
    """Ends a recording pass at the layer."""


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not any(True for _ in m.children())]


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _record_prefix(model, layer, x) -> list[tuple[nn.Module, object]]:
    """``(module, output)`` of every leaf call before ``layer``'s first call, in order."""
    calls: list[tuple[nn.Module, object]] = []

    def keep(module, args, out):
        calls.append((module, out.detach() if isinstance(out, torch.Tensor) else out))

    def stop(module, args):
        raise _Stop

    handles = [m.register_forward_hook(keep) for m in _leaves(model) if m is not layer]
    handles.append(layer.register_forward_pre_hook(stop))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return calls


def bytes_per_example(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every leaf module's output for one example (an upper bound on a stored prefix)."""
    total = 0

    def count(module, args, out):
        nonlocal total
        total += _nbytes(out)

    handles = [m.register_forward_hook(count) for m in _leaves(model)]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return max(total, 1)


def _each(module: nn.Module, inputs: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Copy k of the stacked ``inputs`` through the layer with weight ``weights[k]``."""
    outs = []
    for x, w in zip(inputs.chunk(len(weights)), weights):
        w = w.to(x.dtype).reshape(module.weight.shape)
        if isinstance(module, nn.Linear):
            outs.append(F.linear(x, w, module.bias))
        else:  # the module's own convolution: groups, padding modes and "same" padding included
            outs.append(module._conv_forward(x, w, module.bias))
    return torch.cat(outs)


def _stubbed(calls, copies: int) -> Callable[[], None]:
    """Make each recorded module return its stored outputs (repeated ``copies`` times); returns undo."""
    by_module: dict[nn.Module, list] = {}
    for module, out in calls:
        by_module.setdefault(module, []).append(out)
    undo = []
    for module, outs in by_module.items():
        if not all(isinstance(o, torch.Tensor) and o.dim() > 0 for o in outs):
            continue  # computed normally on the stacked batch
        original = module.forward
        queue = [o.repeat(copies, *([1] * (o.dim() - 1))) for o in outs]

        def forward(*args, _queue=queue, _original=original, **kwargs):
            return _queue.pop(0) if _queue else _original(*args, **kwargs)

        module.forward = forward
        undo.append(module)
    return lambda: [m.__dict__.pop("forward", None) for m in undo]


def _batched(model, layer, x, calls, weights) -> torch.Tensor:
    """Network outputs for every candidate weight, shape ``(K, *output of x)``."""
    restore = _stubbed(calls, len(weights))
    layer.forward = lambda inp: _each(layer, inp, weights)
    try:
        out = model(x.repeat(len(weights), *([1] * (x.dim() - 1))))
    finally:
        layer.__dict__.pop("forward", None)
        restore()
    return out.reshape(len(weights), *x.shape[:1], *out.shape[1:])


def _plain(model, layer, x, weight) -> torch.Tensor:
    hook = layer.register_forward_hook(lambda m, args, out: _each(m, args[0], [weight]))
    try:
        return model(x)
    finally:
        hook.remove()


def _squared_diff(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).pow(2).sum())


def _chunk_errors(model, layer, x, reference, weights, per_example: int) -> torch.Tensor | None:
    """Squared output differences per candidate on one chunk of examples; None if batching is unsound."""
    calls = _record_prefix(model, layer, x)
    group = max(1, ACTIVATION_BYTES // (per_example * len(x)))
    original = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    sums = []
    for start in range(0, len(weights), group):
        part = list(weights[start : start + group])
        if start == 0:
            part = [original, *part]
        out = _batched(model, layer, x, calls, part).double()
        diff = (out - reference[None]).pow(2).flatten(1).sum(1)
        if start == 0:
            if float(diff[0]) > 1e-8 * float(reference.pow(2).sum().clamp_min(1e-30)):
                return None
            diff = diff[1:]
        sums.append(diff)
    return torch.cat(sums)


@torch.no_grad()
def output_errors(
    model: nn.Module, layer_name: str, x: torch.Tensor, weights: Sequence[torch.Tensor]
) -> list[float]:
    """Relative output error of ``model`` on ``x`` with one layer's weight replaced by each of ``weights``.

    Parameters
    ----------
    model : nn.Module
        In eval mode; never modified (stubs are removed before returning).
    layer_name : str
        A Linear/Conv1d/Conv2d layer.
    x : Tensor
        Calibration examples ``(batch, *input_shape)``.
    weights : sequence of Tensor
        Candidate weights, each as the ``(out, fan_in)`` matrix or in the layer's own shape.

    Returns
    -------
    list of float
        ``‖f(x; W_k) − f(x)‖² / ‖f(x)‖²`` per candidate.
    """
    if not weights:
        return []
    layer = dict(model.named_modules())[layer_name]
    per_example = bytes_per_example(model, x)
    chunk = max(1, min(len(x), ACTIVATION_BYTES // per_example))
    totals = torch.zeros(len(weights), dtype=torch.float64)
    norm = 0.0
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk]
        reference = model(xs).double()
        norm += float(reference.pow(2).sum())
        sums = _chunk_errors(model, layer, xs, reference, weights, per_example)
        if sums is None:
            sums = torch.tensor([_squared_diff(_plain(model, layer, xs, w), reference) for w in weights])
        totals += sums
    return (totals / max(norm, 1e-30)).tolist()
