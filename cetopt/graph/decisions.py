"""Decisions: what to change in a model, as plain frozen data. The rewriter turns them into a new model.

Each decision names layers by their ``model.named_modules()`` names and is carried out by exactly
one rewrite rule (see :mod:`cetopt.graph.rules`). Decisions are applied in order, and names refer
to the model as it is at that point (a merged-away layer can no longer be named).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "Decision",
    "Factorize",
    "FoldBatchNorm",
    "FoldLinearUnits",
    "MergeAffine",
    "Quantize",
    "RemoveUnits",
]


@dataclass(frozen=True)
class Decision:
    """Base class of decisions."""


@dataclass(frozen=True)
class RemoveUnits(Decision):
    """Remove output units (features or channels) of ``layer`` and every channel coupled to them.

    The coupled channels are found by the dependency analysis: BatchNorm/LayerNorm parameters, the
    inputs of every downstream consumer (through activations, residual adds, concatenations at
    their offsets, and flattens into a Linear), and the other producers of a residual sum.

    The rule is structural. It is exact when the removed channels carry zeros into their
    consumers (dead ReLU units), or known constants given in ``constants``: then the constant
    ``c_k`` of each removed unit ``k`` is added to the bias of each consumer as
    ``b += W[:, k] · c_k`` (for a convolution consumer only when it has no padding, where that is
    exact).

    Attributes
    ----------
    layer : str
    units : sequence of int
        Output units of ``layer`` to remove.
    constants : sequence of float, optional
        The value each removed unit feeds its consumers (after its activation), if not zero.
    """

    layer: str
    units: Sequence[int]
    constants: Sequence[float] | None = None


@dataclass(frozen=True)
class FoldBatchNorm(Decision):
    """Fold an eval-mode BatchNorm into the convolution or Linear that produces its input.

    ``W' = W · γ/σ`` per output channel and ``b' = (b − μ) γ/σ + β`` with ``σ = sqrt(var + eps)``.
    Exact in eval mode. The producer's output must feed only this BatchNorm.
    """

    batchnorm: str


@dataclass(frozen=True)
class MergeAffine(Decision):
    """Merge Linear ``first`` into the Linear ``second`` after it: ``W = W2 W1``, ``b = W2 b1 + b2``.

    Between them only shape-preserving no-ops (Identity, Dropout in eval mode, flatten of a 2-D
    tensor) may stand, plus an activation when ``drop_activation`` is true: the caller asserts the
    activation acts as the identity on every input that matters (e.g. every unit of ``first`` is
    proven stably active over the input domain). ``first`` must feed only this path.
    The merged layer takes ``second``'s name; ``first`` disappears.
    """

    first: str
    second: str
    drop_activation: bool = False


@dataclass(frozen=True)
class FoldLinearUnits(Decision):
    """Fold units of Linear ``layer`` that are linear combinations of other units into the next Linear.

    ``coefficients[k] = {j: α_j, ...}`` states ``W[k] = Σ_j α_j W[j]`` for the weights (the biases
    may differ). The caller asserts that the ReLU after ``layer`` is the identity on units ``k`` and
    all ``j`` (they are stably active). Then with ``W⁺`` the next layer's weight:
    ``W⁺[:, j] += α_j W⁺[:, k]``, ``b⁺ += W⁺[:, k] (b_k − Σ_j α_j b_j)``, and unit ``k`` is removed.
    """

    layer: str
    coefficients: Mapping[int, Mapping[int, float]]


@dataclass(frozen=True)
class Quantize(Decision):
    """Replace an nn.Linear / nn.ConvNd by a layer with integer weights and per-channel scales.

    Attributes
    ----------
    layer : str
    bits : int or sequence of int
        2 to 32, for the whole layer or one per output channel.
    clip_search : bool
        Search the MSE-optimal clipping ratio per channel.
    add_bias : bool
        Give the quantized layer a (zero) bias even where the float layer has none, so a bias
        correction has somewhere to go (:func:`cetopt.quant.correct_bias`).
    group_size : int, optional
        A scale per group of this many (flattened) input columns; ``None``: per output channel.
    """

    layer: str
    bits: int | Sequence[int]
    clip_search: bool = True
    add_bias: bool = False
    group_size: int | None = None


@dataclass(frozen=True, eq=False)
class Factorize(Decision):
    """Replace a Linear/ConvNd by two thin layers and an optional sparse part: ``W ≈ second·first + S``.

    Attributes
    ----------
    layer : str
    first : Tensor, shape (r, in) — for a convolution (r, in·k…) or (r, in, k…)
    second : Tensor, shape (out, r)
    sparse : Tensor, optional
        Same number of elements as the weight; only its nonzeros are stored.
    """

    layer: str
    first: torch.Tensor = field(repr=False)
    second: torch.Tensor = field(repr=False)
    sparse: torch.Tensor | None = field(default=None, repr=False)


def decision_to_dict(d: Decision) -> dict:
    """Plain JSON-able form of a decision: enough to redo its structural change on a fresh model."""
    if isinstance(d, Quantize):
        bits = d.bits if isinstance(d.bits, int) else [int(b) for b in d.bits]
        out = {
            "type": "Quantize",
            "layer": d.layer,
            "bits": bits,
            "clip_search": d.clip_search,
            "add_bias": d.add_bias,
        }
        if d.group_size is not None:  # absent in files written before groups existed
            out["group_size"] = int(d.group_size)
        return out
    if isinstance(d, RemoveUnits):
        constants = None if d.constants is None else [float(c) for c in d.constants]
        return {
            "type": "RemoveUnits",
            "layer": d.layer,
            "units": [int(u) for u in d.units],
            "constants": constants,
        }
    if isinstance(d, FoldBatchNorm):
        return {"type": "FoldBatchNorm", "batchnorm": d.batchnorm}
    if isinstance(d, MergeAffine):
        return {
            "type": "MergeAffine",
            "first": d.first,
            "second": d.second,
            "drop_activation": d.drop_activation,
        }
    if isinstance(d, FoldLinearUnits):
        coefficients = {str(k): {str(j): float(a) for j, a in v.items()} for k, v in d.coefficients.items()}
        return {"type": "FoldLinearUnits", "layer": d.layer, "coefficients": coefficients}
    if isinstance(d, Factorize):
        nnz = 0 if d.sparse is None else int(torch.count_nonzero(d.sparse))
        return {
            "type": "Factorize",
            "layer": d.layer,
            "first_shape": list(d.first.shape),
            "second_shape": list(d.second.shape),
            "nnz": nnz,
            "sparse_numel": None if d.sparse is None else int(d.sparse.numel()),
        }
    raise TypeError(f"cannot serialize {type(d).__name__}")


def decision_from_dict(data: dict) -> Decision:
    """Rebuild a decision from :func:`decision_to_dict`.

    A ``Factorize`` comes back with zero factors of the recorded shapes (and a sparse part with the
    recorded number of nonzeros): the same structure, to be filled by loading a state dict.
    """
    kind = data.get("type")
    if kind == "Quantize":
        return Quantize(
            data["layer"],
            data["bits"],
            data.get("clip_search", True),
            data.get("add_bias", False),
            data.get("group_size"),
        )
    if kind == "RemoveUnits":
        return RemoveUnits(data["layer"], data["units"], data.get("constants"))
    if kind == "FoldBatchNorm":
        return FoldBatchNorm(data["batchnorm"])
    if kind == "MergeAffine":
        return MergeAffine(data["first"], data["second"], data.get("drop_activation", False))
    if kind == "FoldLinearUnits":
        coefficients = {
            int(k): {int(j): float(a) for j, a in v.items()} for k, v in data["coefficients"].items()
        }
        return FoldLinearUnits(data["layer"], coefficients)
    if kind == "Factorize":
        sparse = None
        if data.get("nnz"):
            sparse = torch.zeros(data["sparse_numel"])
            sparse[: data["nnz"]] = 1.0
        return Factorize(
            data["layer"], torch.zeros(data["first_shape"]), torch.zeros(data["second_shape"]), sparse
        )
    raise ValueError(f"unknown decision type {kind!r}")
