"""A model as a chain of affine maps and ReLUs, in float64 arrays: what the bounds and MILPs read.

Every tensor in the traced graph is held as an affine expression ``Σ_k M_k v_k + c`` of *basis
variables*: the flattened input ``v_0`` and the output of each ReLU layer. Linear, Conv1d/2d (as
dense linear maps), eval-mode BatchNorm, flatten, identity/dropout and residual adds compose such
expressions exactly; each ReLU opens a new basis variable. Anything else raises
:class:`~cetopt.errors.UnsupportedLayerError` naming the module.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from cetopt.errors import UnsupportedLayerError
from cetopt.graph.trace import symbolic_trace

__all__ = ["Expr", "ReluLayer", "ReluNetwork", "extract"]

_RELU_FUNCS = {torch.relu, nn.functional.relu}
_ADD_FUNCS = {operator.add, torch.add}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclass
class Expr:
    """``Σ_k terms[k] @ v_k + const`` for one tensor (flattened per sample), with its shape."""

    terms: dict[int, np.ndarray]
    const: np.ndarray
    shape: tuple[int, ...]

    def map(self, matrix: np.ndarray, bias: np.ndarray, shape: tuple[int, ...]) -> Expr:
        """The expression after the affine map ``y = matrix @ x + bias``."""
        terms = {k: matrix @ m for k, m in self.terms.items()}
        return Expr(terms, matrix @ self.const + bias, shape)

    def scale(self, s: np.ndarray, shift: np.ndarray) -> Expr:
        """Elementwise ``y = s ⊙ x + shift``."""
        return Expr({k: s[:, None] * m for k, m in self.terms.items()}, s * self.const + shift, self.shape)

    def plus(self, other: Expr) -> Expr:
        terms = dict(self.terms)
        for k, m in other.terms.items():
            terms[k] = terms[k] + m if k in terms else m
        return Expr(terms, self.const + other.const, self.shape)


@dataclass
class ReluLayer:
    """One ReLU layer: its pre-activation as an expression of earlier basis variables.

    Attributes
    ----------
    index : int
        Basis variable number of this layer's output (``1 …``).
    node : str
        Name of the ReLU node in the traced graph.
    producer : str or None
        The Linear/Conv module whose output (possibly through a BatchNorm) feeds the ReLU, or
        ``None`` when the ReLU reads something else (e.g. a residual sum).
    batchnorm : str or None
        The BatchNorm between the producer and the ReLU, if any.
    shape : tuple
        Shape of one sample's pre-activation, e.g. ``(C,)`` or ``(C, H, W)``.
    pre : Expr
    """

    index: int
    node: str
    producer: str | None
    batchnorm: str | None
    shape: tuple[int, ...]
    pre: Expr = field(repr=False)

    @property
    def size(self) -> int:
        """Number of neurons (channels × positions)."""
        return int(np.prod(self.shape))

    @property
    def channels(self) -> int:
        return int(self.shape[0])

    @property
    def positions(self) -> int:
        return self.size // self.channels

    @property
    def channel_of(self) -> np.ndarray:
        """Channel of each neuron (flattened in C order)."""
        return np.repeat(np.arange(self.channels), self.positions)


@dataclass
class ReluNetwork:
    """The extracted network: input size, ReLU layers in topological order, output expression."""

    input_shape: tuple[int, ...]
    layers: list[ReluLayer]
    output: Expr = field(repr=False)

    @property
    def features(self) -> int:
        return int(np.prod(self.input_shape))

    def sizes(self) -> list[int]:
        """Size of every basis variable: input first, then each ReLU layer."""
        return [self.features, *(layer.size for layer in self.layers)]

    def preactivations(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-activations of every ReLU layer at the rows of ``x`` (float64), shape (n, size) each."""
        values = [np.asarray(x, dtype=np.float64).reshape(len(x), -1)]
        pres = []
        for layer in self.layers:
            g = _evaluate(layer.pre, values)
            pres.append(g)
            values.append(np.maximum(g, 0.0))
        return pres

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The network's output at the rows of ``x``, computed from the expressions (float64)."""
        values = [np.asarray(x, dtype=np.float64).reshape(len(x), -1)]
        for layer in self.layers:
            values.append(np.maximum(_evaluate(layer.pre, values), 0.0))
        return _evaluate(self.output, values)


_SPARSE_DENSITY = 0.1  # terms with fewer nonzeros than this (convolutions) are multiplied as CSR
_CSR: dict[int, tuple[np.ndarray, object]] = {}  # id(term) -> (term, its CSR form or None)


def _operand(m: np.ndarray):
    """``m`` itself, or its CSR form where ``m`` is mostly zeros (cached per array)."""
    hit = _CSR.get(id(m))
    if hit is None or hit[0] is not m:
        from scipy import sparse

        csr = sparse.csr_matrix(m) if m.size and np.count_nonzero(m) < _SPARSE_DENSITY * m.size else None
        if len(_CSR) > 256:
            _CSR.clear()
        hit = _CSR[id(m)] = (m, csr)
    return m if hit[1] is None else hit[1]


def _evaluate(expr: Expr, values: list[np.ndarray]) -> np.ndarray:
    out = np.broadcast_to(expr.const, (len(values[0]), expr.const.size)).copy()
    for k, m in expr.terms.items():
        op = _operand(m)
        out += values[k] @ m.T if op is m else (op @ values[k].T).T
    return out


def _conv_matrix(conv: nn.Module, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple]:
    d = int(np.prod(in_shape))
    with torch.no_grad():
        basis = torch.eye(d, dtype=torch.float64).reshape(d, *in_shape)
        weight = conv.weight.detach().double()
        out = conv._conv_forward(basis, weight, None)
    shape = tuple(out.shape[1:])
    bias = torch.zeros(shape[0], dtype=torch.float64) if conv.bias is None else conv.bias.detach().double()
    const = np.repeat(bias.numpy(), int(np.prod(shape[1:])))
    return out.reshape(d, -1).T.numpy().copy(), const, shape


class _Extractor:
    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...]):
        self.gm = gm
        self.input_shape = input_shape
        self.env: dict[fx.Node, Expr] = {}
        self.layers: list[ReluLayer] = []
        self.output: Expr | None = None

    def run(self) -> ReluNetwork:
        for node in self.gm.graph.nodes:
            self.visit(node)
        return ReluNetwork(self.input_shape, self.layers, self.output)

    def arg(self, node: fx.Node, i: int = 0) -> Expr:
        a = node.args[i] if i < len(node.args) else None
        if not isinstance(a, fx.Node) or a not in self.env:
            raise UnsupportedLayerError(
                f"node {node.name!r} ({node.target}) has an unsupported argument {a!r}"
            )
        return self.env[a]

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.env:
                raise UnsupportedLayerError(f"the model takes more than one input ({node.name!r})")
            d = int(np.prod(self.input_shape))
            self.env[node] = Expr({0: np.eye(d)}, np.zeros(d), self.input_shape)
        elif node.op == "call_module":
            self.env[node] = self.module(node, self.gm.get_submodule(node.target))
        elif node.op == "call_function":
            self.env[node] = self.function(node)
        elif node.op == "call_method":
            self.env[node] = self.method(node)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise UnsupportedLayerError("the model must return a single tensor")
            self.output = self.env[out]
        else:
            raise UnsupportedLayerError(f"unsupported graph node {node.name!r} ({node.op})", node.name)

    def module(self, node: fx.Node, m: nn.Module) -> Expr:
        x = self.arg(node)
        if isinstance(m, nn.Linear):
            if len(x.shape) != 1:
                raise UnsupportedLayerError(
                    f"Linear {node.target!r} reads a tensor of shape {x.shape}", node.target
                )
            w = m.weight.detach().double().numpy()
            b = np.zeros(m.out_features) if m.bias is None else m.bias.detach().double().numpy()
            return x.map(w, b, (m.out_features,))
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode == "zeros":
            mat, const, shape = _conv_matrix(m, x.shape)
            return x.map(mat, const, shape)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_var is not None:
            return self.batchnorm(m, x)
        if isinstance(m, nn.ReLU):
            return self.relu(node, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        raise UnsupportedLayerError(
            f"module {node.target!r} ({type(m).__name__}) is not supported by LEO stability analysis "
            "(supported: Linear, Conv1d/2d, BatchNorm1d/2d, ReLU, Flatten, Identity, Dropout, residual add)",
            node.target,
        )

    def batchnorm(self, m: nn.Module, x: Expr) -> Expr:
        std = np.sqrt(m.running_var.detach().double().numpy() + m.eps)
        gamma = m.weight.detach().double().numpy() if m.affine else np.ones_like(std)
        beta = m.bias.detach().double().numpy() if m.affine else np.zeros_like(std)
        scale = gamma / std
        shift = beta - m.running_mean.detach().double().numpy() * scale
        reps = int(np.prod(x.shape[1:]))
        return x.scale(np.repeat(scale, reps), np.repeat(shift, reps))

    def relu(self, node: fx.Node, x: Expr) -> Expr:
        producer, bn = _producer(self.gm, node.args[0])
        layer = ReluLayer(len(self.layers) + 1, node.name, producer, bn, x.shape, x)
        self.layers.append(layer)
        return Expr({layer.index: np.eye(layer.size)}, np.zeros(layer.size), x.shape)

    def flatten(self, node: fx.Node, x: Expr, start: int, end: int = -1) -> Expr:
        full = (1, *x.shape)
        start, end = start % len(full), end % len(full)
        if start == 0:
            raise UnsupportedLayerError(f"{node.name!r} flattens the batch dimension", node.name)
        shape = (*full[:start], int(np.prod(full[start : end + 1])), *full[end + 1 :])
        return Expr(x.terms, x.const, shape[1:])

    def function(self, node: fx.Node) -> Expr:
        if node.target in _RELU_FUNCS:
            return self.relu(node, self.arg(node))
        if node.target in _ADD_FUNCS and len(node.args) == 2 and not node.kwargs:
            a, b = self.arg(node, 0), self.arg(node, 1)
            if a.shape != b.shape:
                raise UnsupportedLayerError(
                    f"add {node.name!r} broadcasts {a.shape} with {b.shape}", node.name
                )
            return a.plus(b)
        if node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.arg(node), start, end)
        if node.target is nn.functional.dropout:
            return self.arg(node)
        name = getattr(node.target, "__name__", str(node.target))
        raise UnsupportedLayerError(f"function {name!r} at node {node.name!r} is not supported", node.name)

    def method(self, node: fx.Node) -> Expr:
        x = self.arg(node)
        if node.target == "relu":
            return self.relu(node, x)
        if node.target == "contiguous":
            return x
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, x, start)
        if node.target in ("view", "reshape"):
            sizes = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else tuple(node.args[1])
            if len(sizes) == 2 and all(isinstance(s, int) for s in sizes) and sizes[1] in (-1, x.const.size):
                return Expr(x.terms, x.const, (x.const.size,))
        raise UnsupportedLayerError(
            f"method {node.target!r} at node {node.name!r} is not supported", node.name
        )


def _producer(gm: fx.GraphModule, node) -> tuple[str | None, str | None]:
    """The Linear/Conv module feeding a ReLU (through at most one BatchNorm) when it feeds nothing else."""
    bn = None
    if getattr(node, "op", None) == "call_module" and isinstance(
        gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm
    ):
        if len(node.users) != 1:
            return None, None
        bn, node = node.target, node.args[0]
    if getattr(node, "op", None) != "call_module" or len(node.users) != 1:
        return None, bn
    module = gm.get_submodule(node.target)
    return (node.target, bn) if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) else (None, bn)


def extract(model: nn.Module, input_shape: tuple[int, ...]) -> ReluNetwork:
    """Trace ``model`` (never modified) and return its :class:`ReluNetwork` for inputs of ``input_shape``.

    Raises
    ------
    UnsupportedLayerError
        A layer or operation outside the supported set; the message names it.
    UntraceableModelError
        torch.fx cannot trace the model.
    """
    gm = symbolic_trace(model)
    net = _Extractor(gm, tuple(int(s) for s in input_shape)).run()
    if not net.layers:
        raise UnsupportedLayerError("the model has no ReLU: there is nothing to analyse")
    return net
