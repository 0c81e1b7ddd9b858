"""``self_compress``: learn per-channel bit depths during training, guarded by a preservation set.

Safety-guided self-compression (arXiv 2505.00350, on Self-Compressing Neural Networks, Cséfalvay &
Imber 2023). Every Linear/Conv output channel learns a bit depth ``b`` and an exponent ``e``; the
loss is

    CE(batch) + size_weight · Q + preservation_weight · CE(preservation batch),
    Q = (bits the quantized weights store) / (number of quantized weights),

with ``Q`` counting exactly what :func:`cetopt.save` writes (codes at ``ceil(b)`` bits, plus a
scale and a bit width per kept channel). Every ``check_every`` steps the preservation accuracy is
measured; when it has fallen more than ``restore_threshold`` below its value at the start, a share
of the zero-bit channels (not yet removed) is restored to ``restore_bits`` bits, and the event is
logged. Channels that stay at zero bits for ``removal_grace`` steps are removed structurally
through the rewriter, with their inputs downstream and their optimizer state.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cetopt._modes import eval_mode, in_eval_mode
from cetopt.analysis._common import progress_bar
from cetopt.errors import DataShapeError, NonFiniteError, NoQuantizableLayerError
from cetopt.graph.decisions import Decision, Quantize
from cetopt.graph.rewriter import rewrite
from cetopt.quant.quantizer import QuantizedWeight, storage_dtype
from cetopt.selfcompress.layers import self_compressing_from_float
from cetopt.selfcompress.preservation import PreservationSet, build_preservation_set
from cetopt.selfcompress.structure import mark_removable, removal_decisions, rewrite_with_optimizer, sc_layers
from cetopt.zoo.training import task_loss

__all__ = ["RestoreEvent", "SelfCompressionResult", "self_compress"]

logger = logging.getLogger("cetopt.selfcompress")


@dataclass(frozen=True)
class RestoreEvent:
    """One firing of the restore rule.

    Attributes
    ----------
    step : int
    accuracy : float
        Preservation accuracy that triggered it.
    reference : float
        The preservation accuracy it was compared with (at the start, or the best so far).
    channels : dict
        Layer name → indices (in the layer as it was at that step) of the channels restored.
    """

    step: int
    accuracy: float
    reference: float
    channels: dict[str, list[int]]

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.channels.values())


@dataclass(eq=False)
class SelfCompressionResult:
    """What :func:`self_compress` produced.

    Attributes
    ----------
    model : nn.Module
        The compressed model: ``cetopt.nn`` quantized layers with the learned bits, zero-bit
        channels removed; :func:`cetopt.save` writes it packed.
    trained : nn.Module
        The model with its self-compressing layers, as trained (same outputs as ``model``).
    preservation : PreservationSet or None
    restores : list of RestoreEvent
    removals : list of Decision
        The ``RemoveUnits`` decisions applied during training, in order.
    log : list of dict
        Per check: step, task loss, Q (bits per weight), preservation accuracy, alive channels.
    size_bytes : int
        Bytes of the quantized weights as stored (packed codes, scales, bit widths).
    bits : dict
        Layer name → stored bits per kept channel.
    """

    model: nn.Module
    trained: nn.Module
    preservation: PreservationSet | None
    restores: list[RestoreEvent] = field(default_factory=list)
    removals: list[Decision] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    size_bytes: int = 0
    bits: dict[str, list[int]] = field(default_factory=dict)


def _split_data(train_data, holdout: float, generator: torch.Generator):
    """All training rows, and which of them are fitted on and which are held out.

    A zoo Dataset gives its train split (fitted on) followed by its held-out ``val`` split; a
    tuple ``(x, y)`` is split at random, ``holdout`` of it held out.
    """
    if hasattr(train_data, "x_train") and hasattr(train_data, "x_val"):
        x = torch.cat([train_data.x_train, train_data.x_val])
        y = torch.cat([train_data.y_train, train_data.y_val])
        n = len(train_data.x_train)
        return x, y, np.arange(n), np.arange(n, len(x))
    if not (isinstance(train_data, (tuple, list)) and len(train_data) == 2):
        raise DataShapeError(
            "train_data must be (inputs, targets) tensors or a cetopt.zoo Dataset, "
            f"got {type(train_data).__name__}"
        )
    x, y = train_data
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise DataShapeError(f"train_data must hold two tensors, got {type(x).__name__}, {type(y).__name__}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
    order = torch.randperm(len(x), generator=generator).numpy()
    n_hold = max(1, round(holdout * len(x)))
    return x, y, np.sort(order[n_hold:]), np.sort(order[:n_hold])


def _check_data(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) != len(y):
        raise DataShapeError(f"train_data: {len(x)} inputs but {len(y)} targets")
    if len(x) < 20:
        raise DataShapeError(f"train_data: {len(x)} examples; self-compression needs at least 20")
    if y.is_floating_point():
        raise DataShapeError(f"train_data targets must be integer class labels, got {y.dtype}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int(torch.nonzero(~torch.isfinite(x.reshape(len(x), -1)).all(dim=1))[0, 0])
        raise NonFiniteError(f"train_data inputs hold NaN or infinity (example {bad})")
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except Exception as exc:  # any shape/dtype failure of the user's model on the data
        raise DataShapeError(
            f"train_data inputs of shape {tuple(x.shape[1:])} do not fit the model: {exc}"
        ) from exc
    if not torch.is_tensor(out) or out.shape[:-1] != y[:2].shape:
        raise DataShapeError(
            f"train_data targets have shape {tuple(y.shape[1:])} per example, but the model outputs "
            f"{tuple(out.shape[1:]) if torch.is_tensor(out) else type(out).__name__} "
            "(expected the targets' shape plus a class dimension)"
        )
    if int(y.min()) < 0 or int(y.max()) >= out.shape[-1]:
        raise DataShapeError(
            f"train_data targets must lie in [0, {out.shape[-1] - 1}], got {int(y.min())}..{int(y.max())}"
        )


def _swap_layers(model: nn.Module, layers: Sequence[str] | None, init_bits: float) -> list[str]:
    candidates = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        or (
            isinstance(m, nn.modules.conv._ConvNd)
            and m.groups == 1
            and not m.transposed
            and m.padding_mode == "zeros"
        )
    ]
    if layers is not None:
        unknown = sorted(set(layers) - set(candidates))
        if unknown:
            raise NoQuantizableLayerError(f"layers {unknown} are not Linear/Conv layers of the model")
        candidates = [n for n in candidates if n in set(layers)]
    if not candidates:
        raise NoQuantizableLayerError(
            f"{type(model).__name__} has no nn.Linear or ungrouped nn.ConvNd layer that "
            "self-compression can quantize"
        )
    for name in candidates:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, self_compressing_from_float(model.get_submodule(name), init_bits))
    return candidates


def _optimizer(model: nn.Module, lr: float, bit_lr: float) -> torch.optim.Optimizer:
    quant = [p for n, p in model.named_parameters() if n.endswith(("bits", "exponent"))]
    qids = {id(p) for p in quant}
    rest = [p for p in model.parameters() if id(p) not in qids]
    return torch.optim.Adam([{"params": rest, "lr": lr}, {"params": quant, "lr": bit_lr}])


def size_term(model: nn.Module) -> tuple[torch.Tensor, int]:
    """Q's numerator and denominator: stored bits of every self-compressing layer, and their weights."""
    layers = sc_layers(model).values()
    bits = sum(layer.size_bits() for layer in layers)
    weights = sum(layer.weight.numel() for layer in layers)
    return bits, weights


def storage_bytes(model: nn.Module) -> int:
    """Exact bytes :func:`cetopt.save` writes for the quantized weights of the self-compressing layers."""
    return sum(layer.storage_bytes() for layer in sc_layers(model).values())


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with eval_mode(model):
        return (model(x).argmax(-1) == y).float().mean().item()


class _Trainer:
    """The training loop's state: model, optimizer, dead-channel clocks, logs."""

    def __init__(self, model, optimizer, example_inputs, opts):
        self.model, self.optimizer, self.example_inputs, self.o = model, optimizer, example_inputs, opts
        self.restores: list[RestoreEvent] = []
        self.removals: list[Decision] = []
        self.log: list[dict] = []

    def clock(self, step: int) -> None:
        for layer in sc_layers(self.model).values():
            dead = ~layer.alive()
            since = layer.zero_since
            since[dead & (since < 0)] = step
            since[~dead] = -1

    def restore(self, step: int, accuracy: float, reference: float) -> None:
        layers = sc_layers(self.model)
        dead = [
            (float(m.bits.detach()[i]), n, int(i))
            for n, m in layers.items()
            for i in torch.nonzero(~m.alive()).flatten()
        ]
        if not dead:
            return
        count = max(1, math.ceil(self.o["restore_share"] * len(dead)))
        chosen = sorted(dead, reverse=True)[:count]  # the most recently dead (b nearest to zero) first
        channels: dict[str, list[int]] = {}
        for _, name, i in chosen:
            channels.setdefault(name, []).append(i)
        for name, idx in channels.items():
            layer = layers[name]
            with torch.no_grad():
                layer.bits[idx] = float(self.o["restore_bits"])
            for v in self.optimizer.state.get(layer.bits, {}).values():
                if torch.is_tensor(v) and v.dim():
                    v[idx] = 0.0
            layer.zero_since[idx] = -1
        event = RestoreEvent(step, accuracy, reference, {n: sorted(v) for n, v in channels.items()})
        self.restores.append(event)
        logger.info(
            "restore at step %d: preservation accuracy %.4f < %.4f - %.4f; "
            "restored %d zero-bit channels to %s bits: %s",
            step,
            accuracy,
            reference,
            self.o["restore_threshold"],
            event.count,
            self.o["restore_bits"],
            event.channels,
        )

    def remove(self, step: int, final: bool) -> None:
        grace = 0 if final else self.o["removal_grace"]
        ready = {}
        for name, layer in sc_layers(self.model).items():
            since = layer.zero_since
            ready[name] = ((since >= 0) & (step - since >= grace) & layer.removable & ~layer.alive()).numpy()
        if not any(r.any() for r in ready.values()):
            return
        decisions = removal_decisions(self.model, self.example_inputs, ready)
        if decisions:
            self.model, self.optimizer = rewrite_with_optimizer(
                self.model, decisions, self.example_inputs, self.optimizer
            )
            self.removals.extend(decisions)
            logger.info("step %d: removed %s", step, {d.layer: len(d.units) for d in decisions})
        if final:  # whatever zero-bit channel is still here cannot go: it is stored with one bit
            for layer in sc_layers(self.model).values():
                layer.removable &= layer.alive()

    def step(self, xb, yb, pres, generator) -> dict:
        o = self.o
        self.model.train()
        loss = task_loss(self.model(xb), yb)
        total = loss
        if pres is not None and o["preservation_weight"]:
            pick = torch.randint(len(pres), (min(o["preservation_batch"], len(pres)),), generator=generator)
            total = total + o["preservation_weight"] * task_loss(self.model(pres.x[pick]), pres.y[pick])
        bits, weights = size_term(self.model)
        q = bits / weights
        total = total + o["size_weight"] * q
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        with torch.no_grad():
            for layer in sc_layers(self.model).values():
                layer.bits.clamp_(max=o["max_bits"])
        return {"loss": loss.item(), "Q": q.item()}


def _export(original: nn.Module, trained: nn.Module, removals: list[Decision], example_inputs) -> nn.Module:
    """The trained model as ``cetopt.nn`` quantized layers, built from ``original`` through the rewriter.

    The history (removals, then one ``Quantize`` per layer) lets :func:`cetopt.load` rebuild it;
    the learned codes, exponents and bits then replace what ``Quantize`` computed.
    """
    layers = sc_layers(trained)
    plan = {name: layer.storage_bits_per_weight()[layer.kept()] for name, layer in layers.items()}
    quantize = [
        Quantize(name, [max(2, int(b)) for b in bits], clip_search=False) for name, bits in plan.items()
    ]
    final = rewrite(original, [*removals, *quantize], example_inputs if removals else None)
    state = final.state_dict()
    skip = {
        f"{name}.{key}"
        for name in layers
        for key in ("weight", "bias", "bits", "exponent", "removable", "zero_since")
    }
    state.update({k: v for k, v in trained.state_dict().items() if k not in skip})
    final.load_state_dict(state, strict=True)
    for name, layer in layers.items():
        kept = layer.kept()
        bits = plan[name]
        target = final.get_submodule(name)
        q = layer.integer_codes()[kept].to(storage_dtype(max(2, int(bits.max()))))
        scale = torch.pow(2.0, layer.exponent.detach()[kept]).to(torch.float32)
        target.set_quantized(QuantizedWeight(q=q, scale=scale, bits=bits.to(torch.int16)))
        if layer.bias is not None:
            target.bias = nn.Parameter(layer.masked_bias().detach()[kept].clone())
    return final.eval()


@in_eval_mode("model")
def self_compress(
    model: nn.Module,
    train_data,
    *,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 1e-3,
    bit_lr: float = 0.05,
    size_weight: float = 0.1,
    init_bits: float = 8.0,
    max_bits: float = 16.0,
    preservation: bool = True,
    preservation_size: int = 256,
    preservation_weight: float = 0.05,
    preservation_batch: int = 64,
    holdout: float = 0.1,
    restore_threshold: float = 0.05,
    restore_reference: str = "start",
    restore_share: float = 0.25,
    restore_bits: float = 2.0,
    check_every: int = 10,
    remove_every: int = 50,
    removal_grace: int = 100,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SelfCompressionResult:
    """Compress ``model`` by learning each output channel's bit depth during training.

    Parameters
    ----------
    model : nn.Module
        A trained classifier (logits ``(N, C)``) or language model (logits ``(N, T, V)``). Not modified.
    train_data : (Tensor, Tensor) or cetopt.zoo.Dataset
        Training inputs and integer targets. Of a tuple, a random ``holdout`` share is set aside
        and never trained on; of a Dataset, the train split is trained on and the ``val`` split
        (held out from training) is set aside. The preservation set is drawn from the part set
        aside; the test split is never read.
    steps, batch_size, lr : training schedule (Adam; ``lr`` for the weights and biases).
    bit_lr : float
        Adam learning rate of the bit depths and exponents.
    size_weight : float
        Weight of ``Q`` (stored bits per quantized weight) in the loss.
    init_bits, max_bits : float
        Starting bit depth of every channel, and its cap.
    preservation : bool
        Use the preservation set (loss term and restore rule); ``False`` is plain self-compression.
    preservation_size, preservation_weight, preservation_batch
        Size of the set (at most the held-out rows), its loss weight, its batch size.
    holdout : float
        Share of a tuple ``train_data`` held out for the preservation set.
    restore_threshold : float
        Restore when preservation accuracy falls more than this (a fraction: 0.05 = 5 pp) below the
        reference.
    restore_reference : {"start", "best"}
        The reference: preservation accuracy at the start of training (as in the paper), or the
        best seen so far (also catches a drop after the preservation loss has raised it).
    restore_share, restore_bits
        Share of the current zero-bit channels restored, and the bits they get back.
    check_every : int
        Steps between preservation checks.
    remove_every, removal_grace
        Steps between structural removals, and how long a channel stays at zero bits (and
        restorable) before it is removed. All zero-bit channels that can go are removed at the end.
    layers : sequence of str, optional
        Names of the Linear/Conv layers to compress (default: all).
    seed : int
    progress : bool
        Show a progress bar on stderr: steps, and at every check the task loss, the size term and
        the stored bytes.

    Returns
    -------
    SelfCompressionResult

    Raises
    ------
    DataShapeError
        ``train_data`` has the wrong form, shape or labels for the model.
    NonFiniteError
        ``train_data`` inputs hold NaN or infinity.
    NoQuantizableLayerError
        The model has no Linear/Conv layer to quantize (or ``layers`` names none).
    """
    if restore_reference not in ("start", "best"):
        raise ValueError(f"restore_reference must be 'start' or 'best', got {restore_reference!r}")
    generator = torch.Generator().manual_seed(seed)
    x, y, fit, held = _split_data(train_data, holdout, generator)
    original = copy.deepcopy(model)
    _check_data(copy.deepcopy(model), x, y)
    work = copy.deepcopy(model)
    _swap_layers(work, layers, init_bits)
    example_inputs = (x[:2].clone(),)
    mark_removable(work, example_inputs)
    pres = None
    if preservation:
        pres = build_preservation_set(original, x, y, held, size=preservation_size, seed=seed)
    opts = dict(
        restore_share=restore_share,
        restore_bits=restore_bits,
        restore_threshold=restore_threshold,
        removal_grace=removal_grace,
        preservation_weight=preservation_weight,
        preservation_batch=preservation_batch,
        size_weight=size_weight,
        max_bits=max_bits,
        restore_reference=restore_reference,
    )
    trainer = _Trainer(work, _optimizer(work, lr, bit_lr), example_inputs, opts)
    reference = _accuracy(work, pres.x, pres.y) if pres is not None else None
    fit_t = torch.as_tensor(fit)
    with progress_bar(steps, "self-compress: training", progress) as bar:
        for step in range(1, steps + 1):
            pick = fit_t[torch.randint(len(fit_t), (min(batch_size, len(fit_t)),), generator=generator)]
            stats = trainer.step(x[pick], y[pick], pres, generator)
            trainer.clock(step)
            if step % check_every == 0 or step == steps:
                _check(trainer, step, stats, pres, reference)
                if progress:
                    _show(bar, trainer.model, stats)
            if step % remove_every == 0:
                trainer.remove(step, final=False)
            bar.update()
    trainer.remove(steps, final=True)
    trained = trainer.model.eval()
    final = _export(original, trained, trainer.removals, example_inputs)
    return SelfCompressionResult(
        model=final,
        trained=trained,
        preservation=pres,
        restores=trainer.restores,
        removals=trainer.removals,
        log=trainer.log,
        size_bytes=storage_bytes(trained),
        bits={n: m.storage_bits_per_weight()[m.kept()].tolist() for n, m in sc_layers(trained).items()},
    )


def _show(bar, model: nn.Module, stats: dict) -> None:
    bar.set_postfix(loss=f"{stats['loss']:.4f}", Q=f"{stats['Q']:.3f}", bytes=storage_bytes(model))


def _check(trainer: _Trainer, step: int, stats: dict, pres, reference) -> None:
    entry = {
        "step": step,
        **stats,
        "alive": int(sum(int(m.alive().sum()) for m in sc_layers(trainer.model).values())),
    }
    if pres is not None:
        acc = _accuracy(trainer.model, pres.x, pres.y)
        entry["preservation_accuracy"] = acc
        if trainer.o["restore_reference"] == "best":
            reference = max([reference, *(e["preservation_accuracy"] for e in trainer.log)])
        if reference - acc > trainer.o["restore_threshold"]:
            trainer.restore(step, acc, reference)
    trainer.log.append(entry)
