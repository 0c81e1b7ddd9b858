"""FoldLinearUnits: fold stably active units that are linear combinations of others into the next Linear."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cetopt.graph.decisions import FoldLinearUnits
from cetopt.graph.dependency import find_group
from cetopt.graph.rules.base import RewriteRule, RewriteState
from cetopt.graph.rules.conv_affine import CONV, conv_consumer, fold_check, fold_conv_units
from cetopt.graph.rules.merge_affine import path_between
from cetopt.graph.rules.remove_units import remove_classes

__all__ = ["FoldLinearUnitsRule"]


def _next_linear(state: RewriteState, layer: str) -> str | None:
    group = find_group(state.groups(), layer, "out")
    consumers = [name for name, port in group.ports if port == "in"]
    if set(group.ports) != {(layer, "out"), *((c, "in") for c in consumers)} or len(consumers) != 1:
        return None
    return consumers[0] if type(state.module(consumers[0])) is nn.Linear else None


class FoldLinearUnitsRule(RewriteRule):
    """Carry out :class:`FoldLinearUnits` on a Linear → (ReLU) → Linear chain, or a Conv → (ReLU)
    → Conv chain / Conv → (ReLU) → flatten → Linear chain (channels folded through the kernel)."""

    decision_type = FoldLinearUnits

    def check(self, state: RewriteState, d: FoldLinearUnits) -> str | None:
        if type(state.module(d.layer)) in CONV:
            return self._check_conv(state, d)
        if type(state.module(d.layer)) is not nn.Linear:
            return f"{d.layer!r} is not an nn.Linear or a Conv1d/2d"
        nxt = _next_linear(state, d.layer)
        if nxt is None:
            return f"the units of {d.layer!r} must feed exactly one nn.Linear, through activations only"
        path = path_between(state, d.layer, nxt, allow_activation=True)
        if isinstance(path, str):
            return path
        return _check_indices(d, state.module(d.layer).out_features)

    def _check_conv(self, state: RewriteState, d: FoldLinearUnits) -> str | None:
        nxt, path = conv_consumer(state, d.layer)
        if nxt is None:
            return f"the channels of {d.layer!r} must feed one Conv/Linear: {path}"
        group = find_group(state.groups(), d.layer, "out")
        if set(group.ports) != {(d.layer, "out"), (nxt, "in")}:
            return f"the channels of {d.layer!r} are coupled beyond {nxt!r}"
        reason = _check_indices(d, state.module(d.layer).out_channels)
        if reason is not None:
            return reason
        conv = state.module(d.layer)
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels).double()
        offsets = {
            int(k): float(b[int(k)] - sum(float(a) * b[int(j)] for j, a in c.items()))
            for k, c in d.coefficients.items()
        }
        return fold_check(state, d.layer, nxt, offsets)

    @torch.no_grad()
    def apply(self, state: RewriteState, d: FoldLinearUnits) -> None:
        if type(state.module(d.layer)) in CONV:
            nxt, path = conv_consumer(state, d.layer)
            fold_conv_units(state, d.layer, nxt, d.coefficients, path)
        else:
            self._apply_linear(state, d)
        group = find_group(state.groups(), d.layer, "out")
        units = np.asarray(sorted(int(k) for k in d.coefficients))
        remove_classes(state, group, group.classes[(d.layer, "out")][units])

    def _apply_linear(self, state: RewriteState, d: FoldLinearUnits) -> None:
        layer = state.module(d.layer)
        nxt_name = _next_linear(state, d.layer)
        nxt = state.module(nxt_name)
        w_next = nxt.weight.double().clone()
        b_next = (
            nxt.bias.double().clone()
            if nxt.bias is not None
            else torch.zeros(w_next.shape[0], dtype=torch.float64)
        )
        b = (
            layer.bias.double()
            if layer.bias is not None
            else torch.zeros(layer.out_features, dtype=torch.float64)
        )
        for k, combo in d.coefficients.items():
            col_k = w_next[:, int(k)].clone()
            offset = b[int(k)]
            for j, alpha in combo.items():
                w_next[:, int(j)] += float(alpha) * col_k
                offset = offset - float(alpha) * b[int(j)]
            b_next += col_k * offset
        nxt.weight.copy_(w_next.to(nxt.weight.dtype))
        if nxt.bias is None:
            nxt.bias = nn.Parameter(b_next.to(nxt.weight.dtype))
        else:
            nxt.bias.copy_(b_next.to(nxt.bias.dtype))


def _check_indices(d: FoldLinearUnits, n: int) -> str | None:
    folded = set(int(k) for k in d.coefficients)
    for k, combo in d.coefficients.items():
        used = set(int(j) for j in combo)
        if not (0 <= int(k) < n) or any(not 0 <= j < n for j in used):
            return f"unit index out of range: {d.layer!r} has {n} units"
        if used & folded:
            return f"unit {k} is expressed through units that are folded away themselves"
    if len(folded) >= n:
        return f"cannot fold every unit of {d.layer!r}"
    return None
