"""Structural removal of zero-bit channels through the rewriter, with the optimizer state kept aligned."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from cetopt.errors import UntraceableModelError
from cetopt.graph.decisions import RemoveUnits
from cetopt.graph.dependency import ChannelGroup, channel_groups
from cetopt.graph.handlers import get_handler
from cetopt.graph.rewriter import rewrite
from cetopt.graph.trace import trace_model
from cetopt.selfcompress.layers import SelfCompressingLayer

__all__ = ["mark_removable", "removal_decisions", "rewrite_with_optimizer", "sc_layers"]


def sc_layers(model: nn.Module) -> dict[str, SelfCompressingLayer]:
    """The self-compressing layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SelfCompressingLayer)}


def _groups(model: nn.Module, example_inputs: tuple) -> list[ChannelGroup] | None:
    try:
        return channel_groups(trace_model(model, example_inputs))
    except UntraceableModelError:
        return None


def _eligible(model: nn.Module, group: ChannelGroup) -> bool:
    """A group can shed zero-bit channels exactly only if self-compressing layers produce all of it.

    Then a removed channel carries zeros into every consumer. A normalisation or any other producer
    in the group (BatchNorm, LayerNorm, an embedding, a float layer) would turn zeros into something else.
    """
    for name, port in group.ports:
        module = model.get_submodule(name)
        handler = get_handler(module)
        if handler is not None and handler.is_coupled(module):
            return False
        if port == "out" and not isinstance(module, SelfCompressingLayer):
            return False
    return True


def mark_removable(model: nn.Module, example_inputs: tuple) -> bool:
    """Set each self-compressing layer's ``removable`` flags from the model's channel groups.

    Returns whether the model could be traced (if not, nothing is removable).
    """
    layers = sc_layers(model)
    for layer in layers.values():
        layer.removable.fill_(False)
    groups = _groups(model, example_inputs)
    if groups is None:
        return False
    for group in groups:
        if not _eligible(model, group):
            continue
        frozen = np.asarray(sorted(group.frozen), dtype=np.int64)
        for name, port in group.ports:
            if port == "out" and name in layers:
                labels = group.classes[(name, port)]
                layers[name].removable.copy_(torch.from_numpy(~np.isin(labels, frozen)))
    return True


def removal_decisions(
    model: nn.Module, example_inputs: tuple, ready: dict[str, np.ndarray]
) -> list[RemoveUnits]:
    """``RemoveUnits`` decisions for channels that are ready to go (zero bits, removable).

    A class of coupled channels is removed only when every self-compressing channel in it is
    ready, and never all classes of a layer. Channels that stay are marked not removable when
    ``ready`` covers them but their class cannot go (so size accounting stays exact).
    """
    groups = _groups(model, example_inputs) or []
    layers = sc_layers(model)
    decisions = []
    for group in groups:
        if not _eligible(model, group):
            continue
        outs = [(n, group.classes[(n, "out")]) for n, p in group.ports if p == "out" and n in layers]
        ok = np.ones(group.num_classes, dtype=bool)
        ok[list(group.frozen)] = False
        for name, labels in outs:
            mask = ready.get(name, np.zeros(len(labels), dtype=bool))
            np.logical_and.at(ok, labels, mask)
        if ok.all():  # keep one class: a layer cannot lose every channel
            ok[int(np.argmax(_class_bits(layers, outs, group.num_classes)))] = False
        if not ok.any():
            continue
        name, labels = outs[0]
        units = np.flatnonzero(ok[labels])
        decisions.append(RemoveUnits(name, [int(u) for u in units]))
    return decisions


def _class_bits(layers, outs, num_classes: int) -> np.ndarray:
    best = np.full(num_classes, -np.inf)
    for name, labels in outs:
        np.maximum.at(best, labels, layers[name].bits.detach().numpy())
    return best


def _index_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every parameter holds its own flat element indices."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
    return twin


def rewrite_with_optimizer(
    model: nn.Module, decisions: list[RemoveUnits], example_inputs: tuple, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Apply ``decisions`` and return the new model and an optimizer whose state follows the kept entries.

    The same rewrite is applied to a twin whose parameters hold their element indices, so each
    new parameter knows which old entries it kept; the optimizer state (Adam's moments, ...) is
    sliced with those indices. Removed channels leave no state behind.
    """
    new = rewrite(model, decisions, example_inputs)
    mapping = dict(rewrite(_index_model(model), decisions, example_inputs).named_parameters())
    old = dict(model.named_parameters())
    old_names = {id(p): n for n, p in old.items()}
    groups = []
    new_params = dict(new.named_parameters())
    for group in optimizer.param_groups:
        names = [old_names[id(p)] for p in group["params"]]
        groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [new_params[n] for n in names if n in new_params],
            }
        )
    fresh = type(optimizer)(groups, **optimizer.defaults)
    for name, p in new_params.items():
        state = optimizer.state.get(old[name])
        if not state:
            continue
        idx = mapping[name].detach().to(torch.int64).reshape(-1)
        fresh.state[p] = {
            k: (
                v.reshape(-1)[idx].reshape(p.shape).clone()
                if torch.is_tensor(v) and v.numel() == old[name].numel() and v.dim()
                else v
            )
            for k, v in state.items()
        }
    return new, fresh
