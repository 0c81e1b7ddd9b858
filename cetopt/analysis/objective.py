"""The loss as a pure function of the quantizable weights, summed over a dataset in batches.

Every estimator works on this one object: it holds the model (never modified), its frozen
parameters and buffers, the batches, and gives the loss, its gradient and batched Hessian-vector
products with ``torch.func``. Gradients and HVPs of the dataset loss are batch sums weighted by
batch size, so the result is the same as one pass over the whole data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F

from cetopt._modes import to_eval
from cetopt.errors import DataShapeError, NonFiniteError, NoQuantizableLayerError
from cetopt.quant._calibration import is_data_mismatch

__all__ = ["LayerInfo", "LossObjective", "quantizable_layers"]

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: its name, weight, output channels, MACs per example, float bytes kept."""

    name: str
    weight: torch.Tensor
    channels: int
    macs: int
    fixed_bytes: int


def quantizable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Names of the Linear / Conv layers of ``model`` whose weights cetopt quantizes.

    Raises
    ------
    NoQuantizableLayerError
        If the model has none (or ``layers`` names a module that is not one).
    """
    found = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if layers is not None:
        wanted = list(layers)
        modules = dict(model.named_modules())
        for name in wanted:
            if name not in modules:
                raise NoQuantizableLayerError(f"model has no module named {name!r}")
            if not isinstance(modules[name], QUANTIZABLE):
                raise NoQuantizableLayerError(
                    f"layer {name!r} is a {type(modules[name]).__name__}; quantizable layers are "
                    f"{', '.join(t.__name__ for t in QUANTIZABLE)}"
                )
        found = wanted
    if not found:
        raise NoQuantizableLayerError(
            f"{type(model).__name__} has no quantizable layer ({', '.join(t.__name__ for t in QUANTIZABLE)})"
        )
    return found


def _batches(data, max_batches: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataShapeError(
                f"batch {i} is a {type(batch).__name__}; data must yield (inputs, targets) pairs"
            )
        x, y = batch
        x = torch.as_tensor(x)
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise NonFiniteError(f"batch {i} of the data holds NaN or infinity in its inputs")
        out.append((x, torch.as_tensor(y)))
    if not out:
        raise DataShapeError("data yielded no batches")
    return out


class LossObjective:
    """``L(W) = Σ_batches n_b · loss(model_W(x_b), y_b) / N`` over the quantizable weights ``W``.

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode (BatchNorm uses its running statistics); not modified.
    data : iterable of (inputs, targets)
    layers : list of str
        Quantizable layers (see :func:`quantizable_layers`).
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> scalar mean loss``; default cross-entropy.
    max_batches : int, optional
        Use only the first batches of ``data``.
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        layers: list[str],
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        max_batches: int | None = None,
    ):
        self.model = model
        self.loss_fn = loss_fn or F.cross_entropy
        self.batches = _batches(data, max_batches)
        self.total = sum(len(x) for x, _ in self.batches)
        self.keys = [f"{name}.weight" for name in layers]
        named = dict(model.named_parameters())
        self.weights = {k: named[k].detach() for k in self.keys}
        self.frozen = {k: v.detach() for k, v in named.items() if k not in self.weights}
        self.buffers = dict(model.named_buffers())
        self.layers = self._describe(layers)

    def _forward(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, ({**self.frozen, **weights}, self.buffers), (x,))

    def _batch_loss(self, weights, x, y) -> torch.Tensor:
        return self.loss_fn(self._forward(weights, x), y)

    def _describe(self, layers: list[str]) -> list[LayerInfo]:
        modules = dict(self.model.named_modules())
        macs: dict[str, int] = {}

        def hook(name):
            def record(module, inputs, output):
                per_out = module.weight[0].numel()  # in_features, or in_channels/groups × kernel
                macs[name] = int(output[0].numel() * per_out)

            return record

        handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
        x, y = self.batches[0]
        saved = to_eval(self.model)
        try:
            with torch.no_grad():
                out = self.model(x)
                self.loss_fn(out, y)
        except (RuntimeError, ValueError, IndexError) as exc:
            if not is_data_mismatch(exc):  # e.g. out of memory: not the data's fault
                raise
            raise DataShapeError(
                f"the model cannot run on the data: a batch of inputs {tuple(x.shape)} and targets "
                f"{tuple(y.shape)} failed with: {exc}"
            ) from exc
        finally:
            saved.restore()
            for h in handles:
                h.remove()
        infos = []
        for name in layers:
            m = modules[name]
            bias = getattr(m, "bias", None)
            infos.append(
                LayerInfo(
                    name,
                    m.weight.detach(),
                    m.weight.shape[0],
                    macs.get(name, 0),
                    0 if bias is None else 4 * bias.numel(),
                )
            )
        return infos

    def _weighted(self, fn, *args):
        """``Σ_b n_b/N · fn(batch_b)`` for a function returning a tensor or a dict of tensors."""
        total = None
        for x, y in self.batches:
            part = fn(*args, x, y)
            w = len(x) / self.total
            if isinstance(part, dict):
                total = (
                    {k: v * w for k, v in part.items()}
                    if total is None
                    else {k: total[k] + v * w for k, v in part.items()}
                )
            else:
                total = part * w if total is None else total + part * w
        return total

    @torch.no_grad()
    def loss(self, weights: dict[str, torch.Tensor] | None = None) -> float:
        """The dataset loss at ``weights`` (default: the model's own)."""
        w = {**self.weights, **(weights or {})}
        return float(self._weighted(self._batch_loss, w))

    def gradient(self) -> dict[str, torch.Tensor]:
        """∇L at the model's weights."""
        return self._weighted(grad(self._batch_loss), self.weights)

    def hvp(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v`` for a stack of directions (leading dim K), in one vmapped forward-over-reverse pass."""
        grad_fn = grad(self._batch_loss)

        def one(v, x, y):
            return jvp(lambda w: grad_fn(w, x, y), (self.weights,), (v,))[1]

        batched = vmap(one, in_dims=(0, None, None))
        return self._weighted(lambda v, x, y: batched(v, x, y), vectors)

    def per_sample_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradient of each example's loss (leading dim = batch), by vmap over ``grad``."""

        def one(w, xi, yi):
            return self._batch_loss(w, xi.unsqueeze(0), yi.unsqueeze(0))

        return vmap(grad(one), in_dims=(None, 0, 0))(self.weights, x, y)
