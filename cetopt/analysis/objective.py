"""The loss as a pure function of the quantizable weights, summed over a dataset in batches.

Every estimator works on this one object: it holds the model (never modified), its frozen
parameters and buffers, the batches, and gives the loss, its gradient and batched Hessian-vector
products with ``torch.func``. Gradients and HVPs of the dataset loss are batch sums weighted by
batch size, so the result is the same as one pass over the whole data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F

from cetopt._modes import to_eval
from cetopt.errors import CetoptError, DataShapeError, NonFiniteError, NoQuantizableLayerError
from cetopt.quant._calibration import is_data_mismatch, module_calls
from cetopt.quant.handlers import call_macs, quant_targets, registered_quant_types, select_targets

__all__ = [
    "LOSSES",
    "REFERENCE_LOSSES",
    "LayerInfo",
    "LossObjective",
    "is_reference_loss",
    "kl_to_float",
    "math_attention",
    "model_logits",
    "next_token_loss",
    "quantizable_layers",
    "reference_batches",
    "resolve_loss",
]

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the built-in matrix layers (see handlers)

LossFn = Callable[[object, torch.Tensor], torch.Tensor] | str | None


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer: its name, weight, output channels, MACs per example, float bytes kept.

    ``weight`` is in the codes layout of its handler (output channels on dimension 0).
    """

    name: str
    weight: torch.Tensor
    channels: int
    macs: int
    fixed_bytes: int


def quantizable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Names of the allocation rows of ``model``: one per distinct weight that a quantization handler
    covers (:mod:`cetopt.quant.handlers`; a tied weight is one row, named by its first module).

    Raises
    ------
    NoQuantizableLayerError
        If the model has none (or ``layers`` names a module that is not one).
    """
    targets, _ = quant_targets(model)
    found = [t.name for t in select_targets(targets, layers, model)]
    if not found:
        raise NoQuantizableLayerError(
            f"{type(model).__name__} has no quantizable layer ({', '.join(registered_quant_types())})"
        )
    return found


def model_logits(output) -> torch.Tensor:
    """The prediction tensor of a model output: the tensor itself, ``output["logits"]`` of an HF
    ``ModelOutput`` or a dict (else its first value), or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        return next(iter(output.values()))
    if isinstance(output, (tuple, list)) and output:
        return model_logits(output[0])
    raise DataShapeError(f"cannot find the predictions in a model output of type {type(output).__name__}")


def next_token_loss(output, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token ``t + 1`` from the logits at ``t`` (a causal LM's loss)."""
    logits = model_logits(output)
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), tokens[..., 1:].reshape(-1))


def _cross_entropy(output, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model_logits(output), targets)


def kl_to_float(output, reference: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(p_float ‖ p)`` of the distributions the logits give over their last dimension.

    ``reference`` holds the float model's logits on the same inputs (same shape as the
    prediction tensor of ``output``); the mean is over every other position (examples, tokens).
    It is zero at the float weights and positive elsewhere, and compares a quantized model with
    the float one on the same inputs (paired), so it measures what quantization changes far
    less noisily than a task loss on the same data. As ``loss_fn="kl_to_float"`` the targets
    are these logits, computed by the objective itself (:func:`reference_batches`). Computed
    in float64 (a float64 scalar).
    """
    logits = model_logits(output)
    if logits.shape != reference.shape:
        raise DataShapeError(
            f"kl_to_float: the model's logits {tuple(logits.shape)} and the float reference "
            f"{tuple(reference.shape)} differ in shape"
        )
    # in float64: the divergences of 8-bit options are far below float32's resolution of log p
    log_p = F.log_softmax(reference.double(), dim=-1)
    log_q = F.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


kl_to_float.reference = True  # its targets are the float model's own outputs

LOSSES: dict[str, Callable] = {"cross_entropy": _cross_entropy, "next_token": next_token_loss}
#: Losses against the float model's outputs on the same inputs (the data's targets are not used).
REFERENCE_LOSSES: dict[str, Callable] = {"kl_to_float": kl_to_float}


def resolve_loss(loss_fn: LossFn) -> Callable:
    """The loss callable for ``loss_fn``: ``None`` (cross-entropy), a name of :data:`LOSSES`
    (``"next_token"``: shifted cross-entropy on ``logits``, targets are the input tokens) or of
    :data:`REFERENCE_LOSSES` (``"kl_to_float"``: :func:`kl_to_float` against the float model's
    outputs), or a callable ``loss_fn(outputs, targets)`` given the model's raw outputs."""
    if loss_fn is None:
        return _cross_entropy
    if isinstance(loss_fn, str):
        found = LOSSES.get(loss_fn) or REFERENCE_LOSSES.get(loss_fn)
        if found is None:
            known = ", ".join([*LOSSES, *REFERENCE_LOSSES])
            raise CetoptError(f"unknown loss {loss_fn!r}; built in: {known}")
        return found
    if not callable(loss_fn):
        raise CetoptError(f"loss_fn must be a callable or the name of a built-in loss, got {loss_fn!r}")
    return loss_fn


def is_reference_loss(loss: Callable) -> bool:
    """Whether ``loss`` (from :func:`resolve_loss`) compares with the float model's outputs."""
    return bool(getattr(loss, "reference", False))


@torch.no_grad()
def reference_batches(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """``(x, float logits of model on x)`` for each batch: the targets of a reference loss.

    The model runs in eval mode and is restored afterwards. The logits are kept for every batch
    (``examples × positions × classes`` floats).
    """
    saved = to_eval(model)
    try:
        with module_calls():
            return [(x, model_logits(model(x)).detach().float()) for x, _ in batches]
    except (RuntimeError, ValueError, IndexError) as exc:
        if not is_data_mismatch(exc):
            raise
        raise DataShapeError(
            f"the model cannot run on the data: a batch of inputs {tuple(batches[0][0].shape)} "
            f"failed with: {exc}"
        ) from exc
    finally:
        saved.restore()


def math_attention():
    """A context in which ``scaled_dot_product_attention`` uses its math kernel, the one that
    supports forward-mode AD, vmap and double backward (torch's fused CPU kernels do not)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _batches(
    data, max_batches: int | None, self_targets: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        if self_targets and isinstance(batch, torch.Tensor):
            batch = (batch, batch)  # a language model's tokens are its own targets
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
    loss_fn : callable or str, optional
        ``loss_fn(outputs, targets) -> scalar mean loss``, ``"next_token"``, or
        ``"kl_to_float"`` (:func:`kl_to_float`: the batches' targets are replaced by the float
        model's logits, so the loss is 0 at the model's weights); default cross-entropy (the
        built-ins read ``logits`` from HF outputs and dicts).
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
        self.loss_fn = resolve_loss(loss_fn)
        self.reference = is_reference_loss(self.loss_fn)
        self_targets = self.reference or self.loss_fn is next_token_loss
        self.batches = _batches(data, max_batches, self_targets=self_targets)
        if self.reference:  # the targets become the float model's own outputs
            self.batches = reference_batches(model, self.batches)
        self.total = sum(len(x) for x, _ in self.batches)
        targets, self.kept_float = quant_targets(model)
        self.targets = select_targets(targets, layers, model)
        self.keys = [t.key for t in self.targets]
        modules = dict(model.named_modules())
        self._owners = {t.key: modules[t.name] for t in self.targets}
        self._handlers = {t.key: t.handler for t in self.targets}
        named = dict(model.named_parameters())
        # In the codes layout (output channels first): every estimator works per row of it.
        self.weights = {
            t.key: t.handler.codes_layout(self._owners[t.key], named[t.key].detach()) for t in self.targets
        }
        self.frozen = {k: v.detach() for k, v in named.items() if k not in self.weights}
        self.buffers = dict(model.named_buffers())
        self.layers = self._describe()

    def natural(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (codes layout) shaped as the parameter ``key`` of the model."""
        return self._handlers[key].natural(self._owners[key], weight)

    def site(self, key: str):
        """Where :mod:`cetopt.analysis.replay` puts a trial weight for ``key``."""
        from cetopt.analysis.replay import Site

        target = self.targets[self.keys.index(key)]
        owner, handler = self._owners[key], self._handlers[key]
        return Site(
            key, tuple(dict.fromkeys(u.runs_in for u in target.uses)), lambda w: handler.natural(owner, w)
        )

    def _forward(self, weights: dict[str, torch.Tensor], x: torch.Tensor):
        params = {k: self.natural(k, w) for k, w in weights.items()}
        return functional_call(self.model, ({**self.frozen, **params}, self.buffers), (x,))

    def _batch_loss(self, weights, x, y) -> torch.Tensor:
        return self.loss_fn(self._forward(weights, x), y)

    def _describe(self) -> list[LayerInfo]:
        modules = dict(self.model.named_modules())
        macs: dict[str, int] = {}
        x, y = self.batches[0]

        def hook(target, use):
            def record(module, args, kwargs, output):
                macs.setdefault(target.name, 0)  # per example, summed over every call of every user
                macs[target.name] += call_macs(use, module, args, kwargs, output) // max(len(x), 1)

            return record

        handles = [
            modules[use.runs_in].register_forward_hook(hook(t, use), with_kwargs=True)
            for t in self.targets
            for use in t.uses
        ]
        saved = to_eval(self.model)
        try:
            with torch.no_grad(), module_calls():
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
        for t in self.targets:
            w = self.weights[t.key]
            bias = t.handler.bias(modules[t.name])
            fixed = 0 if not isinstance(bias, torch.Tensor) else 4 * bias.numel()
            infos.append(LayerInfo(t.name, w, w.shape[0], macs.get(t.name, 0), fixed))
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
        with math_attention():
            return self._weighted(grad(self._batch_loss), self.weights)

    def hvp(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v`` for a stack of directions (leading dim K), in one vmapped forward-over-reverse pass."""
        grad_fn = grad(self._batch_loss)

        def one(v, x, y):
            return jvp(lambda w: grad_fn(w, x, y), (self.weights,), (v,))[1]

        batched = vmap(one, in_dims=(0, None, None))
        with math_attention():
            return self._weighted(lambda v, x, y: batched(v, x, y), vectors)

    def per_sample_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradient of each example's loss (leading dim = batch), by vmap over ``grad``."""

        def one(w, xi, yi):
            return self._batch_loss(w, xi.unsqueeze(0), yi.unsqueeze(0))

        with math_attention():
            return vmap(grad(one), in_dims=(None, 0, 0))(self.weights, x, y)
