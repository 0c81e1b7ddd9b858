"""Rewrite rules, one per file, registered by the decision type they carry out."""

from __future__ import annotations

from cetopt.graph.decisions import Decision
from cetopt.graph.rules.base import RewriteRule, RewriteState
from cetopt.graph.rules.factorize import FactorizeRule
from cetopt.graph.rules.fold_batchnorm import FoldBatchNormRule
from cetopt.graph.rules.fold_linear_units import FoldLinearUnitsRule
from cetopt.graph.rules.merge_affine import MergeAffineRule
from cetopt.graph.rules.quantize import QuantizeRule
from cetopt.graph.rules.remove_units import RemoveUnitsRule

__all__ = ["RULES", "RewriteRule", "RewriteState", "register_rule"]

RULES: dict[type[Decision], RewriteRule] = {}


def register_rule(rule: RewriteRule, *, replace: bool = False) -> None:
    """Register ``rule`` for its ``decision_type`` (a new type, or a replacement with ``replace``)."""
    if not isinstance(rule, RewriteRule):
        raise TypeError(f"rule must be a RewriteRule instance, got {rule!r}")
    key = rule.decision_type
    if key in RULES and not replace:
        raise ValueError(f"{key.__name__} already has a rule; pass replace=True to replace it")
    RULES[key] = rule


for _rule in (
    RemoveUnitsRule(),
    FoldBatchNormRule(),
    MergeAffineRule(),
    FoldLinearUnitsRule(),
    QuantizeRule(),
    FactorizeRule(),
):
    register_rule(_rule)
