"""What a layer sees and what follows it: calibration inputs as columns, and the activation after it.

For every Linear/Conv1d/Conv2d layer the calibration inputs become a matrix ``X`` of shape
``(fan_in, N)``: the flattened inputs of a Linear layer, the unfolded patches of a convolution (one
column per output position), subsampled to at most ``max_columns`` columns. The layer's output
then is ``W X + b`` with ``W`` the weight flattened to ``(out, fan_in)``.

What follows the layer is read from its torch.fx graph: an optional BatchNorm in eval mode (a
per-channel affine ``a ⊙ z + d``) and then an optional ReLU. The fit target is
``σ(a ⊙ (W X + b) + d)``; a layer whose output feeds anything else (an add, a pooling, two users)
is fitted with σ = identity after the BatchNorm.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from cetopt._modes import to_eval
from cetopt.errors import CalibrationShapeError, NonFiniteError, UnsupportedLayerError
from cetopt.lowrank.fit import GramFactors
from cetopt.nn.unfold import input_rows, is_matmul_layer

__all__ = [
    "LayerData",
    "collect",
    "collect_each",
    "layer_errors",
    "menu_layers",
    "supported_layers",
    "weight_matrix",
]

GROUP_BYTES = 256 * 2**20  # calibration columns held at once by collect_each (float64)
_UNFOLD_BYTES = 32 * 2**20  # one unfolded chunk of a batch, before its columns are picked

_RELU = (torch.relu, F.relu, torch.nn.functional.relu)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LayerData:
    """One layer's fitting problem.

    Attributes
    ----------
    name : str
    weight : Tensor, shape (m, n)
        The weight as a matrix (float64).
    bias : Tensor, shape (m,)
        Bias (zeros without one).
    inputs : Tensor, shape (n, N)
        Calibration columns.
    scale, shift : Tensor, shape (m,)
        The per-channel affine between the layer and its activation (a following BatchNorm).
    activation : str
        ``"relu"`` or ``"identity"``.
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor
    inputs: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    activation: str

    @functools.cached_property
    def factors(self) -> GramFactors:
        """``XXᵀ`` and its factorisation, computed once and shared by every fit of this layer."""
        return GramFactors.of(self.inputs)

    @functools.cached_property
    def reference(self) -> torch.Tensor:
        """The original post-activation output ``σ(a ⊙ (W X + b) + d)``."""
        return self.output(self.weight)

    @property
    def effective_weight(self) -> torch.Tensor:
        """``diag(scale) W``: the weight as seen by the activation."""
        return self.scale[:, None] * self.weight

    @property
    def effective_bias(self) -> torch.Tensor:
        return self.scale * self.bias + self.shift

    def output(self, weight: torch.Tensor) -> torch.Tensor:
        """``σ(a ⊙ (W' X + b) + d)`` for a candidate weight matrix ``W'``."""
        z = (self.scale[:, None] * weight.to(torch.float64)) @ self.inputs + self.effective_bias[:, None]
        return z.clamp_min(0) if self.activation == "relu" else z

    def relative_error(self, weight: torch.Tensor) -> float:
        """``‖σ(W'…) − σ(W…)‖² / ‖σ(W…)‖²`` on the calibration columns."""
        ref = self.reference
        return float((self.output(weight) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def supported_layers(model: nn.Module) -> list[str]:
    """Names of the layers that can be decomposed (Linear, ungrouped zero-padded Conv1d/Conv2d)."""
    return [name for name, m in model.named_modules() if name and is_matmul_layer(m)]


def menu_layers(model: nn.Module) -> list[str]:
    """Names of the layers a menu can hold: every Linear/Conv1d/Conv2d.

    Convolutions must pad with zeros (as the quantized layers do). The :func:`supported_layers`
    among them get every kind; the others (grouped or depthwise convolutions, ``"same"``
    padding) are quantized only.
    """
    return [name for name, m in model.named_modules() if name and _on_menu(m)]


def _on_menu(module: nn.Module) -> bool:
    return isinstance(module, _LAYERS) and getattr(module, "padding_mode", "zeros") == "zeros"


def check_menu_layers(modules: Mapping[str, nn.Module], names: list[str]) -> None:
    """Raise :class:`UnsupportedLayerError` for a name that is not a Linear/Conv1d/Conv2d."""
    for name in names:
        if not _on_menu(modules.get(name, nn.Identity())):
            kind = type(modules[name]).__name__ if name in modules else "missing"
            mode = getattr(modules.get(name), "padding_mode", "zeros")
            why = f" with padding_mode={mode!r}" if mode != "zeros" else ""
            raise UnsupportedLayerError(
                f"layer {name!r} ({kind}{why}) cannot be on a menu: only nn.Linear, and "
                "nn.Conv1d/Conv2d padding with zeros, can (grouped convolutions with quantization "
                "options only)",
                name,
            )


class _Stop(Exception):
    """Ends a forward pass once the layer of :func:`layer_errors` has run."""


def _post(z: torch.Tensor, scale, shift, activation: str, channel_dim: int) -> torch.Tensor:
    shape = [1] * z.dim()
    shape[channel_dim] = -1
    z = z.double() * scale.view(shape) + shift.view(shape)
    return z.clamp_min(0) if activation == "relu" else z


@torch.no_grad()
def layer_errors(
    model: nn.Module, name: str, x: torch.Tensor, weights: list[torch.Tensor], *, chunk: int = 64
) -> list[float]:
    """:meth:`LayerData.relative_error` of each candidate weight, for any Linear/Conv layer.

    The layer's post-activation output (its following BatchNorm and ReLU, as :func:`collect`
    reads them) with each weight against the original one, on the layer's inputs from ``x``;
    the network stops after the layer, ``chunk`` examples at a time. It works for the layers
    :func:`collect` cannot unfold (grouped convolutions, ``padding="same"``).

    Parameters
    ----------
    model : nn.Module
        In eval mode; not modified.
    name : str
        A Linear, Conv1d or Conv2d layer.
    x : Tensor
        Calibration examples ``(batch, *input_shape)``.
    weights : list of Tensor
        Candidate weights, as the ``(out, fan_in)`` matrix or in the layer's shape.
    """
    modules = dict(model.named_modules())
    check_menu_layers(modules, [name])
    if not weights:
        return []
    module = modules[name]
    bn, activation = _followers(model, [name])[name]
    scale, shift = _affine(bn, module.weight.shape[0])
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    errors = torch.zeros(len(weights), dtype=torch.float64)
    norm = 0.0

    def hook(m, args, out):
        nonlocal norm
        inp = args[0]
        ref = _post(out, scale, shift, activation, channel_dim)
        norm += float(ref.pow(2).sum())
        for k, w in enumerate(weights):
            w = w.reshape(m.weight.shape).to(inp.dtype)
            z = F.linear(inp, w, m.bias) if isinstance(m, nn.Linear) else m._conv_forward(inp, w, m.bias)
            errors[k] += (_post(z, scale, shift, activation, channel_dim) - ref).pow(2).sum()
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        for start in range(0, len(x), chunk):
            with contextlib.suppress(_Stop):
                model(x[start : start + chunk])
    finally:
        handle.remove()
    return (errors / max(norm, 1e-30)).tolist()


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear/Conv as ``(out, fan_in)`` float64."""
    return module.weight.detach().reshape(module.weight.shape[0], -1).to(torch.float64)


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs of one batch as columns of shape ``(fan_in, positions)``."""
    return input_rows(module, x.detach().to(torch.float64)).T


def _batches(calibration) -> Iterable[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        yield calibration
        return
    for batch in calibration:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _check_batch(x, index: int) -> None:
    if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or _is_integer(x)):
        raise CalibrationShapeError(
            f"calibration batch {index} must be a floating-point (or token id) tensor, got "
            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}"
        )
    if x.dim() < 2 or x.shape[0] == 0:
        raise CalibrationShapeError(
            f"calibration batch {index} has shape {tuple(x.shape)}; expected (batch, *input_shape)"
        )
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise NonFiniteError(f"calibration batch {index} holds NaN or infinity")


def _is_integer(x: torch.Tensor) -> bool:
    """Token ids (a language model's inputs): any integer dtype but bool."""
    return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _follower(graph: fx.Graph, modules: Mapping[str, nn.Module], name: str):
    """(BatchNorm module or None, activation) that follows the call of layer ``name``."""
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None:
        return None, "identity"
    bn = None
    if len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules.get(user.target), nn.modules.batchnorm._BatchNorm):
            bn, node = modules[user.target], user
    if len(node.users) != 1:
        return bn, "identity"
    user = next(iter(node.users))
    relu = (
        (user.op == "call_function" and user.target in _RELU)
        or (user.op == "call_method" and user.target == "relu")
        or (user.op == "call_module" and isinstance(modules.get(user.target), nn.ReLU))
    )
    return bn, "relu" if relu else "identity"


def _affine(bn, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    if bn is None or bn.training or bn.running_mean is None:
        return torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    inv = (bn.running_var.double() + bn.eps).rsqrt()
    weight = bn.weight.detach().double() if bn.weight is not None else torch.ones(channels)
    bias = bn.bias.detach().double() if bn.bias is not None else torch.zeros(channels)
    scale = weight * inv
    scale = torch.where(scale.abs() < 1e-8, torch.full_like(scale, 1e-8), scale)  # keep it invertible
    return scale, bias - bn.running_mean.double() * weight * inv


def _followers(model: nn.Module, names: list[str]) -> dict[str, tuple]:
    modules = dict(model.named_modules())
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # untraceable: fit every layer's own output
        return {n: (None, "identity") for n in names}
    return {n: _follower(graph, modules, n) for n in names}


def check_layers(modules: Mapping[str, nn.Module], names: list[str]) -> None:
    """Raise :class:`UnsupportedLayerError` for a name that is not a decomposable layer."""
    for name in names:
        if not is_matmul_layer(modules.get(name, nn.Identity())):
            kind = type(modules[name]).__name__ if name in modules else "missing"
            raise UnsupportedLayerError(
                f"layer {name!r} ({kind}) cannot be decomposed: only nn.Linear and ungrouped, "
                "zero-padded nn.Conv1d/Conv2d are",
                name,
            )


def _positions(out: torch.Tensor, module: nn.Module) -> int:
    """Calibration columns one batch gives a layer (one per sample and output position)."""
    return out.numel() // out.shape[-1 if isinstance(module, nn.Linear) else 1]


def _run(model: nn.Module, calibration, modules, hooks: Mapping[str, object]) -> None:
    """One pass of ``calibration`` through ``model`` in eval mode with forward hooks on named layers."""
    handles = [modules[n].register_forward_hook(h) for n, h in hooks.items()]
    saved = to_eval(model)
    seen = 0
    try:
        for i, x in enumerate(_batches(calibration)):
            _check_batch(x, i)
            seen += 1
            try:
                model(x)
            except RuntimeError as exc:
                raise CalibrationShapeError(
                    f"calibration batch {i} of shape {tuple(x.shape)} does not fit the model: {exc}"
                ) from exc
    finally:
        for h in handles:
            h.remove()
        saved.restore()
    if not seen:
        raise CalibrationShapeError("the calibration data holds no batch")


def _column_picks(model, calibration, modules, names, max_columns, seed) -> dict[str, torch.Tensor | None]:
    """Which calibration columns each layer keeps (None: all), as :func:`collect` always drew them.

    One counting pass, then one ``randperm`` per layer with more than ``max_columns`` columns, in
    layer order from one generator seeded with ``seed``.
    """
    counts = dict.fromkeys(names, 0)

    def count(name):
        def hook(module, args, out):
            counts[name] += _positions(out, module)

        return hook

    _run(model, calibration, modules, {n: count(n) for n in names})
    generator = torch.Generator().manual_seed(seed)
    return {
        n: torch.randperm(c, generator=generator)[:max_columns] if c > max_columns else None
        for n, c in counts.items()
    }


class _Gather:
    """A forward hook keeping only the picked columns of a layer's unfolded inputs, chunk by chunk."""

    def __init__(self, pick: torch.Tensor | None):
        self.order = None if pick is None else torch.argsort(pick)
        self.wanted = None if pick is None else pick[self.order]
        self.offset, self.parts = 0, []

    def __call__(self, module, args, out):
        x = args[0].detach()
        per_sample = _positions(out, module) // max(x.shape[0], 1)
        fan_in = math.prod(module.weight.shape[1:])
        chunk = max(1, _UNFOLD_BYTES // max(4 * fan_in * per_sample, 1))
        for i in range(0, x.shape[0], chunk):
            rows = input_rows(module, x[i : i + chunk])
            start, self.offset = self.offset, self.offset + len(rows)
            if self.wanted is not None:
                lo, hi = torch.searchsorted(self.wanted, torch.tensor([start, self.offset]))
                rows = rows[self.wanted[lo:hi] - start]
            self.parts.append(rows.to(torch.float64).T)

    def columns(self) -> torch.Tensor:
        cols = torch.cat(self.parts, dim=1)
        return cols if self.order is None else cols[:, torch.argsort(self.order)]


def _layer_data(name: str, module: nn.Module, cols: torch.Tensor, follower) -> LayerData:
    w = weight_matrix(module)
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros(w.shape[0])
    scale, shift = _affine(follower[0], w.shape[0])
    return LayerData(name, w, bias.double(), cols, scale, shift, follower[1])


def collect_each(
    model: nn.Module,
    calibration,
    names: list[str],
    *,
    max_columns: int = 2048,
    seed: int = 0,
    group_bytes: int | None = None,
) -> Iterator[LayerData]:
    """:func:`collect`, one layer at a time, holding only a few layers' columns at once.

    Layers are gathered in consecutive groups whose kept columns take at most ``group_bytes``
    (default :data:`GROUP_BYTES`), one pass over ``calibration`` per group, after one counting pass.
    Each yielded :class:`LayerData` equals :func:`collect`'s for the same arguments.
    """
    modules = dict(model.named_modules())
    check_layers(modules, names)
    picks = _column_picks(model, calibration, modules, names, max_columns, seed)
    followers = _followers(model, names)
    budget = GROUP_BYTES if group_bytes is None else group_bytes
    groups: list[list[str]] = []
    held = budget + 1
    for name in names:
        size = 8 * math.prod(modules[name].weight.shape[1:]) * max_columns
        if held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    for group in groups:
        gathers = {n: _Gather(picks[n]) for n in group}
        with torch.no_grad():
            _run(model, calibration, modules, gathers)
        for name in group:
            cols = gathers.pop(name).columns()
            yield _layer_data(name, modules[name], cols, followers[name])


def collect(
    model: nn.Module,
    calibration,
    names: list[str],
    *,
    max_columns: int = 2048,
    seed: int = 0,
) -> dict[str, LayerData]:
    """Run ``calibration`` through ``model`` (not modified) and build each named layer's problem.

    Two passes: one counts each layer's columns and draws which to keep, the other keeps only
    those (so at most ``max_columns`` columns per layer are ever held, plus one chunk of a batch).

    Parameters
    ----------
    model : nn.Module
    calibration : Tensor or iterable of batches
        Inputs ``(batch, *input_shape)``, or a DataLoader yielding them (or ``(inputs, targets)``).
        It is iterated twice.
    names : list of str
        Layers to collect (see :func:`supported_layers`).
    max_columns : int
        Columns kept per layer, sampled without replacement.
    seed : int

    Raises
    ------
    CalibrationShapeError
        A batch is not a float (or token id) tensor of shape ``(batch, *input_shape)`` that
        the model accepts.
    UnsupportedLayerError
        A name is not a supported layer.
    """
    each = collect_each(model, calibration, names, max_columns=max_columns, seed=seed, group_bytes=2**62)
    return {data.name: data for data in each}
