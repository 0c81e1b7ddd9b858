"""Calibration through the quantization handlers: what each quantized weight multiplies.

GPTQ and bias correction need, per quantized weight, the rows its ``(out, in)`` matrix multiplies
(:meth:`cetopt.quant.handlers.QuantHandler.input_rows`), taken at the call of the module that reads
the weight. :class:`Accumulator` sums, over those calls, the Gram matrix of the rows (for GPTQ) and
the rows themselves (for bias correction: a matrix product's mean output is the matrix times the
mean row), per span of output rows; nothing else of the inputs is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from cetopt.quant.gptq import GramBlocks, gram_spans, reround, warn_round_to_nearest
from cetopt.quant.handlers import QuantTarget, QuantUse, output_channel_rows, quant_targets

__all__ = ["Accumulator", "Pair", "pairs", "share_codes"]

_ROW_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Pair:
    """A float target and the quantized modules holding its codes (by module name)."""

    target: QuantTarget
    float_modules: dict[str, nn.Module]
    quantized: dict[str, nn.Module]

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def owner(self) -> nn.Module:
        return self.quantized[self.target.name]

    def float_codes(self) -> torch.Tensor:
        """The float weight in the codes layout (output channels first)."""
        module = self.float_modules[self.target.name]
        return self.target.handler.codes_layout(module).detach()


def pairs(original: nn.Module, quantized: nn.Module, names) -> list[Pair]:
    """The targets of ``original`` whose row names are in ``names`` (quantized layers of ``quantized``)."""
    targets, _ = quant_targets(original)
    floats = dict(original.named_modules())
    qmodules = dict(quantized.named_modules())
    wanted = set(names)
    out = []
    for t in targets:
        if t.name in wanted:
            quantized_uses = {u.module: qmodules[u.module] for u in t.uses if u.module in qmodules}
            out.append(Pair(t, {u.module: floats[u.module] for u in t.uses}, quantized_uses))
    return out


def share_codes(pair: Pair) -> None:
    """Point every tied module's code buffers at the owner's (after the owner's were replaced)."""
    owner = pair.owner
    for module in pair.quantized.values():
        if module is not owner:
            module.weight_q, module.weight_scale, module.weight_bits = (
                owner.weight_q,
                owner.weight_scale,
                owner.weight_bits,
            )


@dataclass
class Accumulator:
    """Sums over the calls of one target's users: Gram blocks and row sums per output-row span.

    ``gram``: accumulate Gram matrices (GPTQ); ``sums``: accumulate row sums (bias correction).
    """

    pair: Pair
    gram: bool
    sums: bool
    max_gram_bytes: int
    grams: dict = field(default_factory=dict)
    row_sums: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # use → (Σ output rows, count) where no rows exist
    no_rows: bool = False
    too_big: bool = False

    def hooks(self) -> list[tuple[str, object]]:
        """``(module name, hook)`` pairs for :func:`run_with_hooks`'s ``call_hooks``."""
        return [(use.runs_in, self._hook(use)) for use in self.pair.target.uses]

    def _hook(self, use: QuantUse):
        # The float layer gives the geometry when the hooked layer is the user itself (it may be the
        # quantized layer); a caller that reads the weight (attention) is used as it is.
        geometry = self.pair.float_modules[use.module] if use.runs_in == use.module else None

        def record(module, args, kwargs, output):
            self.add(use, module if geometry is None else geometry, args, kwargs, output)

        return record

    @torch.no_grad()
    def add(self, use: QuantUse, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        rows = use.handler.input_rows(module, args, kwargs)
        if rows is None:
            if use.runs_in == use.module and isinstance(output, torch.Tensor) and args:
                self.no_rows = True
                if self.sums:  # keep what the fallback bias correction needs: the inputs' outputs
                    self.outputs.setdefault(use.module, []).append(args[0].detach())
            return
        for a, b, piece in rows:
            piece = piece.detach()
            if self.gram:
                self._add_gram((a, b), piece)
            if self.sums:
                total, count = self.row_sums.get((a, b), (0, 0))
                self.row_sums[(a, b)] = (total + piece.double().sum(dim=0), count + piece.shape[0])

    def _add_gram(self, span: tuple[int, int], piece: torch.Tensor) -> None:
        gram = self.grams.get(span)
        if gram is None:
            if self.too_big:
                return
            codes = self.pair.float_codes()
            whole = span == (0, codes.shape[0])
            shaped = SimpleNamespace(weight=codes if whole else codes[span[0] : span[1]])
            spans = gram_spans(shaped, self.max_gram_bytes) if whole else [(0, piece.shape[1])]
            if spans is None:
                self.too_big = True
                return
            gram = GramBlocks(spans, [torch.zeros(b - a, b - a, dtype=torch.float64) for a, b in spans])
            self.grams[span] = gram
        step = max(1, _ROW_CHUNK_ELEMENTS // max(piece.shape[1], 1))
        for start in range(0, len(piece), step):
            gram.add(piece[start : start + step])

    def reround(self, damp: float, *, act_order: bool = True) -> bool:
        """GPTQ-round the owner's codes (in place) against the Gram blocks; ``False`` if there were none."""
        pair, owner = self.pair, self.pair.owner
        if self.too_big:
            warn_round_to_nearest(pair.name, SimpleNamespace(weight=pair.float_codes()), self.max_gram_bytes)
            return False
        if not self.grams:
            return False
        codes = pair.float_codes()
        full = (0, codes.shape[0])
        if list(self.grams) == [full]:
            reround(owner, codes, self.grams[full], damp, name=pair.name, act_order=act_order)
        else:
            new = owner.weight_q.clone()
            scales = owner.weight_scale.clone()
            for (a, b), gram in self.grams.items():
                rows = SimpleNamespace(
                    weight_q=owner.weight_q[a:b],
                    weight_scale=owner.weight_scale[a:b],
                    weight_bits=owner.weight_bits[a:b],
                    weight_group=getattr(owner, "weight_group", None),
                )
                reround(rows, codes[a:b], gram, damp, name=pair.name, act_order=act_order)
                new[a:b] = rows.weight_q
                scales[a:b] = rows.weight_scale
            owner.weight_q = new
            owner.weight_scale = scales
        share_codes(pair)
        return True

    def float_means(self) -> torch.Tensor:
        """The float weight's mean output per channel on the recorded rows (bias excluded)."""
        return self._row_sum_means(self.pair.float_codes())

    def float_output_means(self, use_module: str) -> torch.Tensor | None:
        """Mean output per channel (bias excluded) of the float user on what was recorded."""
        if self.row_sums:
            return self.float_means()
        return self._output_means(use_module, None)

    def quantized_output_means(self, use_module: str) -> torch.Tensor | None:
        """Mean output per channel (bias excluded) of the quantized user on what was recorded."""
        quantized = self.pair.quantized[use_module]
        if self.row_sums:
            return self._row_sum_means(quantized.weight)
        return self._output_means(use_module, quantized)

    def _row_sum_means(self, weight: torch.Tensor) -> torch.Tensor:
        """Mean output per channel of ``weight`` (out first) on the recorded input row sums."""
        codes = weight.double().reshape(weight.shape[0], -1)
        total = torch.zeros(codes.shape[0], dtype=torch.float64)
        count = torch.zeros(codes.shape[0], dtype=torch.float64)
        for (a, b), (rows, n) in self.row_sums.items():
            total[a:b] += codes[a:b] @ rows
            count[a:b] += n
        return total / count.clamp(min=1)

    def _output_means(self, use_module: str, module: nn.Module | None) -> torch.Tensor | None:
        """Mean output per channel (bias excluded) of ``module`` (``None``: the float user) on the
        inputs recorded at ``use_module``."""
        if use_module not in self.outputs:
            return None
        float_module = self.pair.float_modules[use_module]
        module = float_module if module is None else module
        total, count = 0, 0
        for x in self.outputs[use_module]:
            rows = output_channel_rows(float_module, _no_bias(module, x).double())
            total, count = total + rows.sum(dim=0), count + rows.shape[0]
        return total / max(count, 1)


def _no_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without its bias (a convolution or Linear-like layer)."""
    bias = getattr(module, "bias", None)
    out = module(x)
    if isinstance(bias, torch.Tensor):
        shape = [1] * out.dim()
        shape[1 if isinstance(module, nn.modules.conv._ConvNd) or hasattr(module, "dims") else -1] = -1
        out = out - bias.view(shape)
    return out


def bias_of(handler, module: nn.Module) -> torch.Tensor | None:
    """The bias tensor of a quantized user (``None`` if it has none)."""
    bias = handler.bias(module)
    return bias if isinstance(bias, torch.Tensor) else None
