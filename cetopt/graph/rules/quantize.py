"""Quantize: swap a layer for its integer-weight counterpart (a leaf swap; no graph needed).

The layer type's quantization handler (:mod:`cetopt.quant.handlers`) builds the counterpart. A
weight shared by several modules (a tied LM head and token embedding) is quantized once: every
module holding it gets a counterpart whose code, scale and bit-width buffers are the same tensors.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from cetopt.graph.decisions import Quantize
from cetopt.graph.rules.base import RewriteRule, RewriteState
from cetopt.quant.handlers import handler_for, registered_quant_types
from cetopt.quant.quantizer import (
    QuantizedWeight,
    _check_bits,
    check_group_size,
    num_groups,
    quantize_weight,
    storage_dtype,
)

__all__ = ["QuantizeRule", "skeleton_quantization"]

_SKELETON = contextvars.ContextVar("cetopt_skeleton_quantization", default=False)


@contextlib.contextmanager
def skeleton_quantization():
    """Within this block Quantize builds layers of the right shapes and bit widths with zero codes and
    unit scales, without quantizing anything: for :func:`cetopt.load`, which fills them from the file."""
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def _codes(weight: torch.Tensor, bits, clip_search: bool, group_size: int | None = None) -> QuantizedWeight:
    if not _SKELETON.get():
        return quantize_weight(weight, bits, clip_search=clip_search, group_size=group_size)
    b = _check_bits(bits, weight.shape[0]).to(torch.int16)
    max_bits = int(b.max()) if b.numel() else 2
    q = torch.zeros(weight.shape, dtype=storage_dtype(max_bits))
    group = check_group_size(group_size)
    if group is None:
        scale = torch.ones(weight.shape[0])
    else:
        scale = torch.ones(weight.shape[0], num_groups(weight[0].numel(), group))
    return QuantizedWeight(q, scale, b, group)


class QuantizeRule(RewriteRule):
    """Carry out :class:`Quantize`."""

    decision_type = Quantize
    needs_graph = False

    def check(self, state: RewriteState, d: Quantize) -> str | None:
        module = state.module(d.layer)
        handler = handler_for(module)
        if handler is None:
            return (
                f"{d.layer!r} is a {type(module).__name__}, which has no quantization handler "
                f"(handled: {', '.join(registered_quant_types())}; "
                "cetopt.quant.handlers.register_quant_handler adds one)"
            )
        reason = handler.unsupported(module)
        if reason is not None:
            return f"{d.layer!r} ({type(module).__name__}) cannot be quantized: {reason}"
        try:
            check_group_size(d.group_size)
        except ValueError as exc:
            return f"{d.layer!r}: {exc}"
        return None

    def apply(self, state: RewriteState, d: Quantize) -> None:
        module = state.module(d.layer)
        handler = handler_for(module)
        weight = handler.weight(module)
        tied = [
            (name, m, h)
            for name, m in state.model.named_modules()
            if name != d.layer and (h := handler_for(m)) is not None and getattr(m, h.param, None) is weight
        ]
        with torch.no_grad():
            qw = _codes(handler.codes_layout(module).detach(), d.bits, d.clip_search, d.group_size)
        owner = handler.quantized(module, qw, add_bias=d.add_bias)
        state.set_module(d.layer, owner)
        _keep_shared_bias(state.model, module, owner)
        for name, m, h in tied:
            if tuple(h.codes_layout(m).shape) != tuple(qw.q.shape):
                raise ValueError(
                    f"{name!r} shares its weight with {d.layer!r} in another layout; cannot quantize it once"
                )
            new = h.quantized(m, qw, add_bias=d.add_bias)
            new.weight_q, new.weight_scale, new.weight_bits = (
                owner.weight_q,
                owner.weight_scale,
                owner.weight_bits,
            )
            state.set_module(name, new)
            _keep_shared_bias(state.model, m, new)


def _keep_shared_bias(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the float layer's own bias Parameter where another module of ``model`` holds
    it too (BERT's LM-head bias is ``cls.predictions.bias``): the counterpart's copy would break
    the tie, and the file would store the bias twice."""
    bias = getattr(old, "bias", None)
    if not isinstance(bias, nn.Parameter) or not isinstance(getattr(new, "bias", None), nn.Parameter):
        return
    if bias.dtype != torch.float32 or bias.shape != new.bias.shape:
        return
    if any(p is bias for m in model.modules() for p in m._parameters.values()):
        with torch.no_grad():
            bias.copy_(new.bias)
        new.bias = bias
