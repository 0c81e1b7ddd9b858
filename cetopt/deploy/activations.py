"""Activation quantization: calibrated ranges and the fake-quant that matches the int8 kernels.

An activation quantized at ``b`` bits is affine and unsigned, as torch's quantized CPU kernels
(fbgemm / x86, quint8) and onnxruntime's QLinear kernels define it:
``q = clamp(round(x / scale) + zero_point, 0, 2^b − 1)``, ``x̂ = (q − zero_point) · scale``.
``scale`` and ``zero_point`` come from a range ``[lo, hi]`` widened to contain 0 (so zero is exact)
by the same rule torch uses for its dynamic kernels (``ChooseQuantizationParams``), so a static
range and a dynamic one are quantized identically.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ActivationQuant",
    "ActivationRanges",
    "calibrate_activations",
    "choose_qparams",
    "fake_quantize_dynamic",
]

METHODS = ("minmax", "percentile", "mse")
_SMALL_SCALE = 6.1e-5  # torch's SMALL_SCALE_THRESHOLD
_MAX_SAMPLES = 1 << 18  # values kept per tensor (or per channel) for percentile / MSE


def choose_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int = 8, reduced_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the unsigned ``bits``-bit grid covering ``[min(lo, 0), max(hi, 0)]``.

    Elementwise over per-channel ranges; at 8 bits this equals torch's
    ``_choose_qparams_per_tensor`` (the rule behind ``quantized::linear_dynamic``), also with
    ``reduced_range`` (codes ``0 … 2^(bits−1) − 1``: torch's ``reduce_range``).
    """
    qmax = float(_qmax(bits, reduced_range))
    lo = torch.clamp(lo.double(), max=0.0)
    hi = torch.clamp(hi.double(), min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale.float() > 0, scale, torch.full_like(scale, 0.1))
    scale = torch.clamp(scale, min=_SMALL_SCALE)
    # with qmin = 0 torch's nudge (the end with the smaller rounding error) is the min end
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int64)
    return scale.float(), zp


def _qmax(bits: int, reduced_range: bool) -> int:
    return 2 ** (bits - 1) - 1 if reduced_range else 2**bits - 1


@dataclass(frozen=True)
class ActivationQuant:
    """How one activation tensor is quantized.

    Attributes
    ----------
    scale : Tensor
        Shape ``()`` per tensor, ``(C,)`` per channel.
    zero_point : Tensor of int64, same shape
    bits : int
    axis : int or None
        The channel axis of a per-channel range (1: channels of NC… tensors).
    lo, hi : Tensor
        The calibrated range the grid was chosen from.
    reduced_range : bool
        The codes span ``0 … 2^(bits−1) − 1`` (0 … 127 at 8 bits) instead of ``0 … 2^bits − 1``:
        the input of a layer whose 8-bit weights could saturate the int16 pair sums of the
        uint8 × int8 kernels (``activation_range="reduced"``, see :func:`cetopt.deploy.runtime`).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int = 8
    axis: int | None = None
    lo: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    hi: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    reduced_range: bool = False

    @classmethod
    def from_range(
        cls,
        lo: torch.Tensor,
        hi: torch.Tensor,
        bits: int = 8,
        axis: int | None = None,
        reduced_range: bool = False,
    ):
        """The grid of ``bits`` bits over ``[lo, hi]`` (one bit fewer of codes when ``reduced_range``)."""
        scale, zp = choose_qparams(lo, hi, bits, reduced_range)
        return cls(scale, zp, bits, axis, lo.detach().clone(), hi.detach().clone(), reduced_range)

    def with_range(self, reduced_range: bool) -> ActivationQuant:
        """The same calibrated range on the full or the reduced grid."""
        if reduced_range == self.reduced_range:
            return self
        return ActivationQuant.from_range(self.lo, self.hi, self.bits, self.axis, reduced_range)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def qmax(self) -> int:
        """The largest code: ``2^bits − 1``, or ``2^(bits−1) − 1`` on a reduced range."""
        return _qmax(self.bits, self.reduced_range)

    @property
    def activation_range(self) -> str:
        """``"reduced"`` or ``"full"``."""
        return "reduced" if self.reduced_range else "full"

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized and dequantized on this grid (float in, float out)."""
        qmax = self.qmax
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), 0, qmax)
        return torch.fake_quantize_per_channel_affine(
            x, self.scale, self.zero_point.to(torch.int32), self.axis, 0, qmax
        )

    def to_dict(self) -> dict:
        """Plain JSON."""
        return {
            "bits": self.bits,
            "axis": self.axis,
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "activation_range": self.activation_range,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ActivationQuant:
        """Inverse of :meth:`to_dict`."""
        reduced = d.get("activation_range", "full") == "reduced"
        return cls.from_range(
            torch.tensor(d["lo"]), torch.tensor(d["hi"]), int(d["bits"]), d["axis"], reduced
        )


def fake_quantize_dynamic(x: torch.Tensor, reduced_range: bool = False) -> torch.Tensor:
    """8-bit per-tensor fake-quant on ``x``'s own range: what the dynamic int8 kernels do.

    With ``reduced_range`` the codes span 0 … 127 (``linear_dynamic(..., reduce_range=True)``).
    """
    scale, zp = torch._choose_qparams_per_tensor(x.detach(), reduced_range)
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 127 if reduced_range else 255)


@dataclass
class ActivationRanges:
    """Calibrated activation grids per layer: the input of each quantized layer, and its output.

    Attributes
    ----------
    inputs, outputs : dict of str to ActivationQuant
        Keyed by layer name (and by the name of each :class:`cetopt.deploy.grids.TensorQuant`
        after a residual add); a layer missing from ``inputs`` keeps float activations.
    method : str
    activation_range : dict of str to str
        Empty as calibrated. Once resolved (the ``.activation_ranges`` of a model from
        :func:`cetopt.runtime` in ``int8`` / ``fake-int8``, or ``ExportedOnnx.activation_ranges``):
        each quantized layer's input range, ``"reduced"`` (codes 0 … 127) or ``"full"``, which
        ``runtime`` and ``export_onnx`` reuse with ``activation_range="auto"``, so ranges saved with
        :meth:`to_dict` and read back reproduce the same model and the same ONNX graph.
    shared_grids : bool or None
        None as calibrated; once resolved, whether the grids are shared along edges
        (:mod:`cetopt.deploy.grids`).
    """

    inputs: dict[str, ActivationQuant]
    outputs: dict[str, ActivationQuant]
    method: str = "minmax"
    activation_range: dict[str, str] = field(default_factory=dict)
    shared_grids: bool | None = None

    @property
    def resolved(self) -> bool:
        """True once the per-layer ranges and the shared grids were chosen (see the attributes)."""
        return self.shared_grids is not None

    def to_dict(self) -> dict:
        """Plain JSON (``from_dict`` reads it back), with the per-layer range choice once resolved."""
        out = {
            "method": self.method,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }
        if self.resolved:
            out["activation_range"] = dict(self.activation_range)
            out["shared_grids"] = self.shared_grids
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> ActivationRanges:
        """Inverse of :meth:`to_dict`."""
        return cls(
            {k: ActivationQuant.from_dict(v) for k, v in d["inputs"].items()},
            {k: ActivationQuant.from_dict(v) for k, v in d["outputs"].items()},
            d.get("method", "minmax"),
            dict(d.get("activation_range", {})),
            d.get("shared_grids"),
        )


class _Collector:
    """Running min/max and a bounded sample of one tensor stream, per tensor or per channel."""

    def __init__(self, per_channel: bool, keep_samples: bool, generator: torch.Generator, last_axis: bool):
        self.per_channel, self.keep_samples, self.generator = per_channel, keep_samples, generator
        self.last_axis = last_axis  # a Linear's features are its last axis, a convolution's axis 1
        self.axis = None
        self.lo = self.hi = None
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.axis = x.dim() - 1 if self.last_axis else 1
        flat = (
            x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1) if self.per_channel else x.reshape(1, -1)
        )
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.keep_samples and self.kept < _MAX_SAMPLES:
            take = min(flat.shape[1], _MAX_SAMPLES - self.kept)
            idx = torch.randperm(flat.shape[1], generator=self.generator)[:take]
            self.samples.append(flat[:, idx])
            self.kept += take

    def grid(self, method: str, bits: int, percentile: float) -> ActivationQuant:
        axis = self.axis if self.per_channel else None
        lo, hi = self.lo, self.hi
        if method == "percentile":
            s = torch.cat(self.samples, dim=1)
            lo = torch.quantile(s, 1 - percentile / 100, dim=1)
            hi = torch.quantile(s, percentile / 100, dim=1)
        elif method == "mse":
            lo, hi = _mse_range(torch.cat(self.samples, dim=1), lo, hi, bits)
        if not self.per_channel:
            lo, hi = lo[0], hi[0]
        return ActivationQuant.from_range(lo, hi, bits, axis)


def _mse_range(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Per row, the shrink of ``[lo, hi]`` (a common factor on both ends) with the least squared error."""
    best_err = torch.full((s.shape[0],), float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    qmax = 2**bits - 1
    for ratio in torch.linspace(0.2, 1.0, 41):
        scale, zp = choose_qparams(lo * ratio, hi * ratio, bits)
        q = torch.clamp(torch.round(s / scale[:, None]) + zp[:, None], 0, qmax)
        err = ((q - zp[:, None]) * scale[:, None] - s).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * ratio, best_lo)
        best_hi = torch.where(better, hi * ratio, best_hi)
    return best_lo, best_hi


def _batches(data: Iterable) -> Iterable[tuple]:
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield (batch,)
        elif isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
            yield (batch[0],)  # (inputs, targets)
        else:
            yield tuple(batch)


@torch.no_grad()
def calibrate_activations(
    model: nn.Module,
    data: Iterable,
    *,
    layers: Iterable[str] | None = None,
    method: str = "minmax",
    bits: int | Mapping[str, int] = 8,
    per_channel: bool = False,
    percentile: float = 99.99,
    seed: int = 0,
) -> ActivationRanges:
    """Calibrate the input and output range of each quantized layer on ``data``.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode; not modified. A model with quantized layers is calibrated as the int8
        modes and the ONNX export run it: :func:`cetopt.deploy.deployment_model` of it (BatchNorms
        folded), so the output ranges are those after each BatchNorm.
    data : iterable
        Batches: tensors, ``(inputs, targets)`` pairs, or tuples of model inputs.
    layers : iterable of str, optional
        Layers to calibrate; default every quantized layer (:class:`cetopt.nn.QuantizedMixin`)
        and every layer :func:`deployment_model` produced from one.
    method : {"minmax", "percentile", "mse"}
        The range: the extremes seen, the ``percentile`` / ``100 − percentile`` percentiles, or the
        shrink of the min-max range with the least squared quantization error on the samples.
    bits : int or dict of str to int
        Activation bits, for all layers or per layer; 32 (or a layer left out of the dict) keeps
        that layer's activations in float.
    per_channel : bool
        One range per channel (a convolution's axis 1, a Linear's last axis). Only the fake-quant
        simulation runs it: torch's and onnxruntime's int8 kernels take one activation scale per
        tensor.
    percentile : float
    seed : int
        Seed of the sample kept for percentile / MSE.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    from cetopt.deploy.runtime import deployment_model
    from cetopt.nn.quantized import QuantizedMixin

    if any(isinstance(m, QuantizedMixin) for m in model.modules()):
        model = deployment_model(model)
    names = list(layers) if layers is not None else quantizable_layers(model)
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    keep = method != "minmax"
    linear = {n: isinstance(modules[n], nn.Linear) or hasattr(modules[n], "in_features") for n in names}
    collect_in = {n: _Collector(per_channel, keep, generator, linear[n]) for n in names}
    collect_out = {n: _Collector(per_channel, keep, generator, linear[n]) for n in names}
    hooks = []
    for n in names:
        hooks.append(modules[n].register_forward_pre_hook(lambda m, a, n=n: collect_in[n].add(a[0])))
        hooks.append(modules[n].register_forward_hook(lambda m, a, out, n=n: collect_out[n].add(out)))
    was_training = model.training
    model.eval()
    try:
        for inputs in _batches(data):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    inputs, outputs = {}, {}
    for n in names:
        b = bits.get(n, 32) if isinstance(bits, Mapping) else bits
        if collect_in[n].lo is None:
            raise ValueError(f"layer {n!r} never ran on the calibration data")
        if b >= 32:
            continue
        inputs[n] = collect_in[n].grid(method, b, percentile)
        outputs[n] = collect_out[n].grid(method, 8, percentile)
    return ActivationRanges(inputs, outputs, method)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose activations the deployment modes quantize."""
    from cetopt.deploy.grids import TensorQuant
    from cetopt.deploy.runtime import is_deploy_layer

    return [n for n, m in model.named_modules() if is_deploy_layer(m) or isinstance(m, TensorQuant)]
