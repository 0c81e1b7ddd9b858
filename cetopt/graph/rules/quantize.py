"""Quantize: swap a Linear/Conv for its integer-weight counterpart (a leaf swap; no graph needed)."""

from __future__ import annotations

from torch import nn

from cetopt.graph.decisions import Quantize
from cetopt.graph.rules.base import RewriteRule, RewriteState
from cetopt.nn.quantized import quantized_from_float
from cetopt.quant.quantizer import check_group_size

__all__ = ["QuantizeRule"]


class QuantizeRule(RewriteRule):
    """Carry out :class:`Quantize`."""

    decision_type = Quantize
    needs_graph = False

    def check(self, state: RewriteState, d: Quantize) -> str | None:
        module = state.module(d.layer)
        ok = isinstance(module, nn.Linear) or (
            isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
        )
        if not ok:
            return (
                f"{d.layer!r} is a {type(module).__name__}; only nn.Linear and nn.Conv1d/2d/3d are quantized"
            )
        try:
            check_group_size(d.group_size)
        except ValueError as exc:
            return f"{d.layer!r}: {exc}"
        return None

    def apply(self, state: RewriteState, d: Quantize) -> None:
        state.set_module(
            d.layer,
            quantized_from_float(
                state.module(d.layer),
                d.bits,
                clip_search=d.clip_search,
                add_bias=d.add_bias,
                group_size=d.group_size,
            ),
        )
