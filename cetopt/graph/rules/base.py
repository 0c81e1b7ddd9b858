"""The contract of a rewrite rule, and the state it works on."""

from __future__ import annotations

import abc
from typing import ClassVar

from torch import fx, nn

from cetopt.errors import RewriteError
from cetopt.graph.decisions import Decision
from cetopt.graph.dependency import ChannelGroup, channel_groups
from cetopt.graph.handlers import LayerHandler, get_handler
from cetopt.graph.trace import ModelGraph, _to_networkx, layer_node, propagate_shapes

__all__ = ["RewriteRule", "RewriteState"]


class RewriteState:
    """The working copy of a model during a rewrite, with its graph analysis cached.

    ``model`` is a ``torch.fx.GraphModule`` when the plan needs the graph, otherwise a deep copy of
    the user's model in which leaf modules are swapped. Rules edit it in place (it is never the
    user's object) and call :meth:`changed` after structural edits.
    """

    def __init__(self, model: nn.Module, example_inputs: tuple | None):
        self.model = model
        self.example_inputs = example_inputs
        self._graph: ModelGraph | None = None
        self._groups: list[ChannelGroup] | None = None

    @property
    def traced(self) -> bool:
        return isinstance(self.model, fx.GraphModule)

    def graph(self) -> ModelGraph:
        """The current graph with fresh shapes (recomputed after each structural change)."""
        if not self.traced:
            raise RewriteError("this decision needs the traced graph, but the model was not traced")
        if self._graph is None:
            propagate_shapes(self.model, self.example_inputs)
            self._graph = ModelGraph(module=self.model, graph=_to_networkx(self.model))
        return self._graph

    def layer_node(self, layer: str) -> fx.Node:
        """The fx node calling submodule ``layer``, from the graph as it is: no shape propagation,
        for rules that need only the wiring (shapes are checked once, in :meth:`finish`)."""
        if not self.traced:
            raise RewriteError("this decision needs the traced graph, but the model was not traced")
        return layer_node(self.model, layer)

    def groups(self) -> list[ChannelGroup]:
        """Coupled channel groups of the current graph."""
        if self._groups is None:
            self._groups = channel_groups(self.graph())
        return self._groups

    def module(self, name: str) -> nn.Module:
        """Submodule ``name``; a :class:`RewriteError` if there is none."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise RewriteError(f"the model has no layer named {name!r}") from None

    def handler(self, name: str) -> tuple[nn.Module, LayerHandler]:
        """Submodule ``name`` and its layer handler; a :class:`RewriteError` if it has none."""
        module = self.module(name)
        handler = get_handler(module)
        if handler is None:
            raise RewriteError(
                f"layer {name!r} is a {type(module).__name__}, which has no layer handler; register one with "
                "cetopt.graph.register_layer_handler"
            )
        return module, handler

    def set_module(self, name: str, module: nn.Module) -> None:
        """Replace submodule ``name`` by ``module``."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)
        self.changed()

    def changed(self) -> None:
        """Forget cached analysis; recompile the graph's code."""
        self._graph = None
        self._groups = None
        if self.traced:
            self.model.recompile()

    def finish(self) -> nn.Module:
        """The rewritten model, with unused submodules dropped and shapes checked on the example inputs."""
        if self.traced:
            self.model.graph.eliminate_dead_code()
            self.model.delete_all_unused_submodules()
            self.model.graph.lint()
            self.changed()
            if self.example_inputs is not None:
                propagate_shapes(self.model, self.example_inputs)
        return self.model


class RewriteRule(abc.ABC):
    """One rewrite rule: carries out one :class:`Decision` type.

    ``check`` says why a decision cannot be applied (or ``None`` if it can); ``apply`` carries it
    out on the state. Rules that only swap a leaf module set ``needs_graph = False``, so plans made
    only of them also work on models torch.fx cannot trace.
    """

    decision_type: ClassVar[type[Decision]]
    needs_graph: ClassVar[bool] = True

    def accepts(self, state: RewriteState, decision: Decision) -> bool:
        """Whether ``decision`` can be applied to the current state."""
        return self.check(state, decision) is None

    @abc.abstractmethod
    def check(self, state: RewriteState, decision: Decision) -> str | None:
        """The reason ``decision`` cannot be applied, or ``None``."""

    @abc.abstractmethod
    def apply(self, state: RewriteState, decision: Decision) -> None:
        """Carry out ``decision`` (already checked)."""
