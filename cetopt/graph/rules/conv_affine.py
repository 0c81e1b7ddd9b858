"""Folding and merging convolutions whose output channels are affine (stably active ReLUs).

Used by :class:`FoldLinearUnitsRule` and :class:`MergeAffineRule` when the layer is a Conv1d/2d:

* **fold**: channel ``k = Σ_j α_j channel_j + (b_k − Σ_j α_j b_j)`` at every position, so the next
  layer's input channel ``k`` moves onto the channels ``j``: a Conv's kernel slices (exact when
  it has no zero padding, or when the offset is exactly zero: a padded position of channel ``k``
  is 0, not the offset), or a Linear's columns ``k·P + p`` through a flatten.
* **merge**: ``conv₂ ∘ conv₁`` (no padding, no groups, no dilation) is a convolution with kernel
  ``k₁ + (k₂ − 1) s₁`` and stride ``s₁ s₂``; ``linear ∘ flatten ∘ conv`` is a Linear on the
  flattened input of the conv. Both are computed in float64 from impulse responses and checked
  against the composition on random inputs before they are used.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn

from cetopt.graph.rules.base import RewriteState

__all__ = ["CONV", "conv_consumer", "fold_conv_units", "merge_conv", "merged_conv_module"]

CONV = (nn.Conv1d, nn.Conv2d)
_PASS_FUNCS = {torch.relu, nn.functional.relu, torch.flatten}
_PASS_METHODS = {"relu", "flatten", "contiguous"}


def conv_consumer(state: RewriteState, layer: str) -> tuple[str | None, list[fx.Node] | str]:
    """The Conv/Linear that reads ``layer``'s output through ReLU/flatten/no-op nodes, and the path."""
    graph = state.graph()
    node, path = graph.layer_node(layer), []
    while True:
        if len(node.users) != 1:
            return None, f"the output of {node.name!r} is used {len(node.users)} times"
        node = next(iter(node.users))
        if node.op == "call_module":
            module = state.module(node.target)
            if type(module) in (*CONV, nn.Linear):
                return node.target, path
            if not isinstance(module, (nn.ReLU, nn.Identity, nn.Flatten)):
                return None, f"{node.name!r} ({type(module).__name__}) stands between"
        elif (
            not (
                (node.op == "call_function" and node.target in _PASS_FUNCS)
                or (node.op == "call_method" and node.target in _PASS_METHODS)
            )
            or node.target is operator.getitem
        ):
            return None, f"{node.name!r} stands between {layer!r} and the next layer"
        path.append(node)


def _flattens(state: RewriteState, path: list[fx.Node]) -> bool:
    return any(
        (n.op == "call_module" and isinstance(state.module(n.target), nn.Flatten))
        or n.target in (torch.flatten, "flatten")
        for n in path
    )


def fold_check(state: RewriteState, layer: str, nxt: str, offsets: dict[int, float]) -> str | None:
    """Why channels of conv ``layer`` cannot fold into ``nxt`` with these offsets, or ``None``."""
    consumer = state.module(nxt)
    if isinstance(consumer, CONV):
        if consumer.groups != 1:
            return f"{nxt!r} is a grouped convolution"
        zero_padded = consumer.padding_mode == "zeros" and any(
            p != 0 for p in np.atleast_1d(consumer.padding)
        )
        if zero_padded and any(v != 0.0 for v in offsets.values()):
            return f"{nxt!r} zero-pads its input, and the folded channels have non-zero offsets"
    return None


@torch.no_grad()
def fold_conv_units(state: RewriteState, layer: str, nxt: str, coefficients, path) -> None:
    """Move the next layer's weights of each folded channel onto the channels it combines."""
    conv, consumer = state.module(layer), state.module(nxt)
    b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    w = consumer.weight.double().clone()
    bias = consumer.bias.double().clone() if consumer.bias is not None else torch.zeros(w.shape[0]).double()
    channels = conv.out_channels
    per = w.shape[1] // channels if isinstance(consumer, nn.Linear) else 1
    view = w.reshape(w.shape[0], channels, -1)  # (out, channel, taps or positions)
    for k, combo in coefficients.items():
        col_k = view[:, int(k)].clone()
        offset = b[int(k)] - sum(float(a) * b[int(j)] for j, a in combo.items())
        for j, alpha in combo.items():
            view[:, int(j)] += float(alpha) * col_k
        bias += col_k.sum(dim=1) * offset
    assert per >= 1
    consumer.weight.copy_(view.reshape(w.shape).to(consumer.weight.dtype))
    if consumer.bias is None:
        consumer.bias = nn.Parameter(bias.to(consumer.weight.dtype))
    else:
        consumer.bias.copy_(bias.to(consumer.bias.dtype))


def merge_check(state: RewriteState, first: str, second: str) -> str | None:
    """Why conv ``first`` cannot merge into ``second``, or ``None``."""
    a, b = state.module(first), state.module(second)
    if isinstance(b, CONV):
        for m, name in ((a, first), (b, second)):
            if m.groups != 1 or any(d != 1 for d in np.atleast_1d(m.dilation)):
                return f"{name!r} is grouped or dilated: the composition is not represented here"
            if any(p != 0 for p in np.atleast_1d(m.padding)):
                return f"{name!r} zero-pads: padding between two convolutions is not itself a convolution"
        if type(a) is not type(b):
            return f"{first!r} and {second!r} have different dimensions"
    return None


@torch.no_grad()
def merged_conv_module(state: RewriteState, first: str, second: str, in_shape: tuple[int, ...]) -> nn.Module:
    """The single layer equal to ``second ∘ (flatten) ∘ first`` on inputs of shape ``in_shape``.

    Raises ``ValueError`` when the merged layer differs from the composition (float64 check).
    """
    a, b = state.module(first), state.module(second)
    a64, b64 = _double(a), _double(b)
    if isinstance(b, nn.Linear):
        features = int(np.prod(in_shape))
        basis = torch.eye(features, dtype=torch.float64).reshape(features, *in_shape)
        zero = torch.zeros(1, *in_shape, dtype=torch.float64)
        out_zero = b64(a64(zero).flatten(1))
        weight = (b64(a64(basis).flatten(1)) - out_zero).T
        merged = nn.Linear(features, b.out_features, dtype=torch.float64)
        merged.weight.copy_(weight)
        merged.bias.copy_(out_zero[0])
        probe = lambda x: b64(a64(x).flatten(1))  # noqa: E731
        merged_fn = lambda x: merged(x.flatten(1))  # noqa: E731
    else:
        dims = a.weight.dim() - 2
        k1, k2 = np.atleast_1d(a.kernel_size), np.atleast_1d(b.kernel_size)
        s1, s2 = np.atleast_1d(a.stride), np.atleast_1d(b.stride)
        size = tuple(int(v) for v in k1 + (k2 - 1) * s1)
        n_in = a.in_channels * int(np.prod(size))
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, a.in_channels, *size)
        zero = torch.zeros(1, a.in_channels, *size, dtype=torch.float64)
        out_zero = b64(a64(zero))  # (1, out, 1, 1)
        response = (b64(a64(basis)) - out_zero).reshape(n_in, b.out_channels).T
        cls = nn.Conv1d if dims == 1 else nn.Conv2d
        merged = cls(a.in_channels, b.out_channels, size, stride=tuple(int(v) for v in s1 * s2))
        merged = merged.double()
        merged.weight.copy_(response.reshape(b.out_channels, a.in_channels, *size))
        merged.bias.copy_(out_zero.reshape(-1))
        probe = lambda x: b64(a64(x))  # noqa: E731
        merged_fn = merged
    x = torch.rand(4, *in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want, got = probe(x), merged_fn(x)
    if want.shape != got.shape or (want - got).abs().max() > 1e-9 * max(1.0, want.abs().max().item()):
        raise ValueError(f"merging {first!r} into {second!r} does not reproduce the composition")
    merged = merged.to(b.weight.dtype)
    merged.train(b.training)
    return merged


def _double(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).double()


def merge_conv(state: RewriteState, first: str, second: str, path: list[fx.Node], merged: nn.Module) -> None:
    """Put ``merged`` in place of ``second`` reading ``first``'s input (through a flatten if it had one)."""
    graph = state.graph()
    a, b = graph.layer_node(first), graph.layer_node(second)
    state.set_module(second, merged)
    flatten = [n for n in path if n.op != "call_module" or isinstance(state.module(n.target), nn.Flatten)]
    flatten = [n for n in flatten if n.target not in (torch.relu, nn.functional.relu, "relu", "contiguous")]
    if flatten:  # keep one flatten, now reading the conv's input
        keep = flatten[0]
        keep.args = (a.args[0], *keep.args[1:])
        b.args = (keep, *b.args[1:])
        drop = [n for n in path if n is not keep]
    else:
        b.args = (a.args[0], *b.args[1:])
        drop = list(path)
    for node in [*reversed(drop), a]:
        state.model.graph.erase_node(node)
    state.changed()
