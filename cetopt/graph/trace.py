"""Trace a model with torch.fx and view it as a networkx graph with shapes.

Leaves of the trace are the layers cetopt knows (every type with a :class:`LayerHandler`), torch.nn
modules without children (activations, pooling, dropout, ...), cetopt's own compressed layers, and
whatever the caller lists in ``leaf_types``. Containers (``nn.Sequential``, a user's blocks, and
composite torch.nn modules) are traced through, so their inner layers are visible and keep their
``named_modules()`` names.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from cetopt.errors import DataShapeError, UntraceableModelError
from cetopt.graph.handlers import get_handler

__all__ = ["ModelGraph", "as_input_tuple", "trace_model"]


def as_input_tuple(example_inputs) -> tuple:
    """Normalise example inputs (a tensor, or a tuple/list of them) to a tuple."""
    if example_inputs is None:
        raise DataShapeError("example_inputs is required to trace the model (a tensor or tuple of tensors)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


class _CetoptTracer(fx.Tracer):
    """A tracer that remembers which module it was inside when tracing failed."""

    def __init__(self, leaf_types: Sequence[type] = ()):
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or get_handler(m) is not None:
            return True
        if type(m).__module__.startswith("cetopt.nn"):
            return True
        is_torch_nn = type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))
        return is_torch_nn and not isinstance(m, nn.Sequential) and len(m._modules) == 0

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


@dataclass
class ModelGraph:
    """A traced model: the fx GraphModule, a networkx DiGraph over it, and per-node shapes.

    Attributes
    ----------
    module : torch.fx.GraphModule
        The traced model; its submodules keep the original ``named_modules()`` names.
    graph : networkx.DiGraph
        One node per fx node (keyed by the fx node name) with attributes ``op``, ``target``,
        ``module`` (qualified name, for module calls), ``type`` (class name) and ``shape``; one
        edge per tensor flowing from producer to consumer, with its ``shape``.
    """

    module: fx.GraphModule
    graph: nx.DiGraph

    def node(self, name: str) -> fx.Node:
        """The fx node called ``name``."""
        for node in self.module.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def layer_node(self, layer: str) -> fx.Node:
        """The (unique) fx node that calls submodule ``layer``."""
        return layer_node(self.module, layer)

    def layers(self) -> list[str]:
        """Names of called submodules that have a handler, in execution order."""
        gm = self.module
        return [
            n.target
            for n in gm.graph.nodes
            if n.op == "call_module" and get_handler(gm.get_submodule(n.target)) is not None
        ]


def layer_node(gm: fx.GraphModule, layer: str) -> fx.Node:
    """The (unique) fx node of ``gm`` that calls submodule ``layer`` (no shapes needed)."""
    found = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if not found:
        raise KeyError(layer)
    if len(found) > 1:
        raise ValueError(f"layer {layer!r} is called {len(found)} times; shared layers cannot be rewritten")
    return found[0]


def node_shape(node: fx.Node):
    """Output shape recorded by ShapeProp (a tuple; a list of tuples for tuple outputs; None if unknown)."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(meta.shape)
    if isinstance(meta, (list, tuple)):
        return [tuple(m.shape) if hasattr(m, "shape") else None for m in meta]
    return None


def _to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        attrs = {
            "op": node.op,
            "target": str(node.target),
            "shape": node_shape(node),
            "module": None,
            "type": None,
        }
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            attrs.update(module=node.target, type=type(sub).__name__)
        elif node.op == "call_function":
            attrs["type"] = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            attrs["type"] = str(node.target)
        g.add_node(node.name, **attrs)
        for parent in node.all_input_nodes:
            g.add_edge(parent.name, node.name, shape=node_shape(parent))
    return g


def symbolic_trace(model: nn.Module, *, leaf_types: Sequence[type] = ()) -> fx.GraphModule:
    """fx-trace ``model`` with cetopt's leaf rules; failures become :class:`UntraceableModelError`."""
    tracer = _CetoptTracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_in or ""
        label = (
            f"module {where!r} ({type(model.get_submodule(where)).__name__})"
            if where
            else (f"the top-level forward of {type(model).__name__}")
        )
        raise UntraceableModelError(
            f"torch.fx cannot trace {label}: {type(exc).__name__}: {exc}. Data-dependent control flow "
            "cannot be traced; rewrite it with tensor ops, or pass the module's type in leaf_types "
            "if it needs no rewriting inside.",
            module_name=where or None,
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ShapeProp; a failing forward becomes a :class:`DataShapeError` naming the node."""
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise DataShapeError(f"the model does not run on example inputs of shape {shapes}: {exc}") from exc


def trace_model(model: nn.Module, example_inputs, *, leaf_types: Sequence[type] = ()) -> ModelGraph:
    """Trace ``model`` (which is not modified) and annotate every node with its output shape.

    Parameters
    ----------
    model : nn.Module
    example_inputs : Tensor or tuple of Tensors
        Inputs used to record shapes (ShapeProp).
    leaf_types : sequence of types, optional
        Extra module types to keep opaque (not traced into).

    Raises
    ------
    UntraceableModelError
        If torch.fx cannot trace it; names the innermost module and gives fx's reason.
    DataShapeError
        If the model does not run on ``example_inputs``.
    """
    gm = symbolic_trace(model, leaf_types=leaf_types)
    propagate_shapes(gm, as_input_tuple(example_inputs))
    return ModelGraph(module=gm, graph=_to_networkx(gm))


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
