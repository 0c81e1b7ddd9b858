"""Measured sensitivities at the cost of the network suffix: replay what runs before the changed layer.

``measured`` quantizes one layer at a time and re-evaluates the loss. Everything that runs before
that layer's first call sees the same inputs as the unperturbed pass, so its outputs need not be
computed again. :class:`PrefixReplay` runs a private copy of the model on a batch once, keeping
the output of every module call (one batch's activations), and then, for a trial weight of
layer ``l``, returns the kept output of every call that finished before ``l`` first ran instead of
running it: only the suffix from ``l`` on is computed. It needs no graph, so it works on any
model whose sequence of module calls does not depend on the weights' values (checked on every
replay).

Outputs that the forward later changes in place (``out += identity``, an in-place ReLU) are
found on a first pass and kept as copies taken when they were produced, handed out as fresh
copies on each replay, so a replay computes exactly what a plain forward pass does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cetopt.errors import CetoptError

__all__ = ["PrefixReplay", "Site", "measure_trials"]


@dataclass(frozen=True)
class Site:
    """Where a trial weight goes: the parameter ``key``, the modules whose calls read it (``runs``),
    and how a trial weight (codes layout) becomes the parameter's shape (``natural``)."""

    key: str
    runs: tuple[str, ...]
    natural: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda w: w, compare=False)

    @classmethod
    def of(cls, layer) -> Site:
        """``layer`` itself if it is a Site, else the ``weight`` of the module named ``layer``."""
        return layer if isinstance(layer, Site) else cls(f"{layer}.weight", (layer,))


Trial = tuple  # (layer name or Site, weight to try in place of its own)


def _tensors(value) -> list[torch.Tensor] | None:
    """The tensors of a module output (a tensor, or a tuple/list of them); ``None`` for anything else."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    return type(value)(v.clone() for v in value)


class PrefixReplay:
    """A private eval-mode copy of ``model`` that replays the module calls before a changed layer.

    Parameters
    ----------
    model : nn.Module
        Copied once; never modified or run itself.
    """

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval()
        self.modules = dict(self.model.named_modules())
        self._mode = "off"
        self._counter = 0
        self._stop = 0
        self._snapshot: list[bool] | None = None
        self._mutated: list[bool] = []
        self.enabled = True  # False: every replay runs the whole forward
        self._reset()
        for name, module in self.modules.items():
            if name:  # the root always runs
                module.forward = self._wrapped(name, module.forward)

    def _reset(self) -> None:
        self.names: list[str] = []
        self.ends: list[int] = []
        self.outputs: list = []
        self.versions: list[list[int] | None] = []

    def _wrapped(self, name: str, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if self._mode == "off":
                return forward(*args, **kwargs)
            index = self._counter
            self._counter += 1
            if self._mode == "record":
                return self._record(index, name, forward, args, kwargs)
            if index >= len(self.names) or self.names[index] != name:
                raise CetoptError(
                    f"the model's module calls changed between passes (call {index} is {name!r}); "
                    "measured sensitivities need a forward whose calls do not depend on weight values"
                )
            if self.ends[index] < self._stop and self.outputs[index] is not None:
                self._counter = self.ends[index] + 1
                out = self.outputs[index]
                return _clone(out) if self._mutated[index] else out
            return forward(*args, **kwargs)

        return run

    def _record(self, index, name, forward, args, kwargs):
        self.names.append(name)
        self.ends.append(-1)
        self.outputs.append(None)
        self.versions.append(None)
        out = forward(*args, **kwargs)
        self.ends[index] = self._counter - 1
        tensors = _tensors(out)
        if tensors is not None:
            # the forward changes it in place later: keep a copy of it as it is now
            mutated = self._snapshot is not None and index < len(self._snapshot) and self._snapshot[index]
            self.outputs[index] = _clone(out) if mutated else out
            self.versions[index] = [t._version for t in tensors]
        return out

    @torch.no_grad()
    def record(self, x: torch.Tensor) -> torch.Tensor:
        """Run the unperturbed copy on ``x`` and keep every module call's output; returns the model output.

        The first batch takes two passes: one finds the outputs the forward later changes in
        place, the second keeps copies of those. Later batches take one pass with the same
        copies, checked afterwards: if the calls or the outputs changed in place differ from the
        first batch's, the batch is recorded again the two-pass way.
        """
        if self._mutated:
            self._snapshot = self._mutated
            out = self._pass("record", x)
            same_calls = len(self.names) == len(self._mutated)
            if same_calls and not any(c and not m for c, m in zip(self._changed(), self._mutated)):
                return out
            self._reset()
        self._snapshot = None
        self._pass("record", x)
        mutated = self._changed()
        self._reset()
        self._snapshot = mutated
        out = self._pass("record", x)
        self._mutated = mutated
        return out

    def _changed(self) -> list[bool]:
        """Per recorded call: whether its output was changed in place after it was produced (read
        off the outputs as kept, so meaningful only for those kept without a copy)."""
        return [
            v is not None and [t._version for t in _tensors(o)] != v
            for o, v in zip(self.outputs, self.versions)
        ]

    def first_call(self, layer: str) -> int | None:
        """Index of ``layer``'s first call in the recorded pass (``None`` if it did not run)."""
        try:
            return self.names.index(layer)
        except ValueError:
            return None

    def site_first_call(self, site: Site) -> int | None:
        """The first recorded call of any module that reads the site's weight."""
        calls = [c for c in (self.first_call(r) for r in site.runs) if c is not None]
        return min(calls) if calls else None

    @torch.no_grad()
    def replay(self, x: torch.Tensor, layer, weight: torch.Tensor) -> torch.Tensor:
        """The model output on the recorded ``x`` with ``layer``'s weight (a layer name or a
        :class:`Site`) replaced by ``weight``."""
        site = Site.of(layer)
        param = self.model.get_parameter(site.key)
        original = param.data
        self._stop = self.site_first_call(site) if self.enabled else 0
        param.data = site.natural(weight)
        try:
            return self._pass("replay", x)
        finally:
            param.data = original

    def _pass(self, mode: str, x: torch.Tensor):
        self._mode, self._counter = mode, 0
        try:
            return self.model(x)
        finally:
            self._mode = "off"


def measure_trials(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable,
    trials: list[Trial],
    bar=None,
    stable: Callable[[np.ndarray, np.ndarray], bool] | None = None,
    min_examples: int = 64,
) -> tuple[list[float], float, int]:
    """The dataset loss with each trial's weight in place, and without, weighted by batch size.

    Sums over batches in the order and arithmetic of :meth:`LossObjective.loss`, so each value is
    the one a full forward pass would give. With ``stable``, the batches are taken in rounds that
    double the examples seen (from ``min_examples``); once ``stable(previous, current)`` says the
    loss increases after a round rank as after the round before, the rest is left out and the
    losses are the means over the examples seen. Returns the losses, the base loss and the
    number of examples used.
    """
    from cetopt.quant._calibration import module_calls

    with module_calls():
        return _measure_trials(model, batches, loss_fn, trials, bar, stable, min_examples)


def _measure_trials(model, batches, loss_fn, trials, bar, stable, min_examples):
    replay = PrefixReplay(model)
    total = sum(len(x) for x, _ in batches)
    sums: list[torch.Tensor | None] = [None] * len(trials)
    base, seen, checkpoint, previous = None, 0, min_examples, None
    for x, y in batches:
        w = len(x) / total
        out = replay.record(x)
        part = loss_fn(out, y) * w
        base = part if base is None else base + part
        if base is part:
            _check_replay(replay, x, out, {Site.of(layer) for layer, _ in trials})
        for i, (layer, weight) in enumerate(trials):
            if replay.site_first_call(Site.of(layer)) is None:  # never runs: the loss cannot change
                part = loss_fn(out, y) * w
            else:
                part = loss_fn(replay.replay(x, layer, weight()), y) * w
            sums[i] = part if sums[i] is None else sums[i] + part
            if bar is not None:
                bar.update(1)
        replay._reset()
        seen += len(x)
        if stable is not None and seen >= checkpoint and seen < total:
            current = np.array([float(v) for v in sums]) - float(base)
            if previous is not None and stable(previous, current):
                scale = total / seen
                return [float(v) * scale for v in sums], float(base) * scale, seen
            previous, checkpoint = current, 2 * seen
    return [float(v) for v in sums], float(base), total


def _check_replay(replay: PrefixReplay, x: torch.Tensor, out, sites: set) -> None:
    """Replay each layer with its own weight once: if one does not give the recorded output
    exactly (a forward that relies on aliasing the replay cannot keep), run whole passes instead."""
    from cetopt.analysis.objective import model_logits

    for site in sites:
        if replay.site_first_call(site) is None:
            continue
        param = replay.model.get_parameter(site.key).data
        again = replay.replay(x, Site(site.key, site.runs), param)
        if not torch.equal(model_logits(again), model_logits(out)):
            replay.enabled = False
            return
