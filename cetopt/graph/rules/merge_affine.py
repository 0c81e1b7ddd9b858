"""MergeAffine: merge a Linear into the Linear that consumes its output."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from cetopt.graph.decisions import MergeAffine
from cetopt.graph.rules.base import RewriteRule, RewriteState
from cetopt.graph.rules.conv_affine import CONV, conv_consumer, merge_check, merge_conv, merged_conv_module
from cetopt.graph.trace import node_shape

__all__ = ["MergeAffineRule", "path_between"]

_NOOP_MODULES = (nn.Identity, nn.Dropout)
_ACTIVATION_MODULES = (nn.ReLU,)
_ACTIVATION_FUNCTIONS = {torch.relu, torch.nn.functional.relu}
_NOOP_FUNCTIONS = {torch.nn.functional.dropout}
_NOOP_METHODS = {"contiguous", "relu"}


def _kind(state: RewriteState, node: fx.Node) -> str:
    """'noop', 'activation' or 'other' for a node standing between two layers."""
    if node.op == "call_module":
        module = state.module(node.target)
        if isinstance(module, _ACTIVATION_MODULES):
            return "activation"
        if isinstance(module, _NOOP_MODULES):
            return "noop" if not (isinstance(module, nn.Dropout) and module.training) else "other"
        return "other"
    if node.op == "call_function":
        if node.target in _ACTIVATION_FUNCTIONS:
            return "activation"
        return "noop" if node.target in _NOOP_FUNCTIONS else "other"
    if node.op == "call_method":
        if node.target == "relu":
            return "activation"
        return "noop" if node.target in _NOOP_METHODS else "other"
    return "other"


def path_between(state: RewriteState, first: str, second: str, allow_activation: bool) -> list[fx.Node] | str:
    """The nodes strictly between layer ``first`` and layer ``second``, or why there is no clean path."""
    graph = state.graph()
    a, b = graph.layer_node(first), graph.layer_node(second)
    path, node = [], a
    while True:
        if len(node.users) != 1:
            uses = len(node.users)
            return f"the output of {node.name!r} is used {uses} times; the path to {second!r} must be a chain"
        node = next(iter(node.users))
        if node is b:
            break
        if node.target is operator.getitem:
            return f"{node.name!r} indexes the tensor between {first!r} and {second!r}"
        kind = _kind(state, node)
        if kind == "other" or (kind == "activation" and not allow_activation):
            return f"{node.name!r} stands between {first!r} and {second!r}" + (
                "; pass drop_activation=True if it is proven to act as the identity"
                if kind == "activation"
                else ""
            )
        path.append(node)
    if b.args[0] is not (path[-1] if path else a):
        return f"{second!r} does not read the output of {first!r} as its input"
    return path


class MergeAffineRule(RewriteRule):
    """Carry out :class:`MergeAffine` (Linear → Linear, computed in float64; Conv → Conv and
    Conv → flatten → Linear where the composition is itself such a layer, see ``conv_affine``)."""

    decision_type = MergeAffine

    def check(self, state: RewriteState, d: MergeAffine) -> str | None:
        if type(state.module(d.first)) in CONV:
            return _check_conv(state, d)
        for name in (d.first, d.second):
            if type(state.module(name)) is not nn.Linear:
                return f"{name!r} is a {type(state.module(name)).__name__}; only nn.Linear layers are merged"
        path = path_between(state, d.first, d.second, d.drop_activation)
        return path if isinstance(path, str) else None

    @torch.no_grad()
    def apply(self, state: RewriteState, d: MergeAffine) -> None:
        if type(state.module(d.first)) in CONV:
            _, path = conv_consumer(state, d.first)
            merge_conv(state, d.first, d.second, path, _merged(state, d))
            return
        path = path_between(state, d.first, d.second, d.drop_activation)
        graph = state.graph()
        a, b = graph.layer_node(d.first), graph.layer_node(d.second)
        l1, l2 = state.module(d.first), state.module(d.second)
        w1, w2 = l1.weight.double(), l2.weight.double()
        bias = w2 @ l1.bias.double() if l1.bias is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
        if l2.bias is not None:
            bias = bias + l2.bias.double()
        merged = nn.Linear(l1.in_features, l2.out_features, dtype=l2.weight.dtype)
        merged.weight = nn.Parameter((w2 @ w1).to(l2.weight.dtype))
        merged.bias = nn.Parameter(bias.to(l2.weight.dtype))
        merged.train(l2.training)
        state.set_module(d.second, merged)
        b.args = (a.args[0], *b.args[1:])
        for node in [*reversed(path), a]:
            state.model.graph.erase_node(node)
        state.changed()


def _check_conv(state: RewriteState, d: MergeAffine) -> str | None:
    nxt, path = conv_consumer(state, d.first)
    if nxt != d.second:
        return f"{d.second!r} does not read the output of {d.first!r} directly: {path}"
    if any(_kind(state, n) == "activation" for n in path) and not d.drop_activation:
        return f"an activation stands between {d.first!r} and {d.second!r}; pass drop_activation=True"
    reason = merge_check(state, d.first, d.second)
    if reason is None:
        try:
            _merged(state, d)
        except ValueError as exc:
            return str(exc)
    return reason


def _merged(state: RewriteState, d: MergeAffine) -> nn.Module:
    node = state.graph().layer_node(d.first)
    shape = tuple(node_shape(node.args[0]))[1:]
    return merged_conv_module(state, d.first, d.second, shape)
