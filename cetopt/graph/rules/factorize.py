"""Factorize: swap a Linear/Conv for two thin layers plus an optional sparse part (a leaf swap)."""

from __future__ import annotations

from torch import nn

from cetopt.graph.decisions import Factorize
from cetopt.graph.rules.base import RewriteRule, RewriteState
from cetopt.nn.factorized import check_factor_shapes, factorized_from_factors

__all__ = ["FactorizeRule"]


class FactorizeRule(RewriteRule):
    """Carry out :class:`Factorize`."""

    decision_type = Factorize
    needs_graph = False

    def check(self, state: RewriteState, d: Factorize) -> str | None:
        module = state.module(d.layer)
        if not (
            isinstance(module, nn.Linear)
            or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed)
        ):
            return (
                f"{d.layer!r} is a {type(module).__name__}; only nn.Linear and nn.Conv1d/2d/3d are factorised"
            )
        if isinstance(module, nn.modules.conv._ConvNd) and (
            module.groups != 1 or module.padding_mode != "zeros"
        ):
            return f"{d.layer!r} is a grouped or non-zero-padded convolution"
        if d.sparse is not None and d.sparse.numel() != module.weight.numel():
            n = module.weight.numel()
            return f"the sparse part has {d.sparse.numel()} entries, the weight of {d.layer!r} has {n}"
        if d.second.dim() == 2 and d.second.shape[1] == 0 and (d.sparse is None or not d.sparse.any()):
            return f"rank 0 for {d.layer!r} needs a sparse part with nonzeros"
        try:
            check_factor_shapes(tuple(module.weight.shape), d.first, d.second)
        except ValueError as exc:
            return str(exc)
        return None

    def apply(self, state: RewriteState, d: Factorize) -> None:
        state.set_module(d.layer, factorized_from_factors(state.module(d.layer), d.first, d.second, d.sparse))
