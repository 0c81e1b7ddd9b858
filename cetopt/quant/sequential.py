"""Sequential calibration: GPTQ rounding and bias correction on the inputs the quantized model sees.

:func:`cetopt.quant.gptq_round` and :func:`cetopt.quant.correct_bias` calibrate every layer on the
float model's own inputs, in one pass. Here the layers are taken in execution order and each one is
calibrated on the inputs it receives once the layers before it are quantized and calibrated, as
the GPTQ paper does: layer ``k``'s codes are re-rounded with the Gram matrix of those inputs, then
its bias is set so that its mean output per channel equals the float layer's mean output on the
float model's inputs. The mean shift the earlier layers left behind is therefore cancelled too,
not only the layer's own. Scales, bit widths and bytes stay as they are.

Everything goes through the quantization handlers (:mod:`cetopt.quant.handlers`), so it needs no
graph and works on models torch.fx cannot trace. What a layer's weight multiplies is summed as it
is produced (its Gram matrix and its row sums; a matrix product's mean output is the matrix times
the mean row), so no layer's inputs are kept.

Layers inside a **block** — a child of an ``nn.ModuleList``, e.g. a transformer's decoder layers —
are calibrated block by block, as GPTQ's reference implementation does: one pass of the quantized
model up to the block keeps the block's inputs (its positional and keyword arguments, one block's
worth at a time), then each of the block's layers in turn is calibrated by running only the
block on them. Layers outside blocks cost one pass each, stopping right after the layer.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.analysis._common import progress_bar
from cetopt.quant._calibration import StopForward, module_calls, paired_layers, run_with_hooks
from cetopt.quant._sites import Accumulator, Pair, bias_of, pairs
from cetopt.quant.gptq import GRAM_BYTES

__all__ = ["calibrate_sequentially"]


def _execution_order(model: nn.Module, pairs: dict[str, Pair], data) -> tuple[list[str], dict[str, int]]:
    """The rows in the order their weights are first read on a batch of ``data``, and the calls per
    batch of the modules that read them."""
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, args, kwargs, output):
            calls[name] = calls.get(name, 0) + 1

        return record

    hooks = [(use.runs_in, hook(name)) for name, pair in pairs.items() for use in pair.target.uses]
    run_with_hooks(model, {}, data, 1, call_hooks=hooks)
    return list(calls) + [n for n in pairs if n not in calls], calls


def _block_of(model: nn.Module, name: str, modules: dict) -> str | None:
    """The outermost ancestor of ``name`` that is an entry of an ``nn.ModuleList`` (a repeated block)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent, child = ".".join(parts[:i]), ".".join(parts[: i + 1])
        if isinstance(modules.get(parent), nn.ModuleList) and len(modules[parent]) > 1 and child != name:
            return child
    return None


def _units(
    model: nn.Module, order: list[str], block_calls: dict[str, int]
) -> list[tuple[str | None, list[str]]]:
    """Consecutive rows grouped by the block they sit in (``None``: a row calibrated on its own)."""
    modules = dict(model.named_modules())
    units: list[tuple[str | None, list[str]]] = []
    for name in order:
        block = _block_of(model, name, modules)
        if block is not None and block_calls.get(block, 0) != 1:
            block = None  # a block run more than once per batch (shared weights): row by row
        if block is not None and units and units[-1][0] == block:
            units[-1][1].append(name)
        else:
            units.append((block, [name]))
    return units


def _count_calls(model: nn.Module, names: set[str], data) -> dict[str, int]:
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, args, kwargs, output):
            calls[name] = calls.get(name, 0) + 1

        return record

    run_with_hooks(model, {}, data, 1, call_hooks=[(n, hook(n)) for n in names])
    return calls


_NO_CACHE = {"past_key_values": None, "past_key_value": None, "layer_past": None, "use_cache": False}


def _block_inputs(model: nn.Module, block: str, data, max_batches: int | None) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments of every call of ``block`` over ``data`` (the pass stops
    there). A key/value cache passed along is dropped, so re-running the block does not grow it."""
    captured: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: _NO_CACHE.get(k, v) for k, v in kwargs.items()}
        captured.append((args, kwargs))
        raise StopForward

    handle = dict(model.named_modules())[block].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run_with_hooks(model, {}, data, max_batches)
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, modules: dict, captured, acc: Accumulator, stop: bool) -> None:
    """Run ``block`` on every captured call with ``acc``'s hooks (stopping after its weight's call)."""
    handles = [
        modules[name].register_forward_hook(_stopping(hook, stop), with_kwargs=True)
        for name, hook in acc.hooks()
    ]
    try:
        with module_calls():
            for args, kwargs in captured:
                with contextlib.suppress(StopForward):
                    block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _stopping(hook, stop: bool):
    def run(module, args, kwargs, output):
        hook(module, args, kwargs, output)
        if stop:
            raise StopForward

    return run


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
        Calibration batches: ``(inputs, targets)`` pairs or input tensors. Iterated several times
        (once per block or layer outside a block, plus three), so it must be re-iterable (a list
        or a DataLoader).
    gptq : bool
        Re-round each layer's codes by GPTQ where its handler gives the rows its weight multiplies
        (other layers keep theirs).
    bias_correction : bool
        Set each layer's bias so its mean output matches the float layer's; every quantized layer
        that can carry a bias needs one (quantize with ``bias_correction=`` data, which adds them).
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
    calibrated = copy.deepcopy(quantized).eval()
    layers = paired_layers(original, calibrated, need_bias=bias_correction)
    by_name = {p.name: p for p in pairs(original, calibrated, layers)}
    names, calls = _execution_order(original, by_name, data)
    modules = dict(calibrated.named_modules())
    blocks = {b for n in names if (b := _block_of(calibrated, n, modules)) is not None}
    units = _units(calibrated, names, _count_calls(calibrated, blocks, data) if blocks else {})
    floats: dict[str, Accumulator] = {}
    if bias_correction:
        floats = {n: Accumulator(p, False, True, 0) for n, p in by_name.items()}
        run_with_hooks(
            original, {}, data, max_batches, call_hooks=[h for a in floats.values() for h in a.hooks()]
        )
    with progress_bar(len(names), "calibrating layers", progress) as bar:
        for block, rows in units:
            captured = _block_inputs(calibrated, block, data, max_batches) if block is not None else None
            for name in rows:
                bar.set_postfix_str(name, refresh=False)
                acc = Accumulator(by_name[name], gptq, bias_correction, max_gram_bytes)
                stop = calls.get(name, 0) == 1
                if captured is None:
                    run_with_hooks(
                        calibrated,
                        {},
                        data,
                        max_batches,
                        call_hooks=[(n, _stopping(h, stop)) for n, h in acc.hooks()],
                    )
                else:
                    _run_block(modules[block], modules, captured, acc, stop)
                if gptq:
                    acc.reround(damp, act_order=act_order)
                if bias_correction:
                    _correct(acc, floats[name])
                del acc
                bar.update(1)
            del captured
    return calibrated


def _correct(acc: Accumulator, reference: Accumulator) -> None:
    """Set each user's bias (in place) so its mean output on the recorded inputs is the float
    layer's mean output on the float model's inputs."""
    for use in acc.pair.target.uses:
        module = acc.pair.quantized.get(use.module)
        bias = None if module is None else bias_of(use.handler, module)
        if bias is None:
            continue
        quantized_mean = acc.quantized_output_means(use.module)
        float_mean = reference.float_output_means(use.module)
        if quantized_mean is None or float_mean is None:
            continue
        float_bias = use.handler.bias(acc.pair.float_modules[use.module])
        target = float_mean + (float_bias.double() if isinstance(float_bias, torch.Tensor) else 0)
        bias.copy_((target - quantized_mean).to(bias.dtype))
