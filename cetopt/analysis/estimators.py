"""``sensitivity``: the predicted loss increase of quantizing each layer to each bit width.

Each method is one function ``(objective, deltas, options) -> (values, stderr, meta)`` in
``METHODS``, where ``deltas[b][layer] = Q_b(W) − W`` is the actual quantization perturbation.

* ``cet`` — ``gᵀΔ + ½ ΔᵀHΔ`` per (layer, bits), CET's second-order form. The quadratic term uses
  Hessian-vector products along signed combinations ``u = Σ_l s_l Δ_l``: ``s_l Δ_lᵀ (H u)_l`` is
  ``Δ_lᵀ H_ll Δ_l`` plus cross terms ``s_l s_m Δ_lᵀ H_lm Δ_m`` that the probes' signs cancel
  (:mod:`cetopt.analysis.probes`: orthogonal Hadamard signs, exact once the probes reach the next
  power of two above the layer count; random signs and a standard error over independent rounds
  otherwise). One HVP serves every layer at a bit width, so the cost is ``bits × probes`` HVPs
  whatever the layer count; all probes of a pass run together under ``vmap``.
* ``hutchinson`` — HAWQ-V2/V3: ``½ · Tr(H_ll)/n_l · ‖Δ_l‖²``, with the per-layer traces from one set
  of Rademacher probes over all layers, stopped when every trace changes by less than ``tol``.
* ``fisher`` — ``½ Σ_i F_ii Δ_i²`` with the diagonal empirical Fisher (mean squared per-example
  gradient, from ``vmap`` over ``grad``).
* ``measured`` — the loss increase of quantizing each layer alone, one evaluation per
  (layer, bits): the ground truth the estimators are checked against. Each evaluation runs only
  the network suffix from that layer on (:mod:`cetopt.analysis.replay`).
* ``auto`` (the default) — ``measured`` or ``cet``, whichever is cheaper here
  (:mod:`cetopt.analysis.auto`); ``table.meta["auto"]`` says which and why. Its ``measured``
  takes the batches in rounds that double the examples (from 64) and stops once a round leaves
  the ranking of the layers at the two lowest bit widths as it was (Spearman ≥ 0.95):
  ``meta["examples_used"]`` says how many it used.

Probes and per-example gradients are taken in chunks sized to a working-memory bound
(:data:`WORKING_BYTES`), so memory does not grow with the probe count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.analysis._common import WORKING_BYTES, checked_bits, progress_bar
from cetopt.analysis.auto import choose_method
from cetopt.analysis.objective import LossObjective, quantizable_layers
from cetopt.analysis.probes import probe_design
from cetopt.analysis.replay import measure_trials
from cetopt.analysis.table import SensitivityTable
from cetopt.errors import CetoptError
from cetopt.quant.quantizer import check_group_size, fake_quantize

#: Widest bit width :func:`sensitivity` scores with group-wise options by default.
GROUP_MAX_BITS = 4

__all__ = ["METHODS", "sensitivity"]

Deltas = dict[int, dict[str, torch.Tensor]]


def _chunks(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def cet_quadratic(obj: LossObjective, deltas: Deltas, units: dict[str, torch.Tensor], opts: dict):
    """``gᵀΔ_u + ½ Δ_uᵀH_uuΔ_u`` for every unit and bit width, with its standard error.

    ``units[key][c]`` is the unit that output channel ``c`` of weight ``key`` belongs to: one unit
    per layer for :func:`sensitivity`, one per channel for :func:`cetopt.channel_sensitivity`.
    The probes follow :func:`cetopt.analysis.probes.probe_design`.
    """
    keys, bits = obj.keys, list(deltas)
    count = 1 + max(int(units[k].max()) for k in keys)
    design = probe_design(count, opts["probes"], opts["rounds"], np.random.default_rng(opts["seed"]))
    g = obj.gradient()
    linear = np.zeros((count, len(bits)))
    samples = np.zeros((count, len(bits), design.probes))
    with progress_bar(len(bits) * design.probes, "cet: Hessian-vector probes", opts["progress"]) as bar:
        for j, b in enumerate(bits):
            for k in keys:
                per_channel = (g[k] * deltas[b][k]).flatten(1).sum(1).double().numpy()
                np.add.at(linear[:, j], units[k].numpy(), per_channel)
            for block in _chunks(design.probes, opts["chunk"]):
                signs = design.signs[block.start : block.stop]
                channel_signs = {k: signs[:, units[k]] for k in keys}
                u = {
                    k: channel_signs[k].view(*channel_signs[k].shape, *[1] * (deltas[b][k].dim() - 1))
                    * deltas[b][k]
                    for k in keys
                }
                hu = obj.hvp(u)
                for k in keys:
                    # s_u Δ_uᵀ (H v)_u, one value per probe and channel, summed into the units
                    per_channel = channel_signs[k] * (deltas[b][k].unsqueeze(0) * hu[k]).flatten(2).sum(2)
                    window = samples[:, j, block.start : block.stop]  # a view: filled in place
                    np.add.at(window, units[k].numpy(), per_channel.T.double().numpy())
                bar.update(len(block))
    per_round = np.stack(
        [samples[:, :, design.rounds == r].mean(axis=2) for r in np.unique(design.rounds)], axis=2
    )
    quad = per_round.mean(axis=2)
    if design.exact:
        stderr = np.zeros_like(quad)
    elif per_round.shape[2] > 1:
        stderr = 0.5 * per_round.std(axis=2, ddof=1) / np.sqrt(per_round.shape[2])
    else:
        stderr = np.full_like(quad, np.nan)
    meta = {
        "probes": design.probes,
        "rounds": per_round.shape[2],
        "exact": design.exact,
        "hvps": len(bits) * design.probes,
        "first_order": linear.tolist(),
    }
    return linear + 0.5 * quad, stderr, meta


def activation_bytes(obj: LossObjective) -> int:
    """Rough bytes of one batch's activations: the quantizable layers' outputs, three times over
    (their normalisations and activations), from the per-example MACs the objective measured."""
    per_example = sum(info.macs // max(info.weight[0].numel(), 1) for info in obj.layers)
    return 12 * per_example * max(len(x) for x, _ in obj.batches)


def probe_chunk(obj: LossObjective, limit: int = 16) -> int:
    """Probes per vmapped HVP pass: at most ``limit``, fewer where the probes' working sets (a
    batch's activations and two weight-sized tangents each) would exceed :data:`WORKING_BYTES`."""
    per_probe = activation_bytes(obj) + 8 * sum(w.numel() for w in obj.weights.values())
    return int(max(1, min(limit, WORKING_BYTES // max(per_probe, 1))))


def cet_options(probes: int, rounds: int, seed: int, progress: bool, chunk: int = 16) -> dict:
    """The options :func:`cet_quadratic` reads, from the public keywords."""
    return {
        "probes": max(int(probes), 1),
        "rounds": max(int(rounds), 1),
        "chunk": max(int(chunk), 1),
        "seed": seed,
        "progress": progress,
    }


def _cet(obj: LossObjective, deltas: Deltas, opts: dict):
    units = {k: torch.full((obj.weights[k].shape[0],), i) for i, k in enumerate(obj.keys)}
    return cet_quadratic(obj, deltas, units, opts)


def _hutchinson(obj: LossObjective, deltas: Deltas, opts: dict):
    keys = obj.keys
    gen = torch.Generator().manual_seed(opts["seed"])
    draws: list[np.ndarray] = []
    done, estimate = False, None
    with progress_bar(opts["max_probes"], "hutchinson: trace probes", opts["progress"]) as bar:
        while not done and len(draws) < opts["max_probes"]:
            n = min(opts["chunk"], opts["max_probes"] - len(draws))
            v = {
                k: (torch.randint(0, 2, (n, *obj.weights[k].shape), generator=gen) * 2 - 1).float()
                for k in keys
            }
            hv = obj.hvp(v)
            for p in range(n):
                draws.append(np.array([float((v[k][p] * hv[k][p]).sum()) for k in keys]))
            bar.update(n)
            new = np.mean(draws, axis=0)
            if estimate is not None and len(draws) >= opts["min_probes"]:
                change = np.abs(new - estimate) / np.maximum(np.abs(estimate), 1e-12)
                done = bool(np.all(change < opts["tol"]))
            estimate = new
    traces = np.mean(draws, axis=0)
    params = np.array([obj.weights[k].numel() for k in keys])
    sq = np.array([[float((deltas[b][k] ** 2).sum()) for b in deltas] for k in keys])
    values = 0.5 * (traces / params)[:, None] * sq
    trace_se = np.std(draws, axis=0, ddof=1) / np.sqrt(len(draws))
    stderr = 0.5 * (trace_se / params)[:, None] * sq
    return values, stderr, {"probes": len(draws), "traces": traces.tolist()}


def _fisher(obj: LossObjective, deltas: Deltas, opts: dict):
    fisher = {k: torch.zeros_like(w) for k, w in obj.weights.items()}
    with progress_bar(len(obj.batches), "fisher: per-example gradients", opts["progress"]) as bar:
        for x, y in obj.batches:
            for block in _chunks(len(x), opts["sample_chunk"]):
                grads = obj.per_sample_gradients(x[block.start : block.stop], y[block.start : block.stop])
                for k in fisher:
                    fisher[k] += (grads[k] ** 2).sum(dim=0)
            bar.update(1)
    values = np.array(
        [[0.5 * float((fisher[k] / obj.total * deltas[b][k] ** 2).sum()) for b in deltas] for k in obj.keys]
    )
    return values, None, {}


def _measured(obj: LossObjective, deltas: Deltas, opts: dict):
    trials = [(obj.site(k), lambda k=k, b=b: obj.weights[k] + deltas[b][k]) for k in obj.keys for b in deltas]
    layers = obj.keys
    total = len(trials) * len(obj.batches)
    shape = (len(layers), len(deltas))
    stable = _stable_ranking(shape) if opts.get("stable") else None
    with progress_bar(total, "measured: quantize each layer alone", opts["progress"]) as bar:
        losses, base, used = measure_trials(
            obj.model, obj.batches, obj.loss_fn, trials, bar, stable, min_examples=MIN_STABLE_EXAMPLES
        )
    values = np.array(losses).reshape(shape) - base
    return values, None, {"examples_used": used, "base_loss": _full_loss(obj, base, used)}


@torch.no_grad()
def _full_loss(obj: LossObjective, base: float, used: int) -> float:
    """The loss over all of ``obj``'s data, given ``base``, the mean over its first ``used`` examples:
    only the batches not yet seen run."""
    if used >= obj.total:
        return base
    total, seen = base * used / obj.total, 0
    for x, y in obj.batches:
        if seen >= used:
            total += float(obj._batch_loss(obj.weights, x, y)) * len(x) / obj.total
        seen += len(x)
    return total


STABLE_RANK = 0.95  # rank correlation across layers at which more examples stop paying
# Below this many calibration examples ``auto``'s measured uses them all: the whole table then costs
# a few dozen forward passes, and stopping early changed a zoo plan (mnist1d-cnn, seed 2, 10x).
MIN_STABLE_EXAMPLES = 4096


def _stable_ranking(shape: tuple[int, int]) -> Callable[[np.ndarray, np.ndarray], bool]:
    """Whether two measured tables (flat) rank the layers alike at the two lowest bit widths,
    where the allocation's choices bite (Spearman ≥ :data:`STABLE_RANK` at each)."""

    def stable(previous: np.ndarray, current: np.ndarray) -> bool:
        a, b = previous.reshape(shape), current.reshape(shape)
        if shape[0] < 3:
            return False
        rhos = [stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(min(2, shape[1]))]
        return bool(np.all(np.nan_to_num(rhos) >= STABLE_RANK))

    return stable


METHODS: dict[str, Callable] = {
    "cet": _cet,
    "hutchinson": _hutchinson,
    "fisher": _fisher,
    "measured": _measured,
}


@in_eval_mode("model")
def sensitivity(
    model: nn.Module,
    data,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    method: str = "auto",
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    layers: Sequence[str] | None = None,
    probes: int = 16,
    rounds: int = 2,
    tol: float = 1e-2,
    max_probes: int = 200,
    max_batches: int | None = None,
    clip_search: bool = True,
    seed: int = 0,
    progress: bool = True,
    group_sizes: Sequence[int | None] | None = None,
    group_max_bits: int = GROUP_MAX_BITS,
    gptq=None,
    act_order: bool = True,
) -> SensitivityTable:
    """Predicted loss increase of quantizing each layer alone to each bit width (and group size).

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode; not modified.
    data : iterable of (inputs, targets)
        A DataLoader or any iterable of batches; the loss is averaged over all of it.
    bits : sequence of int
        Candidate bit widths (2 to 16).
    method : {"auto", "cet", "hutchinson", "fisher", "measured"}
        See the module docstring. ``auto`` runs the cheaper of ``measured`` and ``cet`` and
        records its choice and reason in ``meta["auto"]``.
    loss_fn : callable or str, optional
        ``loss_fn(outputs, targets)`` returning the mean loss of a batch; default cross-entropy.
        ``"next_token"``: a causal LM's shifted cross-entropy (the data may be the tokens alone).
        ``"kl_to_float"``: the mean KL divergence of the quantized model's output distribution
        from the float model's on the same inputs (:func:`cetopt.analysis.objective.kl_to_float`;
        the data's targets are not used, the data may be inputs alone): at least 0 for every
        option of ``measured`` and far less noisy than a task loss on few batches, since both
        models see the same inputs. ``cet`` then scores ``½ ΔᵀFΔ`` with ``F`` the Fisher
        information of the model's outputs (the gradient is zero); ``fisher`` cannot (its
        per-example gradients vanish) and raises.
    layers : sequence of str, optional
        Layers to score; default every Linear / Conv layer.
    probes : int
        ``cet``: HVP probes per bit width. With at least the next power of two above the layer
        count the quadratic term is exact (standard error 0).
    rounds : int
        ``cet``: independent rounds the probes are split into when they cannot be exact; the
        standard error is taken over them (NaN with one round).
    tol, max_probes : float, int
        ``hutchinson``: stop when every layer's trace changes by less than ``tol`` (relative), or
        after ``max_probes``.
    max_batches : int, optional
        Use only the first batches of ``data``.
    clip_search : bool
        Quantize with the MSE-optimal clipping :func:`cetopt.quantize` uses.
    seed : int
        Seed of the random probes.
    progress : bool
        Show progress bars.
    group_sizes : sequence of int or None, optional
        Scale granularities to score, e.g. ``(None, 128, 64, 32)`` (``None``: per output channel).
        Each bit width up to ``group_max_bits`` gets one option per size; wider ones stay per
        channel (groups buy little there and would multiply the cost). The table's columns are
        then ``(bits, group)`` options, ordered by bits, coarsest group first.
    group_max_bits : int
        Widest bit width scored with group options.
    gptq : iterable, optional
        Calibration batches. If given, every option is scored on the weight GPTQ rounds it to
        (:func:`cetopt.quant.gptq_option_weights`: each layer rounded alone on the float model's
        inputs, at that option) instead of round-to-nearest: the perturbation that
        ``quantize(..., gptq=...)`` applies. Layers GPTQ does not round (embeddings) keep their
        round-to-nearest perturbation. ``meta["gptq"]`` is then True.
    act_order : bool
        GPTQ's act-order for ``gptq`` (as in :func:`cetopt.quantize`).

    Returns
    -------
    SensitivityTable
        With ``stderr`` for the stochastic methods, and ``channels``, ``macs`` and
        ``fixed_bytes`` filled in for the allocation's byte and BOPs rows; ``groups`` when
        ``group_sizes`` is given.
    """
    if method not in METHODS and method != "auto":
        raise CetoptError(f"unknown sensitivity method {method!r}; available: auto, {', '.join(METHODS)}")
    names = quantizable_layers(model, layers)
    bits = checked_bits(bits)
    options = group_options(bits, group_sizes, group_max_bits)
    start = time.perf_counter()
    obj = LossObjective(model, data, names, loss_fn=loss_fn, max_batches=max_batches)
    if obj.reference and method == "fisher":
        raise CetoptError(
            "method='fisher' cannot score loss_fn='kl_to_float': every per-example gradient of a "
            "divergence from the float model is zero at the float weights; use 'measured' or 'cet'"
        )
    choice = None
    if method == "auto":
        method, choice = choose_method(obj, len(options), int(probes), int(rounds))
        choice["stable_ranking"] = STABLE_RANK
        choice["min_examples_before_stopping"] = MIN_STABLE_EXAMPLES
    deltas = _perturbations(model, obj, options, clip_search, gptq, act_order, progress)
    opts = {
        **cet_options(probes, rounds, seed, progress, probe_chunk(obj)),
        "tol": tol,
        "max_probes": max(int(max_probes), 2),
        "min_probes": 8,
        "sample_chunk": sample_chunk(obj),
        "progress": progress,
        "stable": choice is not None,
    }
    values, stderr, meta, method = _run(method, obj, deltas, opts, choice)
    return SensitivityTable(
        layers=names,
        bits=[b for b, _ in options],
        groups=None if group_sizes is None else [g for _, g in options],
        values=values,
        params=[info.weight.numel() for info in obj.layers],
        method=method,
        stderr=stderr,
        channels=[info.channels for info in obj.layers],
        macs=[info.macs for info in obj.layers],
        fixed_bytes=[info.fixed_bytes for info in obj.layers],
        meta={
            **meta,
            "seconds": time.perf_counter() - start,
            "examples": obj.total,
            "base_loss": meta["base_loss"] if "base_loss" in meta else obj.loss(),
            "kept_float": list(obj.kept_float),
            "tied": {t.name: list(t.tied) for t in obj.targets if t.tied},
            "gptq": gptq is not None,
            "loss": _loss_name(loss_fn),
        },
    )


def _loss_name(loss_fn) -> str:
    """How ``meta["loss"]`` names the loss the table was scored with."""
    if loss_fn is None:
        return "cross_entropy"
    if isinstance(loss_fn, str):
        return loss_fn
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _perturbations(model, obj: LossObjective, options, clip_search: bool, gptq, act_order: bool, progress):
    """``deltas[(bits, group)][key]``: each weight's change at each option (codes layout), rounded
    to nearest, or by GPTQ on ``gptq`` (one pass of GPTQ per option, every layer rounded alone)."""
    if gptq is None:
        return {
            (b, g): {
                k: fake_quantize(w, b, clip_search=clip_search, group_size=g) - w
                for k, w in obj.weights.items()
            }
            for b, g in options
        }
    from cetopt.quant.apply import gptq_option_weights

    names = {t.key: t.name for t in obj.targets}
    rounded = gptq_option_weights(
        model,
        list(names.values()),
        options,
        gptq,
        clip_search=clip_search,
        act_order=act_order,
        progress=progress,
    )
    return {
        option: {
            k: rounded[option][names[k]].reshape(w.shape).to(w.dtype) - w for k, w in obj.weights.items()
        }
        for option in options
    }


def group_options(
    bits: Sequence[int], group_sizes: Sequence[int | None] | None, max_bits: int = GROUP_MAX_BITS
) -> list[tuple[int, int | None]]:
    """The ``(bits, group size)`` options scored: every size for widths up to ``max_bits``, per
    channel above; sorted by bits, then per channel (``None``) before decreasing group sizes."""
    if group_sizes is None:
        return [(int(b), None) for b in bits]
    if isinstance(group_sizes, (int, str)) or not isinstance(group_sizes, Iterable):
        raise CetoptError(f"group_sizes must be a sequence of group sizes or None, got {group_sizes!r}")
    sizes = []
    for g in group_sizes:
        try:
            sizes.append(check_group_size(g))
        except ValueError as exc:
            raise CetoptError(f"group_sizes: {exc}") from None
    sizes = sorted(set(sizes), key=lambda g: -math.inf if g is None else -g)
    out = []
    for b in sorted(set(int(b) for b in bits)):
        for g in sizes if b <= max_bits else [None]:
            out.append((b, g))
    return out


def _lacks_forward_ad(exc: Exception) -> bool:
    """Whether ``exc`` says a kernel has no forward-mode AD (what ``cet``'s HVPs need): torch raises
    ``NotImplementedError``, or a ``RuntimeError`` naming forward AD."""
    return isinstance(exc, NotImplementedError) or "forward AD" in str(exc)


def _run(method: str, obj: LossObjective, deltas: Deltas, opts: dict, choice: dict | None):
    """``METHODS[method]``'s result and the method that produced it; under ``auto`` a ``cet`` that
    the model's kernels cannot run (no forward-mode AD) gives way to ``measured``."""
    if choice is None:
        return (*METHODS[method](obj, deltas, opts), method)
    try:
        values, stderr, meta = METHODS[method](obj, deltas, opts)
    except (NotImplementedError, RuntimeError) as exc:
        if method != "cet" or not _lacks_forward_ad(exc):
            raise
        first_line = str(exc).splitlines()[0][:120] if str(exc) else ""
        why = f"{choice['reason']}; but cet cannot run here ({type(exc).__name__}: {first_line}), so measured"
        choice = {**choice, "chose": "measured", "reason": why}
        method = "measured"
        values, stderr, meta = METHODS[method](obj, deltas, opts)
    return values, stderr, {**meta, "auto": choice}, method


def sample_chunk(obj: LossObjective, limit: int = 128) -> int:
    """Examples per vmapped per-example-gradient pass for ``fisher``: at most ``limit``, fewer
    where their gradients (one weight-sized tensor each) would exceed :data:`WORKING_BYTES`."""
    per_example = 8 * sum(w.numel() for w in obj.weights.values())
    per_example += activation_bytes(obj) // max(len(x) for x, _ in obj.batches)
    return int(max(1, min(limit, WORKING_BYTES // max(per_example, 1))))
