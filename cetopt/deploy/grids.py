"""One grid per tensor edge: the quantization layout onnxruntime fuses into int8 operators.

The ``int8`` definition quantizes each layer's input and output on calibrated grids. Calibrated
independently, a layer's output grid and its consumer's input grid differ, so every edge between
two layers is a requantization (``DequantizeLinear`` → float ops → ``QuantizeLinear``) that
onnxruntime runs in float, and a residual ``Add`` sums a dequantized tensor with a float one. Here
the grids are chosen so that the int8 operators chain:

* **Shared grids.** A *producer* (a quantized layer, or a :class:`TensorQuant` after a residual
  ``Add``) whose output reaches quantized layers only through ops that map grid values to grid
  values (ReLU, ReLU6, max-pooling, flatten / reshape, dropout, identity) gets one grid for that
  edge: the union of the consumers' calibrated input ranges (and of its own range, passed through
  the ReLU clamps on the way, where a non-layer op also reads it), on the reduced range when any
  consumer needs it. The producer's output and its consumers' inputs are then quantized on the
  same grid: re-quantizing a grid value on its own grid returns it, so nothing requantizes. A
  ReLU after a grid with zero point 0 changes nothing, and the export drops it (onnxruntime
  would otherwise run it in float); a ReLU6 likewise when it maps every code to itself.
* **Activations before other ops.** A producer read only by non-layer ops, all through the same
  ReLU / ReLU6 (a last convolution before global pooling), gets its range clamped likewise, so
  the ReLU is the grid's own clamp and the pooling runs on its codes.
* **Residual adds.** An ``Add`` of two quantized tensors gets a :class:`TensorQuant` on its output
  (after its ReLU when that is the only user), calibrated like a layer's input: onnxruntime runs
  it as ``QLinearAdd`` and the next layers read its codes.

The definition stays "fake-quant each layer's input and output"; only which grids, plus the
quantizers after adds. ``fake-int8``, ``int8`` and the ONNX export all use the grids that
:func:`resolve_grids` returns, so they agree as before.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from cetopt.deploy.activations import ActivationQuant, ActivationRanges

__all__ = ["TensorQuant", "insert_tensor_quantizers", "resolve_grids"]

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_PRESERVING_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6}
_PRESERVING_FUNCTIONS = {
    *_RELU_FUNCTIONS,
    torch.flatten,
    torch.reshape,
    torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.max_pool3d,
    torch.nn.functional.dropout,
}
_PRESERVING_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}
_ADDS = {operator.add, torch.add, operator.iadd}


class TensorQuant(nn.Module):
    """Fake-quantizes one tensor on ``grid`` (identity while it has none): the output of a residual add.

    Attributes
    ----------
    grid : ActivationQuant or None
    """

    def __init__(self, grid: ActivationQuant | None = None):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.grid is None else self.grid.fake(x)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """The ReLU's upper clamp (inf for ReLU, 6 for ReLU6) or None when ``node`` is no ReLU."""
    m = _module(gm, node)
    if isinstance(m, _RELU_MODULES):
        return 6.0 if isinstance(m, nn.ReLU6) else float("inf")
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return 6.0 if node.target is torch.nn.functional.relu6 else float("inf")
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return float("inf")
    return None


def _preserves_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for a unary op (on its first argument) that maps values of a grid to values of it."""
    m = _module(gm, node)
    if m is not None:
        return isinstance(m, _PRESERVING_MODULES)
    if node.op == "call_function":
        return node.target in _PRESERVING_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PRESERVING_METHODS
    return False


def _producer(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The quantized layer or TensorQuant whose output ``node`` is, through grid-preserving ops."""
    from cetopt.deploy.runtime import _CodesMixin

    while True:
        m = _module(gm, node)
        if isinstance(m, (_CodesMixin, TensorQuant)):
            return node
        if not _preserves_grid(gm, node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]


def insert_tensor_quantizers(gm: fx.GraphModule) -> list[str]:
    """Put a :class:`TensorQuant` after every add of two quantized tensors (after its ReLU if that
    is its only user). Returns their names; ``gm`` is changed in place and recompiled."""
    names = []
    for node in list(gm.graph.nodes):
        is_add = (node.op == "call_function" and node.target in _ADDS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if not is_add or len(node.args) != 2 or node.kwargs:
            continue
        if not all(isinstance(a, fx.Node) and _producer(gm, a) is not None for a in node.args):
            continue
        after = node
        users = list(node.users)
        if len(users) == 1 and _is_relu(gm, users[0]) is not None:
            after = users[0]
        name = f"tensor_quant_{len(names)}"
        gm.add_submodule(name, TensorQuant())
        with gm.graph.inserting_after(after):
            quant = gm.graph.call_module(name, (after,))
        after.replace_all_uses_with(quant, delete_user_cb=lambda user, quant=quant: user is not quant)
        names.append(name)
    if names:
        gm.graph.lint()
        gm.recompile()
    return names


def _consumers(gm: fx.GraphModule, node: fx.Node, clamp: tuple[float, float], out: list) -> None:
    """Every op reading ``node``'s value through grid-preserving ops, with the ReLU clamp on its path."""
    from cetopt.deploy.runtime import _CodesMixin

    for user in node.users:
        m = _module(gm, user)
        if isinstance(m, _CodesMixin) and user.args and user.args[0] is node:
            out.append((user, clamp, True))
            continue
        if _preserves_grid(gm, user) and user.args and user.args[0] is node:
            top = _is_relu(gm, user)
            _consumers(gm, user, clamp if top is None else (max(clamp[0], 0.0), min(clamp[1], top)), out)
            continue
        out.append((user, clamp, False))


def resolve_grids(
    model: nn.Module, ranges: ActivationRanges, reduced: dict[str, bool], shared: bool = True
) -> ActivationRanges:
    """The grids the ``int8`` modes and the export run: each layer's input on its range, shared edges.

    Parameters
    ----------
    model : nn.Module
        The deployment model (:func:`cetopt.deploy.deployment_model`); read only.
    ranges : ActivationRanges
        Calibrated grids (of its layers and its :class:`TensorQuant` s).
    reduced : dict of str to bool
        Per quantized layer, whether its input goes on the reduced range (codes 0 … 127).
    shared : bool
        Share grids along edges and quantize residual adds (module docstring); False: each
        layer's calibrated grids as they are, adds in float (the add quantizers' grids dropped).

    Returns
    -------
    ActivationRanges
        New; ``activation_range`` records each layer's range (``"reduced"`` / ``"full"``) and
        ``shared_grids`` whether edges were shared.
    """
    inputs = {n: (g.with_range(reduced[n]) if n in reduced else g) for n, g in ranges.inputs.items()}
    outputs = dict(ranges.outputs)
    if not shared:  # each layer's own grids and float adds: the add quantizers stay identities
        adds = {n for n, m in model.named_modules() if isinstance(m, TensorQuant)}
        inputs = {n: g for n, g in inputs.items() if n not in adds}
        outputs = {n: g for n, g in outputs.items() if n not in adds}
    record = {n: ("reduced" if r else "full") for n, r in reduced.items()}
    result = ActivationRanges(inputs, outputs, ranges.method, record, shared)
    if not shared or not isinstance(model, fx.GraphModule):
        return result
    gm = model
    kernel = lambda g: g is not None and g.bits == 8 and not g.per_channel  # noqa: E731
    for node in gm.graph.nodes:
        m = _module(gm, node)
        if node.target not in outputs or not isinstance(m, nn.Module):
            continue
        own = outputs[node.target]
        if not isinstance(own, ActivationQuant):
            continue  # a stand-in (activation_sensitivity leaves outputs float)
        found: list = []
        _consumers(gm, node, (-float("inf"), float("inf")), found)
        layers = [u.target for u, _, is_layer in found if is_layer and u.target in inputs]
        if not layers and found and kernel(own) and all(lo >= 0 for _, (lo, _), _ in found):
            # only non-layer ops read it, all through a ReLU / ReLU6: its grid covers what they
            # read (zero point 0, top at most the clamp), so the ReLU becomes the grid's own clamp
            lo_c = max(lo for _, (lo, _), _ in found)
            hi_c = max(hi for _, (_, hi), _ in found)
            if all(c == (lo_c, hi_c) for _, c, _ in found):
                lo = torch.clamp(own.lo, min=lo_c, max=hi_c)
                hi = torch.clamp(own.hi, min=lo_c, max=hi_c)
                outputs[node.target] = ActivationQuant.from_range(lo, hi, 8, None, own.reduced_range)
            continue
        if not layers or not kernel(own) or not all(kernel(inputs[n]) for n in layers):
            continue
        if any(is_layer and u.target not in inputs for u, _, is_layer in found):
            continue  # a float-kept layer reads it: leave it alone
        los = [inputs[n].lo for n in layers]
        his = [inputs[n].hi for n in layers]
        for _, (lo_clamp, hi_clamp), is_layer in found:
            if not is_layer:  # a non-layer op reads the producer's own range, clamped on the way
                los.append(torch.clamp(own.lo, min=lo_clamp, max=hi_clamp))
                his.append(torch.clamp(own.hi, min=lo_clamp, max=hi_clamp))
        lo = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in los]).min()
        hi = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in his]).max()
        grid = ActivationQuant.from_range(lo, hi, 8, None, any(inputs[n].reduced_range for n in layers))
        outputs[node.target] = grid
        if isinstance(m, TensorQuant):
            inputs[node.target] = grid
        for n in layers:
            inputs[n] = grid
            if n in record:
                record[n] = grid.activation_range
    return result
