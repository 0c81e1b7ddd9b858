"""Error-compensating rounding (GPTQ): choose integer codes that keep each layer's output close.

Round-to-nearest picks each code on its own. GPTQ (Frantar et al., ICLR 2023, after Optimal Brain
Quantization) rounds the input columns of ``W`` one at a time and spreads each column's rounding
error over the columns not yet rounded, so that ``‖(W − Ŵ) X‖²`` over calibration inputs ``X``
stays small. With ``H = X Xᵀ + λ·mean(diag H)·I`` and ``U`` the upper Cholesky factor of ``H⁻¹``,
column ``j`` is rounded and the rest updated by

    e = (w_j − ŵ_j) / U_jj,      W_{:, j+1:} −= e · U_{j, j+1:}.

Columns are taken in order of decreasing ``diag H`` (the most active inputs first). The scales and
bit widths the quantizer chose stay as they are, so sizes on disk and the bit plan do not change;
only the codes do. The inputs are the float model's own (one calibration pass for all layers).

Linear layers and Conv1d/Conv2d with ``groups=1`` and numeric padding are rounded this way; other
quantized layers keep their round-to-nearest codes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cetopt.errors import CetoptError, DataShapeError
from cetopt.nn.quantized import QuantizedMixin

__all__ = ["gptq_round"]


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, (nn.Conv1d, nn.Conv2d))
        and layer.groups == 1
        and not isinstance(layer.padding, str)
        and layer.padding_mode == "zeros"
    )


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of ``X``ᵀ the layer multiplies by ``W`` flattened to (out, in·kernel)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation = (1, layer.kernel_size[0]), (1, layer.dilation[0])
        padding, stride = (0, layer.padding[0]), (1, layer.stride[0])
    else:
        kernel, dilation, padding, stride = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@torch.no_grad()
def _input_gram(original: nn.Module, names: list[str], data, max_batches: int | None) -> dict:
    modules = dict(original.named_modules())
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, args, output):
            cols = _columns(module, args[0].detach()).double()
            grams[name] = grams.get(name, 0) + cols.T @ cols

        return accumulate

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = original.training
    original.eval()
    try:
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            original(_inputs(batch))
    except (RuntimeError, ValueError) as exc:
        raise DataShapeError(f"the model cannot run on the calibration data: {exc}") from exc
    finally:
        original.train(was_training)
        for h in handles:
            h.remove()
    if not grams:
        raise DataShapeError("calibration data yielded no batches")
    return grams


def _round_columns(
    weight: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, qmax: torch.Tensor, damp: float
) -> torch.Tensor:
    """GPTQ codes for ``weight`` (out, n) given the input Gram matrix (n, n)."""
    w = weight.clone()
    h = gram.clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights never matter
    w[:, dead] = 0
    h[dead, dead] = 1
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        codes[:, j] = torch.clamp(torch.round(w[:, j] / scale), -qmax, qmax)
        err = (w[:, j] - codes[:, j] * scale) / upper[j, j]
        w[:, j + 1 :] -= err[:, None] * upper[j, j + 1 :][None, :]
    return codes[:, torch.argsort(order)]


def gptq_round(
    original: nn.Module,
    quantized: nn.Module,
    data,
    *,
    damp: float = 0.01,
    max_batches: int | None = None,
) -> nn.Module:
    """A copy of ``quantized`` whose codes are re-rounded by GPTQ on calibration data.

    Parameters
    ----------
    original : nn.Module
        The float model ``quantized`` was made from (same layer names). Not modified.
    quantized : nn.Module
        From :func:`cetopt.quantize`. Not modified; scales and bit widths are kept.
    data : iterable
        Calibration batches: ``(inputs, targets)`` pairs or input tensors.
    damp : float
        Diagonal damping of the input Gram matrix, relative to its mean diagonal.
    max_batches : int, optional
        Use only the first batches.

    Returns
    -------
    nn.Module
        The re-rounded copy.
    """
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    floats = dict(original.named_modules())
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantizedMixin)}
    absent = [n for n in layers if n not in floats]
    if absent:
        raise CetoptError(f"the original model has no layers named {absent}")
    names = [n for n in layers if _supported(floats[n])]
    rounded = copy.deepcopy(quantized)
    if not names:
        return rounded
    grams = _input_gram(original, names, data, max_batches)
    modules = dict(rounded.named_modules())
    for name in names:
        layer = modules[name]
        shape = layer.weight_q.shape
        weight = floats[name].weight.detach().double().reshape(shape[0], -1)
        qmax = 2.0 ** (layer.weight_bits.double() - 1) - 1
        codes = _round_columns(weight, grams[name], layer.weight_scale.double(), qmax, damp)
        layer.weight_q = codes.reshape(shape).to(layer.weight_q.dtype)
    return rounded
