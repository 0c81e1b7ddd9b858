"""Coupled channel groups: which channels must be removed together.

Every channel of every tensor in the traced graph is a slot with an integer id. Walking the graph
once, each operation adds couplings between slots:

* a layer binds its input port to the channels of its input tensor and its output port to fresh
  channels; BatchNorm, LayerNorm, depthwise convolution and attention also tie input channel ``i``
  to output channel ``i``;
* elementwise operations, activations, pooling and dropout pass channels through unchanged;
* ``add``/``mul``/... of two tensors tie channel ``i`` of both inputs (a residual add);
* ``cat`` along the channel dimension places each input's channels at an offset;
* ``flatten`` (and a ``view``/``reshape`` that flattens) maps channel ``c`` to the features
  ``c·S … (c+1)·S − 1`` of the flattened tensor (the index mapping into a following Linear);
* ``permute``/``transpose``/indexing move the channel dimension.

Channels that reach the model output, come from a model input, or pass through an operation the
analysis does not understand are marked frozen and cannot be removed. One sparse
connected-components call then labels every slot; the labels are the removable units ("classes"),
a label is frozen if any of its slots is, and ports sharing a label form one :class:`ChannelGroup`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from torch import fx, nn

from cetopt.graph.handlers import get_handler
from cetopt.graph.trace import ModelGraph, node_shape

__all__ = ["ChannelGroup", "Port", "channel_groups", "find_group"]

Port = tuple[str, str]  # (module name, "in" | "out")

# Operations that act on every channel independently and keep the tensor's shape.
_UNARY_FUNCTIONS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.dropout,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.relu6,
    torch.nn.functional.hardtanh,
    torch.nn.functional.elu,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.exp,
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.interpolate,
    torch.contiguous_format,
}
_UNARY_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "abs",
    "neg",
    "clamp",
    "contiguous",
    "clone",
    "float",
    "exp",
    "detach",
    "relu_",
    "clamp_",
    "to",
}
_UNARY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
)
_BINARY = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}


@dataclass(frozen=True)
class _Channels:
    """The channels of one tensor: which dimension, and the slot id of each channel."""

    dim: int
    ids: np.ndarray


@dataclass
class ChannelGroup:
    """Ports (layer inputs/outputs) whose channels must be removed together.

    Attributes
    ----------
    ports : tuple of (module name, "in" | "out")
    classes : dict
        For each port, the class (removable unit) of each of its channels, numbered
        ``0 … num_classes − 1`` within this group. Removing class ``k`` removes every channel
        labelled ``k`` in every port.
    num_classes : int
    frozen : frozenset of int
        Classes that cannot be removed, with ``reasons`` saying why.
    reasons : dict
    """

    ports: tuple[Port, ...]
    classes: dict[Port, np.ndarray]
    num_classes: int
    frozen: frozenset[int] = frozenset()
    reasons: dict[int, str] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        """Module names in the group, in port order, without repeats."""
        return tuple(dict.fromkeys(name for name, _ in self.ports))

    @property
    def prunable(self) -> bool:
        """Whether any class of the group may be removed."""
        return len(self.frozen) < self.num_classes

    def keep(self, removed_classes) -> dict[Port, np.ndarray]:
        """For every port, the sorted channel indices that remain when ``removed_classes`` go."""
        removed = np.asarray(sorted(set(int(k) for k in removed_classes)), dtype=np.int64)
        return {port: np.flatnonzero(~np.isin(labels, removed)) for port, labels in self.classes.items()}


class _Analysis:
    def __init__(self, mg: ModelGraph):
        self.gm = mg.module
        self.next_id = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.frozen_reasons: list[tuple[np.ndarray, str]] = []
        self.info: dict[fx.Node, _Channels | dict[int, _Channels] | None] = {}
        self.ports: dict[Port, np.ndarray] = {}

    # -- slot bookkeeping -------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        self.edges_a.append(np.asarray(a, dtype=np.int64))
        self.edges_b.append(np.asarray(b, dtype=np.int64))

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        self.frozen_reasons.append((np.asarray(ids, dtype=np.int64), reason))

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for parent in node.all_input_nodes:
            ch = self.info.get(parent)
            if isinstance(ch, _Channels):
                self.freeze(ch.ids, reason)
            elif isinstance(ch, dict):
                for c in ch.values():
                    self.freeze(c.ids, reason)

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.info[node] = self.visit(node)

    def visit(self, node: fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.freeze_inputs(node, "it reaches the model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.gm.get_submodule(node.target))
        if node.op == "call_function" and node.target is operator.getitem:
            return self.visit_getitem(node)
        target = node.target
        name = target if node.op == "call_method" else getattr(target, "__name__", str(target))
        if (node.op == "call_function" and target in _UNARY_FUNCTIONS) or (
            node.op == "call_method" and target in _UNARY_METHODS
        ):
            return self.alias_first(node, name)
        if (node.op == "call_function" and target in _BINARY) or (
            node.op == "call_method" and target in _BINARY_METHODS
        ):
            return self.visit_binary(node)
        if name in ("cat", "concat"):
            return self.visit_cat(node)
        if name in ("flatten", "view", "reshape"):
            return self.visit_reshape(node)
        if name in ("permute", "transpose", "swapaxes"):
            return self.visit_permute(node)
        if name in _REDUCTIONS:
            return self.visit_reduction(node)
        if name in ("size", "dim"):
            return None
        self.freeze_inputs(
            node, f"it passes through {name!r} at node {node.name!r}, which the analysis does not understand"
        )
        return None

    def _rank(self, node: fx.Node) -> int | None:
        shape = node_shape(node)
        return len(shape) if isinstance(shape, tuple) else None

    def visit_module(self, node: fx.Node, module: nn.Module):
        handler = get_handler(module)
        if handler is not None:
            return self.visit_layer(node, module, handler)
        if isinstance(module, _UNARY_MODULES):
            return self.alias_first(node, type(module).__name__)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, module.start_dim, module.end_dim)
        self.freeze_inputs(
            node,
            f"it passes through module {node.target!r} ({type(module).__name__}), which has no layer handler",
        )
        return None

    def visit_layer(self, node: fx.Node, module: nn.Module, handler):
        name = node.target
        n_in = handler.in_channels(module)
        n_out = handler.out_channels(module)
        in_ids = None
        if n_in is not None and node.args:
            first = node.args[0]
            ch = self.info.get(first) if isinstance(first, fx.Node) else None
            rank = self._rank(first) if isinstance(first, fx.Node) else None
            want = None if rank is None else handler.channel_dim_in % rank
            if isinstance(ch, _Channels) and ch.dim == want and len(ch.ids) == n_in:
                in_ids = ch.ids
            else:
                in_ids = self.fresh(n_in)
                if isinstance(ch, _Channels):
                    self.freeze(ch.ids, f"layer {name!r} reads them along another dimension")
                self.freeze(in_ids, f"the input of {name!r} comes from a model input or an opaque operation")
            # Attention reads query, key and value: every one of them carries the same channels.
            for extra in node.args[1:3] if isinstance(module, nn.MultiheadAttention) else ():
                other = self.info.get(extra) if isinstance(extra, fx.Node) else None
                if isinstance(other, _Channels) and len(other.ids) == n_in:
                    self.tie(in_ids, other.ids)
                elif isinstance(extra, fx.Node):
                    self.freeze(in_ids, f"attention {name!r} mixes them with an opaque key/value")
            self.ports[(name, "in")] = in_ids
        out_ids = self.fresh(n_out)
        self.ports[(name, "out")] = out_ids
        if not handler.is_prunable(module):
            self.freeze(out_ids, f"layer {name!r} ({type(module).__name__}) does not allow removing channels")
            if in_ids is not None:
                self.freeze(
                    in_ids, f"layer {name!r} ({type(module).__name__}) does not allow removing channels"
                )
        if in_ids is not None and handler.is_coupled(module):
            self.tie(in_ids, out_ids)
        shape = node_shape(node)
        if isinstance(module, nn.MultiheadAttention):
            return {0: _Channels(dim=len(shape[0]) - 1, ids=out_ids)}
        rank = len(shape) if isinstance(shape, tuple) else 1
        return _Channels(dim=handler.channel_dim_out % rank, ids=out_ids)

    def alias_first(self, node: fx.Node, name: str):
        src = node.args[0] if node.args else None
        ch = self.info.get(src) if isinstance(src, fx.Node) else None
        if not isinstance(ch, _Channels):
            return None
        if node_shape(node) != node_shape(src) and self._rank(node) != self._rank(src):
            self.freeze(ch.ids, f"{name!r} at node {node.name!r} changes the tensor's rank")
            return None
        return ch

    def visit_binary(self, node: fx.Node):
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        chans = [self.info.get(a) for a in tensors]
        out_rank = self._rank(node)
        known = [(a, c) for a, c in zip(tensors, chans) if isinstance(c, _Channels)]
        if not known or out_rank is None:
            return None
        # align every input's dims to the output (broadcasting is right-aligned)
        base_node, base = known[0]
        base_dim = base.dim + out_rank - self._rank(base_node)
        for a, c in zip(tensors, chans):
            shape = node_shape(a)
            offset = out_rank - len(shape)
            if isinstance(c, _Channels):
                if c.dim + offset != base_dim or len(c.ids) != len(base.ids):
                    self.freeze(
                        base.ids, f"node {node.name!r} combines tensors with different channel layouts"
                    )
                    self.freeze(c.ids, f"node {node.name!r} combines tensors with different channel layouts")
                else:
                    self.tie(base.ids, c.ids)
            else:
                d = base_dim - offset
                if 0 <= d < len(shape) and shape[d] != 1:
                    self.freeze(base.ids, f"node {node.name!r} adds a tensor whose channels are not tracked")
        return _Channels(dim=base_dim, ids=base.ids)

    def visit_cat(self, node: fx.Node):
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = self._rank(node)
        if rank is None:
            return None
        dim %= rank
        chans = [self.info.get(t) for t in tensors]
        known = [c for c in chans if isinstance(c, _Channels)]
        if not known:
            return None
        if any(c.dim != dim for c in known):
            # concatenated along another dimension: the channels of all inputs coincide
            for c in known[1:]:
                if len(c.ids) == len(known[0].ids) and c.dim == known[0].dim:
                    self.tie(known[0].ids, c.ids)
                else:
                    self.freeze(
                        c.ids, f"cat at node {node.name!r} joins tensors with different channel layouts"
                    )
            if len(known) != len(chans):
                self.freeze(known[0].ids, f"cat at node {node.name!r} joins tracked and untracked tensors")
            return _Channels(dim=known[0].dim, ids=known[0].ids)
        parts = []
        for t, c in zip(tensors, chans):
            if isinstance(c, _Channels):
                parts.append(c.ids)
            else:
                ids = self.fresh(node_shape(t)[dim])
                self.freeze(ids, f"cat at node {node.name!r} includes an untracked tensor")
                parts.append(ids)
        out = self.fresh(sum(len(p) for p in parts))
        self.tie(out, np.concatenate(parts))
        return _Channels(dim=dim, ids=out)

    def flatten(self, node: fx.Node, start: int, end: int):
        src = node.args[0]
        ch = self.info.get(src)
        if not isinstance(ch, _Channels):
            return None
        in_shape = node_shape(src)
        rank = len(in_shape)
        start, end = start % rank, end % rank
        if not (start <= ch.dim <= end):
            shift = 0 if ch.dim < start else end - start
            return _Channels(dim=ch.dim - shift, ids=ch.ids)
        merged = in_shape[start : end + 1]
        flat = np.arange(int(np.prod(merged)))
        channel_of = np.unravel_index(flat, merged)[ch.dim - start]
        out = self.fresh(len(flat))
        self.tie(out, ch.ids[channel_of])
        return _Channels(dim=start, ids=out)

    def visit_reshape(self, node: fx.Node):
        src = node.args[0]
        if node.target == "flatten" or getattr(node.target, "__name__", "") == "flatten":
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            return self.flatten(node, start, end)
        ch = self.info.get(src)
        if not isinstance(ch, _Channels):
            return None
        in_shape, out_shape = node_shape(src), node_shape(node)
        if in_shape == out_shape:
            return ch
        # A reshape that keeps the leading dims and flattens the rest is a flatten.
        k = 0
        while k < min(len(in_shape), len(out_shape)) - 1 and in_shape[k] == out_shape[k]:
            k += 1
        if len(out_shape) == k + 1 and int(np.prod(in_shape[k:])) == out_shape[k]:
            return self.flatten(node, k, len(in_shape) - 1)
        self.freeze(ch.ids, f"reshape at node {node.name!r} splits or reorders the channel dimension")
        return None

    def visit_permute(self, node: fx.Node):
        src = node.args[0]
        ch = self.info.get(src)
        if not isinstance(ch, _Channels):
            return None
        rank = self._rank(src)
        if node.target in ("transpose", "swapaxes") or getattr(node.target, "__name__", "") in ("transpose",):
            a, b = (d % rank for d in node.args[1:3])
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        else:
            dims = (
                node.args[1:]
                if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list))
                else node.args[1]
            )
            order = [d % rank for d in dims]
        return _Channels(dim=order.index(ch.dim), ids=ch.ids)

    def visit_reduction(self, node: fx.Node):
        src = node.args[0]
        ch = self.info.get(src)
        if not isinstance(ch, _Channels):
            return None
        rank = self._rank(src)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            return None
        dims = {d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if ch.dim in dims:
            return None  # channels summed away: nothing downstream is indexed by them
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return _Channels(dim=ch.dim if keepdim else ch.dim - sum(d < ch.dim for d in dims), ids=ch.ids)

    def visit_getitem(self, node: fx.Node):
        src, index = node.args
        ch = self.info.get(src)
        if isinstance(ch, dict):
            return ch.get(index)
        if not isinstance(ch, _Channels):
            return None
        rank = self._rank(src)
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            fill = rank - (len(index) - 1 - sum(i is None for i in index))
            index = index[:at] + (slice(None),) * fill + index[at + 1 :]
        dim_in, dim_out = 0, 0
        for i in index:
            if i is None:
                dim_out += 1
                continue
            full = isinstance(i, slice) and i == slice(None)
            if dim_in == ch.dim:
                if not full:
                    self.freeze(ch.ids, f"indexing at node {node.name!r} selects channels")
                    return None
                return _Channels(dim=dim_out, ids=ch.ids)
            dim_out += 0 if isinstance(i, int) else 1
            dim_in += 1
        return _Channels(dim=dim_out + (ch.dim - dim_in), ids=ch.ids)

    # -- grouping ---------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        n = self.next_id
        a = np.concatenate(self.edges_a) if self.edges_a else np.zeros(0, np.int64)
        b = np.concatenate(self.edges_b) if self.edges_b else np.zeros(0, np.int64)
        adj = sp.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
        _, labels = connected_components(adj, directed=False)
        reason_of: dict[int, str] = {}
        for ids, reason in self.frozen_reasons:
            for lab in np.unique(labels[ids]):
                reason_of.setdefault(int(lab), reason)
        # ports sharing a label belong to one group: components of the port–label bipartite graph
        port_list = list(self.ports)
        offsets = np.cumsum([0] + [len(self.ports[p]) for p in port_list])
        port_index = np.repeat(np.arange(len(port_list)), np.diff(offsets))
        all_labels = (
            labels[np.concatenate([self.ports[p] for p in port_list])] if port_list else np.zeros(0, int)
        )
        uniq, inverse = np.unique(all_labels, return_inverse=True)
        m = len(port_list) + len(uniq)
        bip = sp.coo_matrix((np.ones(len(port_index)), (port_index, len(port_list) + inverse)), shape=(m, m))
        _, comp = connected_components(bip, directed=False)
        groups = []
        for g in np.unique(comp[: len(port_list)]):
            members = [p for i, p in enumerate(port_list) if comp[i] == g]
            group_labels = np.unique(np.concatenate([labels[self.ports[p]] for p in members]))
            local = {int(lab): k for k, lab in enumerate(group_labels)}
            classes = {
                p: np.array([local[int(x)] for x in labels[self.ports[p]]], dtype=np.int64) for p in members
            }
            reasons = {k: reason_of[lab] for lab, k in local.items() if lab in reason_of}
            frozen = set(reasons)
            groups.append(
                ChannelGroup(
                    ports=tuple(members),
                    classes=classes,
                    num_classes=len(group_labels),
                    frozen=frozenset(frozen),
                    reasons=reasons,
                )
            )
        return groups


def channel_groups(mg: ModelGraph) -> list[ChannelGroup]:
    """The coupled channel groups of a traced model, one per set of ports that prune together."""
    analysis = _Analysis(mg)
    analysis.run()
    return analysis.groups()


def find_group(groups: list[ChannelGroup], layer: str, port: str = "out") -> ChannelGroup:
    """The group holding ``(layer, port)``."""
    for group in groups:
        if (layer, port) in group.classes:
            return group
    raise KeyError(f"no channel group holds {port}-port of {layer!r}")
