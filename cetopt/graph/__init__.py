"""The graph rewriter: trace a model, find coupled channels, and write decisions back into a new model.

Data flows one way: a compression method produces :mod:`decisions <cetopt.graph.decisions>`; a
rule per decision type (:mod:`cetopt.graph.rules`) carries it out on a copy of the model;
:func:`rewrite` returns the new model. Layer types are taught to the rewriter through
:class:`LayerHandler` plugins (:func:`register_layer_handler`).
"""

from cetopt.graph.decisions import (
    Decision,
    Factorize,
    FoldBatchNorm,
    FoldLinearUnits,
    MergeAffine,
    Quantize,
    RemoveUnits,
)
from cetopt.graph.dependency import ChannelGroup, channel_groups, find_group
from cetopt.graph.handlers import (
    LayerHandler,
    get_handler,
    register_layer_handler,
    registered_layer_types,
    unregister_layer_handler,
)
from cetopt.graph.rewriter import rewrite
from cetopt.graph.rules import RULES, RewriteRule, RewriteState, register_rule
from cetopt.graph.trace import ModelGraph, trace_model

__all__ = [
    "RULES",
    "ChannelGroup",
    "Decision",
    "Factorize",
    "FoldBatchNorm",
    "FoldLinearUnits",
    "LayerHandler",
    "MergeAffine",
    "ModelGraph",
    "Quantize",
    "RemoveUnits",
    "RewriteRule",
    "RewriteState",
    "channel_groups",
    "find_group",
    "get_handler",
    "register_layer_handler",
    "register_rule",
    "registered_layer_types",
    "rewrite",
    "trace_model",
    "unregister_layer_handler",
]
