"""``rewrite``: apply a list of decisions to a copy of a model."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from torch import nn

from cetopt.errors import DataShapeError, RewriteError, UntraceableModelError
from cetopt.graph.decisions import Decision, decision_to_dict
from cetopt.graph.rules import RULES
from cetopt.graph.rules.base import RewriteState
from cetopt.graph.trace import as_input_tuple, symbolic_trace

__all__ = ["history", "rewrite"]

_HISTORY = "_cetopt_history"
_INPUTS = "_cetopt_example_inputs"
_SOURCE = "_cetopt_source"


def history(model: nn.Module) -> dict:
    """What cetopt knows of how ``model`` was made: its architecture source and the decisions applied.

    Returns ``{"source": str | None, "decisions": [dict, ...], "example_inputs": [...] | None}``;
    :func:`cetopt.save` stores it so that :func:`cetopt.load` can rebuild the structure.
    """
    return {
        "source": getattr(model, _SOURCE, None),
        "decisions": list(getattr(model, _HISTORY, [])),
        "example_inputs": getattr(model, _INPUTS, None),
    }


def _input_spec(inputs: tuple) -> list[dict]:
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]


def _describe(decision: Decision) -> str:
    name = (
        getattr(decision, "layer", None)
        or getattr(decision, "batchnorm", None)
        or getattr(decision, "second", "")
    )
    return f"{type(decision).__name__}({name!r})"


def rewrite(
    model: nn.Module,
    decisions: Iterable[Decision],
    example_inputs=None,
    *,
    leaf_types: Sequence[type] = (),
    copy_model: bool = True,
) -> nn.Module:
    """Return a new model with ``decisions`` applied; ``model`` itself is never modified.

    Parameters
    ----------
    model : nn.Module
    decisions : iterable of Decision
        Applied in order (:mod:`cetopt.graph.decisions`).
    example_inputs : Tensor or tuple of Tensors, optional
        Needed when a decision needs the traced graph (removing units, folding, merging); the
        result's shapes are checked on them.
    leaf_types : sequence of types
        Module types to keep opaque when tracing.
    copy_model : bool
        ``False`` edits ``model`` itself instead of a deep copy: only for a caller that owns it
        (:func:`cetopt.load` on the architecture it built).

    Returns
    -------
    nn.Module
        A ``torch.fx.GraphModule`` when the graph was needed (submodules keep their names, so its
        ``state_dict`` keys match the original's); otherwise a deep copy of ``model`` with the
        layers swapped. Plans made only of leaf swaps (``Quantize``, ``Factorize``) therefore also
        work on models that torch.fx cannot trace.

    Raises
    ------
    RewriteError
        A decision does not fit the model; the message names the decision and the reason.
    UntraceableModelError
        The plan needs the graph and fx cannot trace the model (names the module and fx's reason).
    """
    decisions = list(decisions)
    for d in decisions:
        if not isinstance(d, Decision):
            raise TypeError(f"decisions must be cetopt.graph decisions, got {type(d).__name__}")
        if type(d) not in RULES:
            raise RewriteError(f"no rewrite rule is registered for {type(d).__name__}")
    needs_graph = any(RULES[type(d)].needs_graph for d in decisions)
    work = copy.deepcopy(model) if copy_model else model
    if needs_graph:
        if example_inputs is None:
            raise DataShapeError(
                f"{_describe(next(d for d in decisions if RULES[type(d)].needs_graph))} needs the model's "
                "graph; pass example_inputs"
            )
        try:
            traced = symbolic_trace(work, leaf_types=leaf_types)
        except UntraceableModelError as exc:
            first = next(d for d in decisions if RULES[type(d)].needs_graph)
            raise UntraceableModelError(
                f"{_describe(first)} needs the model's graph, which torch.fx cannot build: {exc} "
                "(quantization, sensitivity, GPTQ, bias correction and save/load need no graph)",
                exc.module_name,
            ) from exc
        state = RewriteState(traced, as_input_tuple(example_inputs))
    else:
        state = RewriteState(work, None if example_inputs is None else as_input_tuple(example_inputs))
    for d in decisions:
        rule = RULES[type(d)]
        try:
            reason = rule.check(state, d)
        except RewriteError as exc:  # e.g. an unknown layer name found while checking
            reason = str(exc)
        if reason is not None:
            raise RewriteError(f"{_describe(d)}: {reason}")
        rule.apply(state, d)
    result = state.finish()
    result.train(model.training)
    past = history(model)
    setattr(result, _HISTORY, past["decisions"] + [decision_to_dict(d) for d in decisions])
    setattr(result, _SOURCE, past["source"])
    spec = _input_spec(state.example_inputs) if state.example_inputs is not None else None
    setattr(result, _INPUTS, past["example_inputs"] or spec)
    return result
