"""The preservation set: hard, representative examples drawn from held-out training data.

Three criteria each rank the held-out examples, and the set takes them in turn (round robin,
without repeats) until it is full:

* **uncertainty** — lowest max-softmax first, only examples with ``1 − max softmax > threshold``
  (for a language model, the mean over tokens);
* **diversity** — k-means on penultimate features (the input of the last layer, averaged over
  tokens for a language model); each cluster contributes the examples nearest its centre in turn;
* **saliency** — Grad-CAM energy on the last convolution (``Σ relu(Σ_c α_c A_c)`` with ``α_c`` the
  spatial mean of ``∂CE/∂A_c``), or ``‖A ⊙ ∂CE/∂A‖₁`` at the penultimate features for a model
  without convolutions; highest first.

Everything is measured with the model in eval mode. Indices refer to the data the caller passed,
so the labels stay aligned with their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cetopt._modes import eval_mode, in_eval_mode

__all__ = ["PreservationSet", "build_preservation_set", "example_scores"]


@dataclass(frozen=True, eq=False)
class PreservationSet:
    """Examples the compression must not forget.

    Attributes
    ----------
    x, y : Tensor
        Inputs and their labels (``y[i]`` belongs to ``x[i]``).
    indices : ndarray
        Position of each example in the training data handed to :func:`cetopt.self_compress`
        (for a zoo Dataset: its train split followed by its ``val`` split).
    sources : list of str
        Which criterion picked each example: ``"uncertainty"``, ``"diversity"`` or ``"saliency"``.
    counts : dict
        Examples per criterion.
    """

    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {s: self.sources.count(s) for s in ("uncertainty", "diversity", "saliency")}

    def __len__(self) -> int:
        return len(self.indices)


def _last_layers(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The last Linear/Conv-like layer (its input = penultimate features) and the last convolution."""
    from cetopt.selfcompress.layers import SelfCompressingConv, SelfCompressingLayer

    convs = (nn.modules.conv._ConvNd, SelfCompressingConv)
    last = last_conv = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, SelfCompressingLayer)):
            last = module
            if isinstance(module, convs):
                last_conv = module
    return last, last_conv


def _per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
    )
    return losses.reshape(y.shape[0], -1).mean(dim=1)


def example_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> dict:
    """Per-example max-softmax confidence, penultimate features and saliency (model in eval mode).

    Returns
    -------
    dict
        ``confidence`` (N,), ``features`` (N, D) and ``saliency`` (N,) as numpy arrays.
    """
    last, last_conv = _last_layers(model)
    conf, feats, sal = [], [], []
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            c, f, s = _batch_scores(model, last, last_conv, xb, yb)
            conf.append(c)
            feats.append(f)
            sal.append(s)
    return {
        "confidence": torch.cat(conf).numpy(),
        "features": torch.cat(feats).numpy(),
        "saliency": torch.cat(sal).numpy(),
    }


def _batch_scores(model, last, last_conv, xb, yb):
    store: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        store["features"] = args[0]

    def keep_output(module, args, output):
        output.retain_grad()
        store["conv"] = output

    handles = [last.register_forward_pre_hook(keep_input)]
    if last_conv is not None:
        handles.append(last_conv.register_forward_hook(keep_output))
    try:
        with torch.enable_grad():
            logits = model(xb)
            target = store["conv"] if last_conv is not None else store["features"]
            if not target.requires_grad:
                target = None
            if target is not None:
                if last_conv is None:
                    target.retain_grad()
                _per_example_loss(logits, yb).sum().backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    probs = torch.softmax(logits.detach(), dim=-1).amax(dim=-1)
    confidence = probs.reshape(len(xb), -1).mean(dim=1)
    features = store["features"].detach()
    features = (
        features.reshape(len(xb), -1, features.shape[-1]).mean(dim=1) if features.dim() == 3 else features
    )
    features = features.reshape(len(xb), -1)
    if target is None or target.grad is None:
        saliency = torch.zeros(len(xb))
    elif last_conv is not None:
        a, g = target.detach(), target.grad
        alpha = g.reshape(*g.shape[:2], -1).mean(dim=2)
        cam = torch.relu((alpha.reshape(*alpha.shape, *([1] * (a.dim() - 2))) * a).sum(dim=1))
        saliency = cam.reshape(len(xb), -1).sum(dim=1)
    else:
        saliency = (target.detach() * target.grad).abs().reshape(len(xb), -1).sum(dim=1)
    return confidence, features, saliency


def _diversity_order(features: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    k = max(1, min(clusters, len(features)))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(features)
    dist = np.linalg.norm(features - km.cluster_centers_[km.labels_], axis=1)
    per_cluster = [
        np.flatnonzero(km.labels_ == c)[np.argsort(dist[km.labels_ == c], kind="stable")] for c in range(k)
    ]
    order = []
    for depth in range(max(len(p) for p in per_cluster)):
        order.extend(int(p[depth]) for p in per_cluster if depth < len(p))
    return np.asarray(order, dtype=np.int64)


@in_eval_mode("model")
def build_preservation_set(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    candidates: np.ndarray,
    *,
    size: int = 256,
    uncertainty_threshold: float = 0.2,
    clusters: int = 10,
    seed: int = 0,
) -> PreservationSet:
    """Pick up to ``size`` examples among ``x[candidates]`` by uncertainty, diversity and saliency.

    Parameters
    ----------
    model : nn.Module
        Scored in eval mode; its mode is restored afterwards.
    x, y : Tensor
        The training data (all of it); only the rows in ``candidates`` are considered.
    candidates : ndarray of int
        Held-out rows of ``x`` (never trained on by the caller's fit split, never test data).
    size : int
        At most this many examples (the paper uses up to 1000).
    uncertainty_threshold : float
        An example counts as uncertain when ``1 − max softmax`` exceeds it.
    clusters : int
        k of the k-means on penultimate features.
    seed : int
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    scores = example_scores(model, x[candidates], y[candidates])
    uncertainty = 1.0 - scores["confidence"]
    by_uncertainty = np.argsort(-uncertainty, kind="stable")
    by_uncertainty = by_uncertainty[uncertainty[by_uncertainty] > uncertainty_threshold]
    lists = {
        "uncertainty": by_uncertainty,
        "diversity": _diversity_order(scores["features"], clusters, seed),
        "saliency": np.argsort(-scores["saliency"], kind="stable"),
    }
    chosen: list[int] = []
    sources: list[str] = []
    seen: set[int] = set()
    cursors = dict.fromkeys(lists, 0)
    size = min(size, len(candidates))
    while len(chosen) < size:
        progressed = False
        for name, order in lists.items():
            while cursors[name] < len(order) and int(order[cursors[name]]) in seen:
                cursors[name] += 1
            if cursors[name] < len(order) and len(chosen) < size:
                pick = int(order[cursors[name]])
                seen.add(pick)
                chosen.append(pick)
                sources.append(name)
                progressed = True
        if not progressed:
            break
    rows = candidates[np.asarray(chosen, dtype=np.int64)]
    index = torch.as_tensor(rows)
    return PreservationSet(x=x[index].clone(), y=y[index].clone(), indices=rows, sources=sources)
