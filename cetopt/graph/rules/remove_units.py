"""RemoveUnits: drop output units of a layer and every channel coupled to them."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from cetopt.graph.decisions import RemoveUnits
from cetopt.graph.dependency import ChannelGroup, find_group
from cetopt.graph.rules.base import RewriteRule, RewriteState
from cetopt.graph.trace import node_shape

__all__ = ["RemoveUnitsRule", "remove_classes"]


def _check_units(units, n_out: int, layer: str) -> str | None:
    arr = np.asarray(list(units))
    if arr.size == 0:
        return "no units to remove"
    if arr.dtype.kind not in "iu":
        return f"units must be integers, got {list(units)!r}"
    if arr.min() < 0 or arr.max() >= n_out:
        return f"unit index out of range: {layer!r} has {n_out} output units"
    if len(set(arr.tolist())) != arr.size:
        return "units contain duplicates"
    if arr.size == n_out:
        return f"cannot remove every unit of {layer!r}: the rest of the network would see a constant"
    return None


class RemoveUnitsRule(RewriteRule):
    """Carry out :class:`RemoveUnits` through the coupled channel group of the layer's output."""

    decision_type = RemoveUnits

    def check(self, state: RewriteState, d: RemoveUnits) -> str | None:
        module, handler = state.handler(d.layer)
        reason = _check_units(d.units, handler.out_channels(module), d.layer)
        if reason:
            return reason
        group = find_group(state.groups(), d.layer, "out")
        classes = group.classes[(d.layer, "out")][np.asarray(list(d.units))]
        blocked = sorted(set(classes.tolist()) & group.frozen)
        if blocked:
            return f"output units of {d.layer!r} cannot be removed: {group.reasons[blocked[0]]}"
        if d.constants is not None:
            return _check_constants(state, d, group)
        return None

    def apply(self, state: RewriteState, d: RemoveUnits) -> None:
        group = find_group(state.groups(), d.layer, "out")
        units = np.asarray(list(d.units))
        classes = group.classes[(d.layer, "out")][units]
        if d.constants is not None:
            value_of_class = dict(zip(classes.tolist(), np.asarray(d.constants, dtype=np.float64).tolist()))
            _fold_constants(state, group, d.layer, value_of_class)
        remove_classes(state, group, classes)


def remove_classes(state: RewriteState, group: ChannelGroup, classes) -> None:
    """Remove the given classes of ``group`` from every port (the shared core of unit removal)."""
    _flatten_fixed_views(state)
    keep = group.keep(classes)
    done: set[str] = set()
    for (name, port), idx in keep.items():
        module, handler = state.handler(name)
        index = torch.as_tensor(idx, dtype=torch.int64)
        if handler.is_coupled(module):
            if name in done:
                continue
            done.add(name)
            new = handler.prune_out(module, index)
        else:
            new = handler.prune_out(module, index) if port == "out" else handler.prune_in(module, index)
        state.set_module(name, new)


def _consumers(group: ChannelGroup, layer: str) -> list[str]:
    return [name for name, port in group.ports if port == "in" and name != layer]


def _check_constants(state: RewriteState, d: RemoveUnits, group: ChannelGroup) -> str | None:
    if len(list(d.constants)) != len(list(d.units)):
        return f"got {len(list(d.constants))} constants for {len(list(d.units))} units"
    if not np.all(np.isfinite(np.asarray(d.constants, dtype=np.float64))):
        return "constants must be finite"
    others = [p for p in group.ports if p != (d.layer, "out") and p[1] != "in"]
    if others:
        return (
            f"constants can be folded only when the units of {d.layer!r} feed Linear/Conv layers directly; "
            f"{others[0][0]!r} also carries these channels"
        )
    for name in _consumers(group, d.layer):
        module = state.module(name)
        if isinstance(module, nn.modules.conv._ConvNd):
            if any(p != 0 for p in np.atleast_1d(module.padding)) or module.groups != 1:
                return (
                    f"cannot fold a constant into {name!r}: padded or grouped convolution (inexact at edges)"
                )
        elif not isinstance(module, nn.Linear):
            return f"cannot fold a constant into {name!r} ({type(module).__name__})"
    return None


@torch.no_grad()
def _fold_constants(
    state: RewriteState, group: ChannelGroup, layer: str, value_of_class: dict[int, float]
) -> None:
    for name in _consumers(group, layer):
        module = state.module(name)
        labels = group.classes[(name, "in")]
        const = torch.tensor([value_of_class.get(int(c), 0.0) for c in labels], dtype=torch.float64)
        w = module.weight.detach().to(torch.float64)
        contribution = (w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2) if w.dim() > 2 else w) @ const
        bias = torch.zeros(w.shape[0], dtype=torch.float64) if module.bias is None else module.bias.double()
        new_bias = (bias + contribution).to(module.weight.dtype)
        if module.bias is None:
            module.bias = nn.Parameter(new_bias)
        else:
            module.bias.copy_(new_bias)


def _flatten_fixed_views(state: RewriteState) -> None:
    """Turn ``x.view(B, C*H*W)``-style flattens with sizes written out into ``torch.flatten`` calls.

    After channels are removed the written-out size is wrong; ``flatten`` recomputes it.
    """
    gm = state.graph().module
    touched = False
    for node in list(gm.graph.nodes):
        if (
            node.op != "call_method"
            or node.target not in ("view", "reshape")
            or not isinstance(node.args[0], fx.Node)
        ):
            continue
        in_shape, out_shape = node_shape(node.args[0]), node_shape(node)
        if not (isinstance(in_shape, tuple) and isinstance(out_shape, tuple)) or len(out_shape) >= len(
            in_shape
        ):
            continue
        k = len(out_shape) - 1
        if in_shape[:k] != out_shape[:k] or int(np.prod(in_shape[k:])) != out_shape[k]:
            continue
        sizes = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else tuple(node.args[1])
        if any(isinstance(s, int) and s not in (-1,) and i >= k for i, s in enumerate(sizes)):
            with gm.graph.inserting_after(node):
                flat = gm.graph.call_function(torch.flatten, (node.args[0],), {"start_dim": k})
            node.replace_all_uses_with(flat)
            gm.graph.erase_node(node)
            touched = True
    if touched:
        state.changed()
