"""Error-compensating rounding (GPTQ): choose integer codes that keep each layer's output close.

Round-to-nearest picks each code on its own. GPTQ (Frantar et al., ICLR 2023, after Optimal Brain
Quantization) rounds the input columns of ``W`` one at a time and spreads each column's rounding
error over the columns not yet rounded, so that ``‖(W − Ŵ) X‖²`` over calibration inputs ``X``
stays small. With ``H = X Xᵀ + λ·mean(diag H)·I`` and ``U`` the upper Cholesky factor of ``H⁻¹``,
column ``j`` is rounded and the rest updated by

    e = (w_j − ŵ_j) / U_jj,      W_{:, j+1:} −= e · U_{j, j+1:}.

Columns are taken in order of decreasing ``diag H`` (the most active inputs first), in blocks of
128: within a block the update runs column by column, and the columns after the block get the
whole block's errors in one matrix product (the paper's lazy batch updates; the same result up to
float64 rounding). The scales and bit widths the quantizer chose stay as they are, so sizes on
disk and the bit plan do not change; only the codes do. The inputs are the float model's own (one
calibration pass for all layers); :mod:`cetopt.quant.sequential` rounds each layer on the
quantized model's inputs instead.

``H`` is accumulated from the layer's inputs unfolded a few samples at a time, never the whole
batch at once, in float64 (blocks of 512 columns or more: each chunk's product in float32, summed
in float64). When ``H`` (float64, ``fan_in²``) would exceed ``max_gram_bytes``, it is kept
block-diagonal over groups of input channels (each group's columns rounded against its own block;
a warning names the layer); when even one input channel per group does not fit, the layer keeps
round-to-nearest, with a warning naming it.

Every layer whose quantization handler gives the rows its weight multiplies is rounded this way
(:mod:`cetopt.quant.handlers`: Linear, HF Conv1D, Conv1d/Conv2d with numeric padding — grouped and
depthwise ones per group —, attention's in- and out-projections; a weight tied to several layers
against the sum of their Grams); others (Embedding, Conv3d, string padding) keep their
round-to-nearest codes.

**Group-wise layers** (a scale per ``g`` input columns, :mod:`cetopt.quant.quantizer`): a group's
scale is recomputed when GPTQ reaches the group's first column, from the group's columns as they
stand then (the earlier columns' errors already spread into them), by the same clip search and
float16 rounding as round-to-nearest; as GPTQ's reference does with ``groupsize``. Groups stay
contiguous runs of the original columns, so with act-order (columns in decreasing ``diag H``,
``act_order=True``) a group's scale is fixed on first touch of any of its columns and its later
columns use it; no permutation index is stored. Columns of a group not yet reached at that moment
that lie beyond the current lazy block get the block's pending update first, so the scale sees
exactly the weights the column-by-column algorithm would.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.nn.unfold import input_rows
from cetopt.quant._calibration import paired_layers, run_with_hooks
from cetopt.quant.quantizer import codes_for, half_step, row_scales

__all__ = ["GRAM_BYTES", "GramBlocks", "gptq_round"]

GRAM_BYTES = 1 << 30  # default bound on one layer's Gram matrices
_ROW_CHUNK_ELEMENTS = 1 << 22  # unfolded input values materialised at a time
_BLOCK = 128  # columns per lazy batch update
_FLOAT32_COLUMNS = 512  # Gram blocks this wide accumulate float32 chunk products


@dataclass
class GramBlocks:
    """A layer's input Gram matrix, whole (one block) or block-diagonal over input-channel groups.

    ``blocks[i]`` is ``Σ rows[:, a:b]ᵀ rows[:, a:b]`` (float64) for ``(a, b) = spans[i]``.
    """

    spans: list[tuple[int, int]]
    blocks: list[torch.Tensor]
    rows: int = 0

    def add(self, rows: torch.Tensor) -> None:
        self.rows += rows.shape[0]
        for i, (a, b) in enumerate(self.spans):
            # Wide blocks: each chunk's product in float32 (twice as fast; a few thousand rows
            # keep its relative error near 1e-6), summed in float64.
            part = rows[:, a:b] if b - a >= _FLOAT32_COLUMNS else rows[:, a:b].double()
            self.blocks[i] += (part.T @ part).double()


def gram_spans(layer: nn.Module, max_bytes: int) -> list[tuple[int, int]] | None:
    """Column spans of ``layer``'s Gram blocks within ``max_bytes`` (float64), or ``None`` if none fit.

    One span when the whole Gram fits; otherwise contiguous groups of input channels (a
    convolution's columns are channel-major: each channel's kernel taps together).
    """
    fan_in = layer.weight[0].numel()
    if 8 * fan_in**2 <= max_bytes:
        return [(0, fan_in)]
    taps = fan_in // layer.weight.shape[1]  # 1 for a Linear
    channels = layer.weight.shape[1]
    per_group = int(max_bytes // (8 * fan_in * taps))  # channels per group: Σ blocks = fan_in · group cols
    if per_group < 1:
        return None
    groups = math.ceil(channels / per_group)
    bounds = [round(i * channels / groups) * taps for i in range(groups + 1)]
    return list(itertools.pairwise(bounds))


def accumulate_rows(gram: GramBlocks, shaped: nn.Module, x: torch.Tensor) -> None:
    """Add the rows of input ``x`` (unfolded for a convolution) to ``gram``, a few samples at a time."""
    if isinstance(shaped, nn.Linear):
        x = x.reshape(-1, x.shape[-1])
        per_sample = x.shape[-1]
    else:
        per_sample = input_rows(shaped, x[:1]).numel()
    step = max(1, _ROW_CHUNK_ELEMENTS // max(per_sample, 1))
    for start in range(0, len(x), step):
        gram.add(input_rows(shaped, x[start : start + step]))


@torch.no_grad()
def input_gram(
    model: nn.Module,
    names: list[str],
    data,
    max_batches: int | None,
    geometry: dict | None = None,
    *,
    max_gram_bytes: int = GRAM_BYTES,
) -> dict:
    """``Σ rows·rowsᵀ`` of each named layer's inputs over ``data``, in float64.

    ``geometry[name]`` is the float layer whose shape unfolds the inputs (needed when ``model``'s
    layer is a quantized one); by default the hooked layer itself. Each value is a
    :class:`GramBlocks`; a layer whose Gram blocks cannot fit ``max_gram_bytes`` is left out.
    """
    modules = dict(model.named_modules())
    grams: dict[str, GramBlocks] = {}
    for name in names:
        shaped = modules[name] if geometry is None else geometry[name]
        spans = gram_spans(shaped, max_gram_bytes)
        if spans is not None:
            blocks = [torch.zeros(b - a, b - a, dtype=torch.float64) for a, b in spans]
            grams[name] = GramBlocks(spans, blocks)

    def hook(name):
        shaped = modules[name] if geometry is None else geometry[name]

        def accumulate(module, args, output):
            accumulate_rows(grams[name], shaped, args[0].detach())

        return accumulate

    run_with_hooks(model, {n: hook(n) for n in grams}, data, max_batches)
    return grams


def inverse_upper_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``h⁻¹`` (``UᵀU = h⁻¹``) without forming ``h⁻¹``.

    With ``J`` the reversal permutation and ``J h J = L Lᵀ``, ``U = J L⁻¹ J``: one Cholesky and
    one triangular inverse (about a third of the work of inverting ``h`` and factoring again).
    """
    lower = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class GroupScales:
    """The scales of a group-wise layer while GPTQ recomputes them: ``scale`` (out, groups), float64.

    ``fixed[k]``: group ``k``'s scale has been set from the partly rounded weights; ``bits`` are the
    output channels' widths. Shared by the Gram blocks of one layer.
    """

    scale: torch.Tensor
    group_size: int
    bits: torch.Tensor
    fixed: torch.Tensor
    clip_search: bool = True

    def refit(self, k: int, values: torch.Tensor) -> None:
        """Set group ``k``'s scale from its current (unrounded) columns ``values``, shape (out, m)."""
        step = row_scales(values, self.bits, clip_search=self.clip_search)
        self.scale[:, k] = half_step(step.to(torch.float32)).double()[:, 0]
        self.fixed[k] = True


def _round_columns(
    weight: torch.Tensor,
    gram: torch.Tensor,
    scale: torch.Tensor,
    qmax: torch.Tensor,
    damp: float,
    block: int = _BLOCK,
    *,
    groups: GroupScales | None = None,
    offset: int = 0,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ codes for ``weight`` (out, n) given the input Gram matrix (n, n).

    ``scale`` (out,) holds per-channel steps; with ``groups`` the steps are per group of the
    layer's columns instead (``offset``: this block's first column in the layer), each recomputed
    on first touch. ``act_order``: columns in decreasing ``diag H``, else in their own order.
    """
    w = weight.clone()
    h = gram.clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights never matter
    w[:, dead] = 0
    h[dead, dead] = 1
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True)
    else:
        order = torch.arange(h.shape[0])
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    upper = inverse_upper_cholesky(h)
    del h
    # Column j of W is row j of Wᵀ: contiguous, which the column-by-column loop needs to be fast.
    wt = w.T.contiguous()
    codes = torch.empty_like(wt)
    if groups is not None:
        group_of = ((order + offset) // groups.group_size).tolist()  # group of each position
        members: dict[int, list[int]] = {}
        for position, k in enumerate(group_of):
            members.setdefault(k, []).append(position)
    for start in range(0, wt.shape[0], block):
        stop = min(start + block, wt.shape[0])
        part, errors = wt[start:stop], torch.empty(stop - start, wt.shape[1], dtype=w.dtype)
        with _one_thread():  # a few hundred values per op: extra threads only spin
            for j in range(stop - start):
                col = start + j
                if groups is None:
                    step = scale
                else:
                    k = group_of[col]
                    if not bool(groups.fixed[k]):
                        groups.refit(k, _current_columns(wt, part, errors, upper, start, stop, j, members[k]))
                    step = groups.scale[:, k]
                codes[col] = codes_for(part[j], step, qmax)
                errors[j] = (part[j] - codes[col] * step) / upper[col, col]
                part[j + 1 :] -= upper[col, col + 1 : stop, None] * errors[j][None, :]
        wt[stop:] -= upper[start:stop, stop:].T @ errors
    codes = codes.T
    return codes[:, torch.argsort(order)]


def _current_columns(wt, part, errors, upper, start, stop, j, positions) -> torch.Tensor:
    """The columns at ``positions`` (none rounded yet) as the column-by-column algorithm has them
    when column ``start + j`` is reached, shape (out, len(positions)): those in the current block
    from ``part``, later ones with the block's pending update ``Σ_{i<j} U[start+i, p]·errors[i]``."""
    inside = [p for p in positions if p < stop]
    beyond = [p for p in positions if p >= stop]
    rows = [part[torch.tensor(inside) - start]] if inside else []
    if beyond:
        index = torch.tensor(beyond)
        pending = upper[start : start + j][:, index].T @ errors[:j] if j else 0
        rows.append(wt[index] - pending)
    return torch.cat(rows).T.contiguous()


@in_eval_mode("original", "quantized")
def gptq_round(
    original: nn.Module,
    quantized: nn.Module,
    data,
    *,
    damp: float = 0.01,
    max_batches: int | None = None,
    max_gram_bytes: int = GRAM_BYTES,
    act_order: bool = True,
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
    max_gram_bytes : int
        Memory bound of one layer's float64 Gram matrix; above it the Gram is block-diagonal over
        input-channel groups, or (if even that does not fit) the layer keeps round-to-nearest.
        Either way a warning names the layer.
    act_order : bool
        Round the columns in decreasing order of their input energy ``diag H`` (GPTQ's act-order);
        ``False``: in their own order. Group-wise layers keep contiguous groups either way.

    Returns
    -------
    nn.Module
        The re-rounded copy.
    """
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    from cetopt.quant._sites import Accumulator, pairs

    layers = paired_layers(original, quantized)
    rounded = copy.deepcopy(quantized)
    accumulators = [Accumulator(p, True, False, max_gram_bytes) for p in pairs(original, rounded, layers)]
    if not accumulators:
        return rounded
    hooks = [hook for acc in accumulators for hook in acc.hooks()]
    with torch.no_grad():
        run_with_hooks(original, {}, data, max_batches, call_hooks=hooks)
    for acc in accumulators:
        acc.reround(damp, act_order=act_order)
    return rounded


def warn_round_to_nearest(name: str, layer: nn.Module, max_bytes: int) -> None:
    """Warn that GPTQ leaves layer ``name`` at round-to-nearest: no Gram block fits ``max_bytes``."""
    fan_in = layer.weight[0].numel()
    warnings.warn(
        f"GPTQ keeps round-to-nearest on layer {name!r}: even one input channel's Gram block "
        f"({fan_in} columns) exceeds max_gram_bytes={max_bytes}",
        stacklevel=3,
    )


@torch.no_grad()
def reround(
    layer: nn.Module,
    weight: torch.Tensor,
    gram,
    damp: float,
    *,
    name: str = "",
    act_order: bool = True,
    clip_search: bool = True,
) -> None:
    """Replace ``layer``'s codes (in place) by GPTQ's for the float ``weight`` and input ``gram``.

    ``gram`` is a tensor (the whole Gram matrix) or :class:`GramBlocks`; blocks that saw no input
    (the layer never ran) leave the codes as they are. A group-wise layer's scales are recomputed
    group by group as GPTQ reaches them (``clip_search`` as in the quantizer).
    """
    if isinstance(gram, torch.Tensor):
        gram = GramBlocks([(0, gram.shape[0])], [gram], rows=1)
    if gram.rows == 0:
        return
    if len(gram.spans) > 1:
        warnings.warn(
            f"GPTQ on layer {name or type(layer).__name__!r}: its {gram.spans[-1][1]}-column Gram matrix "
            f"exceeds the memory bound; rounding {len(gram.spans)} groups of input channels, each "
            "against its own block",
            stacklevel=3,
        )
    shape = layer.weight_q.shape
    qmax = 2.0 ** (layer.weight_bits.double() - 1) - 1
    scale = layer.weight_scale.double()
    target = weight.detach().double().reshape(shape[0], -1)
    codes = torch.empty_like(target)
    groups = None
    if getattr(layer, "weight_group", None) is not None:
        groups = GroupScales(
            scale.clone(),
            layer.weight_group,
            layer.weight_bits.to(torch.int64),
            torch.zeros(scale.shape[1], dtype=torch.bool),
            clip_search,
        )
    for (a, b), block in zip(gram.spans, gram.blocks):
        codes[:, a:b] = _round_columns(
            target[:, a:b], block, scale, qmax, damp, groups=groups, offset=a, act_order=act_order
        )
    layer.weight_q = codes.reshape(shape).to(layer.weight_q.dtype)
    if groups is not None:
        layer.weight_scale = groups.scale.to(torch.float32)
