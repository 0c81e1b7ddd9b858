"""``remove_stable_units``: delete and fold the stable units a :class:`StabilityReport` found.

Everything goes through the graph rewriter (:func:`cetopt.graph.rewrite`), one decision at a time:

* BatchNorms between a layer and its ReLU are folded first (:class:`FoldBatchNorm`);
* stably inactive units are deleted, and units with zero weights and a positive bias (constants)
  are deleted with their value pushed into the next layer's bias (:class:`RemoveUnits`);
* stably active units whose weights are linear combinations of other stably active units are
  folded into the next Linear (:class:`FoldLinearUnits`);
* a Linear whose units are all stable is merged into the next Linear (:class:`MergeAffine`).

A decision the rewriter refuses (e.g. a unit feeding a residual sum) is skipped and its reason
recorded; skipping is always exact, it only compresses less.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
from torch import fx, nn

from cetopt._modes import in_eval_mode
from cetopt.errors import ReportMismatchError, RewriteError
from cetopt.graph import FoldBatchNorm, FoldLinearUnits, MergeAffine, RemoveUnits, rewrite
from cetopt.graph.dependency import channel_groups, find_group
from cetopt.graph.trace import symbolic_trace, trace_model
from cetopt.leo.report import LayerReport, StabilityReport, weights_fingerprint

__all__ = ["remove_stable_units"]

_PASS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _next_linear(model: nn.Module, layer: str) -> str | None:
    """The Linear that reads ``layer``'s output through a chain of ReLU/identity nodes, if any."""
    gm = model if isinstance(model, fx.GraphModule) else symbolic_trace(model)
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer), None)
    while node is not None and len(node.users) == 1:
        node = next(iter(node.users))
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if type(module) is nn.Linear:
                return node.target
            if not isinstance(module, _PASS_MODULES):
                return None
        elif (node.op == "call_function" and node.target not in (torch.relu, nn.functional.relu)) or (
            node.op == "call_method" and node.target != "relu"
        ):
            return None
    return None


def _dependent_units(
    weight: np.ndarray, units: np.ndarray, rtol: float = 1e-9
) -> dict[int, dict[int, float]]:
    """For active ``units``, express the linearly dependent rows of ``weight`` through independent ones."""
    if units.size < 2:
        return {}
    rows = weight[units]
    _, r, piv = scipy.linalg.qr(rows.T, pivoting=True, mode="economic")
    diag = np.abs(np.diag(r))
    rank = int(np.sum(diag > rtol * max(diag.max(initial=0.0), 1e-300)))
    basis, others = units[piv[:rank]], units[piv[rank:]]
    out: dict[int, dict[int, float]] = {}
    for k in others:
        alpha, *_ = np.linalg.lstsq(weight[basis].T, weight[k], rcond=None)
        if np.linalg.norm(weight[basis].T @ alpha - weight[k]) <= 1e-10 * max(1.0, np.linalg.norm(weight[k])):
            out[int(k)] = {int(j): float(a) for j, a in zip(basis, alpha)}
    return out


def _coupled_elsewhere(model: nn.Module, layer: str, example: torch.Tensor) -> str | None:
    """Why removing output units of ``layer`` would touch more than its consumers' inputs, if it would.

    A unit's channel can also be an output of another layer (a residual sum): deleting it there
    changes that layer's contribution, so such units are kept.
    """
    group = find_group(channel_groups(trace_model(model, example)), layer, "out")
    others = [name for name, port in group.ports if port == "out" and name != layer]
    if others:
        return f"its channels are summed with the outputs of {others}; removing them is not exact"
    return None


class _Remover:
    def __init__(self, model: nn.Module, report: StabilityReport):
        self.model = model
        self.example = torch.zeros(1, *report.input_shape)
        self.log: dict[str, dict] = {}

    def apply(self, decision, layer: str, what: str) -> bool:
        try:
            self.model = rewrite(self.model, [decision], self.example)
        except RewriteError as exc:
            self.log[layer].setdefault("skipped", []).append(f"{what}: {exc}")
            return False
        return True

    def layer(self, r: LayerReport) -> None:
        entry = self.log.setdefault(r.name, {"removed": 0, "constants": 0, "folded": 0, "merged_into": None})
        if r.producer is None:
            entry["skipped"] = ["the ReLU does not read a single Linear/Conv output; nothing removed"]
            return
        if r.batchnorm is not None and not self.apply(FoldBatchNorm(r.batchnorm), r.name, "fold batchnorm"):
            return
        reason = _coupled_elsewhere(self.model, r.name, self.example)
        if reason is not None:
            entry["skipped"] = [reason]
            return
        kept = self.remove(r, entry)
        self.fold(r, entry, kept)

    def remove(self, r: LayerReport, entry: dict) -> np.ndarray:
        """Delete inactive and constant units; return the original indices of the units kept."""
        constant = np.isfinite(r.constant) & (r.state == 1)
        remove = np.flatnonzero((r.state == -1) | constant)
        if remove.size == r.units:  # a constant network: keep one unit so that it still runs
            remove = remove[1:]
        if remove.size:
            values = [float(max(r.constant[u], 0.0)) if constant[u] else 0.0 for u in remove]
            ok = constant[remove].any() and self.apply(
                RemoveUnits(r.name, remove.tolist(), values), r.name, "remove constants"
            )
            if not ok:
                remove = remove[~constant[remove]]
                ok = remove.size > 0 and self.apply(RemoveUnits(r.name, remove.tolist()), r.name, "remove")
            if ok:
                entry["removed"] = int(remove.size)
                entry["constants"] = int(constant[remove].sum())
            else:
                remove = np.zeros(0, dtype=np.int64)
        return np.setdiff1d(np.arange(r.units), remove)

    def merge(self, r: LayerReport, entry: dict, nxt: str) -> bool:
        """Merge an all-active layer into ``nxt`` (a conv only where that saves parameters)."""
        before = self.model
        if not self.apply(MergeAffine(r.name, nxt, drop_activation=True), r.name, "merge"):
            return False
        if r.kind == "conv" and _params(self.model) >= _params(before):
            self.model = before
            self.log[r.name].setdefault("skipped", []).append("merge: the merged layer is not smaller")
            return False
        entry["merged_into"] = nxt
        return True

    def fold(self, r: LayerReport, entry: dict, kept: np.ndarray) -> None:
        nxt = (
            _next_linear(self.model, r.name)
            if r.kind == "linear"
            else _next_layer(self.model, r.name, self.example)
        )
        active_old = kept[r.state[kept] == 1]
        if nxt is None or active_old.size == 0:
            return
        new_index = {int(u): i for i, u in enumerate(kept)}
        active = np.array([new_index[int(u)] for u in active_old])
        if active.size == kept.size and self.merge(r, entry, nxt):
            return  # every remaining unit was stably active: the layer merged away
        weight = self.model.get_submodule(r.name).weight.detach().double().flatten(1).numpy()
        coefficients = _dependent_units(weight, active)
        if coefficients and self.apply(FoldLinearUnits(r.name, coefficients), r.name, "fold"):
            entry["folded"] = len(coefficients)


def _next_layer(model: nn.Module, layer: str, example: torch.Tensor) -> str | None:
    """The Conv/Linear reading conv ``layer``'s output through ReLU/flatten nodes, if any."""
    from cetopt.graph.rules.base import RewriteState
    from cetopt.graph.rules.conv_affine import conv_consumer

    gm = model if isinstance(model, fx.GraphModule) else symbolic_trace(model)
    try:
        return conv_consumer(RewriteState(gm, (example,)), layer)[0]
    except RewriteError:
        return None


def _check_fingerprint(model: nn.Module, report: StabilityReport) -> None:
    if report.fingerprint is not None and weights_fingerprint(model) != report.fingerprint:
        raise ReportMismatchError(
            "the stability report was computed on a model with other weights: its units are stable "
            "only for those weights; run find_stable_units on this model"
        )


@in_eval_mode("model")
def remove_stable_units(model: nn.Module, report: StabilityReport) -> nn.Module:
    """A compressed copy of ``model`` with the stable units of ``report`` removed or folded.

    Parameters
    ----------
    model : nn.Module
        The model the report was made for (never modified).
    report : StabilityReport
        From :func:`cetopt.find_stable_units`.

    Returns
    -------
    nn.Module
        The compressed model, equal to ``model`` on the report's domain. Its ``leo_removal``
        attribute records per layer the units removed, constants folded, units folded, the layer
        merged into, and any decision the rewriter skipped; plus the parameter counts and
        ``constant_network``.

    Raises
    ------
    ReportMismatchError
        ``report`` was computed on a model with other weights or buffers.

    Warns
    -----
    UserWarning
        When a layer is entirely stably inactive: the network is constant on the domain. One unit
        of that layer is kept so that the model still runs (and returns that constant).
    """
    if not isinstance(report, StabilityReport):
        raise TypeError(f"report must be a StabilityReport, got {type(report).__name__}")
    _check_fingerprint(model, report)
    if report.constant:
        names = [r.name for r in report.layers if len(r.inactive) == r.units]
        warnings.warn(
            f"layer(s) {names} are entirely stably inactive: the network is constant on this domain",
            stacklevel=3,  # past the in_eval_mode wrapper, to the caller
        )
    remover = _Remover(model, report)
    for r in report.layers:
        remover.layer(r)
    out = remover.model
    if out is model:
        out = rewrite(model, [])  # still a copy
    before, after = _params(model), _params(out)
    out.leo_removal = {
        "layers": remover.log,
        "params_before": before,
        "params_after": after,
        "params_removed_fraction": 1.0 - after / max(before, 1),
        "constant_network": report.constant,
    }
    return out
