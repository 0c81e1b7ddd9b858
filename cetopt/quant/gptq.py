"""Error-compensating rounding (GPTQ): choose integer codes that keep each layer's output close.

Round-to-nearest picks each code on its own. GPTQ (Frantar et al., ICLR 2023, after Optimal Brain
Quantization) rounds the input columns of ``W`` one at a time and spreads each column's rounding
error over the columns not yet rounded, so that ``‖(W − Ŵ) X‖²`` over calibration inputs ``X``
stays small. With ``H = X Xᵀ + λ·mean(diag H)·I`` and ``U`` the upper Cholesky factor of ``H⁻¹``,
column ``j`` is rounded and the rest updated by

    e = (w_j − ŵ_j) / U_jj,      W_{:, j+1:} −= e · U_{j, j+1:}.

Columns are taken in order of decreasing ``diag H`` (the most active inputs first). The scales and
bit widths the quantizer chose stay as they are, so sizes on disk and the bit plan do not change;
only the codes do. The inputs are the float model's own (one calibration pass for all layers);
:mod:`cetopt.quant.sequential` rounds each layer on the quantized model's inputs instead.

Linear layers and Conv1d/Conv2d with ``groups=1`` and numeric padding are rounded this way; other
quantized layers keep their round-to-nearest codes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.nn.unfold import input_rows, is_matmul_layer
from cetopt.quant._calibration import paired_layers, run_with_hooks
from cetopt.quant.quantizer import codes_for

__all__ = ["gptq_round"]


@torch.no_grad()
def input_gram(
    model: nn.Module, names: list[str], data, max_batches: int | None, geometry: dict | None = None
) -> dict:
    """``Σ rows·rowsᵀ`` of each named layer's inputs over ``data``, in float64.

    ``geometry[name]`` is the float layer whose shape unfolds the inputs (needed when ``model``'s
    layer is a quantized one); by default the hooked layer itself.
    """
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, args, output):
            shaped = module if geometry is None else geometry[name]
            cols = input_rows(shaped, args[0].detach()).double()
            grams[name] = grams.get(name, 0) + cols.T @ cols

        return accumulate

    run_with_hooks(model, {n: hook(n) for n in names}, data, max_batches)
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
        codes[:, j] = codes_for(w[:, j], scale, qmax)
        err = (w[:, j] - codes[:, j] * scale) / upper[j, j]
        w[:, j + 1 :] -= err[:, None] * upper[j, j + 1 :][None, :]
    return codes[:, torch.argsort(order)]


@in_eval_mode("original", "quantized")
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
    layers = paired_layers(original, quantized)
    names = [n for n in layers if is_matmul_layer(floats[n])]
    rounded = copy.deepcopy(quantized)
    if not names:
        return rounded
    grams = input_gram(original, names, data, max_batches)
    modules = dict(rounded.named_modules())
    for name in names:
        reround(modules[name], floats[name].weight, grams[name], damp)
    return rounded


@torch.no_grad()
def reround(layer: nn.Module, weight: torch.Tensor, gram: torch.Tensor, damp: float) -> None:
    """Replace ``layer``'s codes (in place) by GPTQ's for the float ``weight`` and input ``gram``."""
    shape = layer.weight_q.shape
    qmax = 2.0 ** (layer.weight_bits.double() - 1) - 1
    target = weight.detach().double().reshape(shape[0], -1)
    codes = _round_columns(target, gram, layer.weight_scale.double(), qmax, damp)
    layer.weight_q = codes.reshape(shape).to(layer.weight_q.dtype)
