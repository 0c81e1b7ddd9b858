"""Coupled channel groups: cetopt's dependency analysis side by side with Torch-Pruning's DepGraph.

For every layer whose output channels can be pruned, in an MLP, a CNN, a ResNet with basic blocks
and a transformer encoder block with nn.MultiheadAttention, both tools are asked what removing
output channel ``k`` touches. The answers are compared as sets of (module, port, channel indices).
Modules whose input and output channels are the same channels (BatchNorm, LayerNorm, attention)
are compared by name only, since DepGraph lists them once.

Needs the peer package (``pip install --no-deps torch-pruning``); it is not a cetopt dependency.
"""

from __future__ import annotations

import numpy as np

from cetopt.graph import channel_groups, get_handler, trace_model
from tests.graph.models import KINDS, example


def _ours(model, x) -> dict[str, dict[tuple[str, str], tuple[int, ...]]]:
    mg = trace_model(model, x)
    out: dict[str, dict] = {}
    for group in channel_groups(mg):
        for (name, port), labels in group.classes.items():
            if port != "out" or not group.prunable:
                continue
            k = int(labels[0])
            if k in group.frozen:
                continue
            touched = {}
            for (other, p), lab in group.classes.items():
                coupled = get_handler(mg.module.get_submodule(other)).is_coupled(
                    mg.module.get_submodule(other)
                )
                key = (other, "both" if coupled else p)
                touched[key] = tuple(int(i) for i in np.flatnonzero(lab == k))
            out[name] = touched
    return out


def _theirs(tp, model, x, layers) -> dict[str, dict[tuple[str, str], tuple[int, ...]]]:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for name in layers:
        module = model.get_submodule(name)
        group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs=[0])
        touched = {}
        for dep, idxs in group:
            target = names.get(dep.target.module)
            if target is None or get_handler(dep.target.module) is None:
                continue  # DepGraph's stand-in nodes for add/cat/flatten
            handler = get_handler(dep.target.module)
            coupled = handler.is_coupled(dep.target.module)
            port = "both" if coupled else ("out" if "out" in dep.handler.__name__ else "in")
            touched[(target, port)] = tuple(sorted(int(i) for i in idxs))
        out[name] = touched
    return out


def run(quick: bool = False) -> dict:
    try:
        import torch_pruning as tp
    except ImportError:
        return {"skipped": "torch-pruning is not installed (pip install --no-deps torch-pruning)"}
    report, total, matched = {}, 0, 0
    for kind in KINDS:
        model, x = example(kind)
        ours = _ours(model, x)
        theirs = _theirs(tp, model, x, list(ours))
        rows = []
        for layer in ours:
            same = ours[layer] == theirs[layer]
            total += 1
            matched += same
            row = {"layer": layer, "match": same, "ports": sorted(f"{n}:{p}" for n, p in ours[layer])}
            if not same:
                row["cetopt"] = {f"{n}:{p}": list(v) for (n, p), v in ours[layer].items()}
                row["depgraph"] = {f"{n}:{p}": list(v) for (n, p), v in theirs[layer].items()}
            rows.append(row)
        report[kind] = rows
    return {
        "torch_pruning": tp.__version__,
        "groups_compared": total,
        "groups_matching": matched,
        "models": report,
    }
