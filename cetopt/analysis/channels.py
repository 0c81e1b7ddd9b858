"""Per-output-channel sensitivities: the allocation then picks a bit width for every channel.

The quantizer already scales and stores each output channel on its own, and its clipping search
is per channel, so channel ``c`` of a layer quantized to ``b`` bits is the same whatever width the
other channels get. ``channel_sensitivity`` estimates the calibration-loss increase of quantizing
each channel alone to each width, either with CET's second-order form (``cet``: the per-layer
estimator's Hessian-vector probes with one sign per channel instead of one per layer) or by
measuring it (``measured``: one forward pass over the calibration data per entry). The
resulting table has one row per channel, named ``"layer[c]"``, with that channel's weights as its
parameters, so :func:`cetopt.allocate` solves the per-channel problem unchanged (the byte model
counts each channel's codes plus its own scale and width; it rounds each channel's codes up to
whole bytes, while :func:`cetopt.save` packs a layer's codes together, so the file is at most one
byte per channel smaller than the plan says). :func:`channel_bits` turns the plan back into one
bit width per channel for :func:`cetopt.quantize`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.analysis._common import checked_bits, progress_bar
from cetopt.analysis.auto import choose_method
from cetopt.analysis.estimators import cet_options, cet_quadratic, probe_chunk
from cetopt.analysis.objective import LossObjective, quantizable_layers
from cetopt.analysis.replay import measure_trials
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import CetoptError
from cetopt.quant.quantizer import fake_quantize

__all__ = ["channel_bits", "channel_sensitivity"]

_ROW = re.compile(r"^(?P<layer>.+)\[(?P<channel>\d+)\]$")


def _row_name(layer: str, channel: int) -> str:
    return f"{layer}[{channel}]"


def split_channel_row(row: str) -> tuple[str, int] | None:
    """``("layer", c)`` for a per-channel row name ``"layer[c]"``; ``None`` for any other name."""
    match = _ROW.match(row)
    return None if match is None else (match["layer"], int(match["channel"]))


def _split(value: int, parts: int) -> list[int]:
    """``value`` as ``parts`` integers that sum to it (the remainder on the first)."""
    share = value // parts
    return [value - share * (parts - 1)] + [share] * (parts - 1)


def _channel_trial(weight: torch.Tensor, quantized: torch.Tensor, c: int):
    def build():
        trial = weight.clone()
        trial[c] = quantized[c]
        return trial

    return build


def _measured(obj: LossObjective, quantized: dict, base: float, progress: bool) -> np.ndarray:
    trials = []
    for key, info in zip(obj.keys, obj.layers):
        for c in range(info.channels):
            trials += [
                (obj.site(key), _channel_trial(obj.weights[key], quantized[b][key], c)) for b in quantized
            ]
    with progress_bar(
        len(trials) * len(obj.batches), "measured: quantize each channel alone", progress
    ) as bar:
        losses, _, _ = measure_trials(obj.model, obj.batches, obj.loss_fn, trials, bar)
    return np.array(losses).reshape(-1, len(quantized)) - base


def _cet(obj: LossObjective, quantized: dict, opts: dict):
    deltas = {b: {k: quantized[b][k] - w for k, w in obj.weights.items()} for b in quantized}
    units, start = {}, 0
    for key, info in zip(obj.keys, obj.layers):
        units[key] = torch.arange(start, start + info.channels)
        start += info.channels
    return cet_quadratic(obj, deltas, units, opts)


@in_eval_mode("model")
def channel_sensitivity(
    model: nn.Module,
    data,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    method: str = "auto",
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    layers: Sequence[str] | None = None,
    probes: int = 64,
    rounds: int = 2,
    max_batches: int | None = None,
    clip_search: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> SensitivityTable:
    """Predicted loss increase of quantizing each output channel alone to each bit width.

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode; not modified.
    data : iterable of (inputs, targets)
        Calibration batches; the loss is averaged over all of them.
    bits : sequence of int
        Candidate bit widths (2 to 16).
    method : {"auto", "cet", "measured"}
        ``auto``: the cheaper of the two (:mod:`cetopt.analysis.auto`), recorded with its reason
        in ``meta["auto"]``. ``cet``: ``gᵀΔ_c + ½ Δ_cᵀHΔ_c`` for each channel's own perturbation,
        with the same Hessian-vector probes as :func:`cetopt.sensitivity` (``bits × probes`` HVPs whatever the
        channel count; exact once ``probes`` reaches the next power of two above the channel
        count). ``measured``: the loss increase itself, one pass of the network suffix from the
        channel's layer on over ``data`` per channel and bit width.
    probes, rounds, seed
        ``cet``'s probes, as in :func:`cetopt.sensitivity`.
    loss_fn, layers, max_batches, clip_search, progress
        As in :func:`cetopt.sensitivity`.

    Returns
    -------
    SensitivityTable
        One row per output channel, named ``"layer[c]"``, method ``"cet-channel"`` or
        ``"measured-channel"``. ``meta["layers"]`` lists the layers in order.
    """
    if method not in ("auto", "cet", "measured"):
        raise CetoptError(
            f"unknown per-channel sensitivity method {method!r}; available: auto, cet, measured"
        )
    names = quantizable_layers(model, layers)
    bits = checked_bits(bits)
    start = time.perf_counter()
    obj = LossObjective(model, data, names, loss_fn=loss_fn, max_batches=max_batches)
    choice = None
    if method == "auto":
        method, choice = choose_method(obj, len(bits), int(probes), int(rounds), per_channel=True)
    quantized = {
        b: {k: fake_quantize(w, b, clip_search=clip_search) for k, w in obj.weights.items()} for b in bits
    }
    base = obj.loss()
    stderr, meta = None, {}
    if method == "cet":
        values, stderr, meta = _cet(
            obj, quantized, cet_options(probes, rounds, seed, progress, probe_chunk(obj))
        )
    else:
        values = _measured(obj, quantized, base, progress)
    if choice is not None:
        meta = {**meta, "auto": choice}
    rows, params, macs, fixed = [], [], [], []
    for name, key, info in zip(names, obj.keys, obj.layers):
        rows += [_row_name(name, c) for c in range(info.channels)]
        params += [obj.weights[key][c].numel() for c in range(info.channels)]
        macs += _split(info.macs, info.channels)
        fixed += _split(info.fixed_bytes, info.channels)
    return SensitivityTable(
        layers=rows,
        bits=bits,
        values=values,
        params=params,
        method=f"{method}-channel",
        stderr=stderr,
        channels=[1] * len(rows),
        macs=macs,
        fixed_bytes=fixed,
        meta={
            **meta,
            "layers": names,
            "seconds": time.perf_counter() - start,
            "examples": obj.total,
            "base_loss": base,
        },
    )


def channel_bits(plan) -> dict[str, list[int]]:
    """One bit width per output channel, per layer, from a plan over ``"layer[c]"`` rows.

    Parameters
    ----------
    plan : Plan or mapping
        A :class:`cetopt.Plan` from a :func:`channel_sensitivity` table, or its ``bits`` mapping.

    Returns
    -------
    dict
        Layer name → list of bit widths, channel by channel; what :func:`cetopt.quantize` takes.
    """
    bits = plan.bits if hasattr(plan, "bits") else plan
    if not isinstance(bits, Mapping):
        raise TypeError(f"plan must be a cetopt.Plan or a mapping, got {type(plan).__name__}")
    per_layer: dict[str, dict[int, int]] = {}
    for row, b in bits.items():
        split = split_channel_row(row)
        if split is None:
            raise CetoptError(f"{row!r} is not a per-channel row (expected 'layer[c]')")
        per_layer.setdefault(split[0], {})[split[1]] = int(b)
    out = {}
    for layer, widths in per_layer.items():
        if sorted(widths) != list(range(len(widths))):
            raise CetoptError(f"the plan does not give every channel of {layer!r} a width")
        out[layer] = [widths[c] for c in range(len(widths))]
    return out
