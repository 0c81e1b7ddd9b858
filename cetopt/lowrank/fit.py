"""Fitting ``W ≈ L + S`` for one weight matrix: rank(L) ≤ r, S with at most k nonzeros.

All four fits work on a weight matrix ``W`` of shape ``(m, n)`` (a convolution's kernel flattened to
``(out, in·k…)``) and, where they use data, calibration inputs ``X`` of shape ``(n, N)`` (one column
per example or output position: the unfolded patches of a convolution). Work is in float64.

**Activation-aware L + S by ADMM** (:func:`fit_admm`). After Ma et al. 2018 ("A unified
approximation framework", extended ADMM) and Yu et al. 2017: with ``Y = σ(WX + b)`` the layer's
original output after its activation, solve

    min_{L, S, Z}  ‖σ(Z) − Y‖²   s.t.  Z = (L + S) X + b,  rank(L) ≤ r,  S ∈ 𝒮_k

by splitting the pre-activation ``Z`` off. The augmented Lagrangian (scaled dual ``U``, penalty ρ) is

    ℒ(L, S, Z, U) = ‖σ(Z) − Y‖² + (ρ/2) ‖Z − (L + S) X − b + U‖² − (ρ/2) ‖U‖²,

and one iteration updates each block in turn:

1. **Z-step**, elementwise with ``V = (L + S) X + b − U``: ``z = argmin (σ(z) − y)² + (ρ/2)(z − v)²``.
   For σ = identity, ``z = (2y + ρv) / (2 + ρ)``. For σ = ReLU compare the two branches,
   ``z₊ = max(0, (2y + ρv)/(2 + ρ))`` (cost ``(z₊ − y)² + (ρ/2)(z₊ − v)²``) and
   ``z₋ = min(0, v)`` (cost ``y² + (ρ/2)(z₋ − v)²``), and keep the cheaper.
2. **L-step**, with target ``T = Z + U − b``: ``L = argmin_{rank ≤ r} ‖L X − (T − S X)‖²``, a
   reduced-rank regression solved exactly: with ``XXᵀ + λI = R Rᵀ`` (Cholesky; λ is jitter, grown
   until the factorisation succeeds, since ``XXᵀ`` is singular whenever N < n or inputs are
   collinear), ``‖L X − T'‖² = ‖(L − T'Xᵀ(XXᵀ)⁻¹) R‖² + const``, so ``L = [T' Xᵀ R⁻ᵀ]_r R⁻¹``
   where ``[·]_r`` is the truncated SVD.
3. **S-step**: ``S`` minimising ``‖S X − (T − L X)‖²`` over 𝒮_k is combinatorial; as in the
   linearised ("extended") ADMM, take projected-gradient steps
   ``S ← P_k(S − η ((L + S) X − T) Xᵀ)`` with ``η = 1 / λ_max(XXᵀ)``, where ``P_k`` keeps the k
   largest entries (or the largest rows / columns by norm for structured sparsity).
4. **Dual**: ``U ← U + Z − (L + S) X − b``; then ``ρ ← min(γρ, ρ_max)`` (γ > 1) and ``U`` is
   rescaled by ``ρ_old / ρ_new`` (it is the dual divided by ρ). A growing penalty
   drives ``Z`` onto ``(L + S) X + b``, so late iterations minimise the true objective.

The iteration starts from the weight-space fit below and returns the iterate with the lowest true
objective ``‖σ((L + S) X + b) − Y‖²``, which is recorded at every iteration in ``history``.

*Sequential calibration*: the target may come from other inputs than the fit, ``Y = σ(W X₀ + b)``
with ``X₀`` the layer's inputs in the original network and ``X`` its inputs once the layers before
it are compressed (same examples, same columns). Nothing in the steps above changes — ``Y`` is a
constant — so the fitted layer also corrects the error arriving from upstream.

**Weight-space L + S** (:func:`fit_weight_space`), as in OATS: scale the input dimensions by
``D = √diag(XXᵀ)`` (plus jitter), then alternate ``L = [WD − S]_r`` and ``S = P_k(WD − L)``, and
undo the scaling. The alternation is run from ``S = 0`` and from ``S = P_k(WD)`` and the better end
point is kept (from ``S = 0`` the first SVD absorbs large sparse entries and can stall).

**Plain SVD** (:func:`fit_svd`): ``L = [W]_r``. **Magnitude pruning**
(:func:`fit_prune`): ``S = P_k(W)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ACTIVATIONS",
    "ADMM_TOL",
    "STRUCTURES",
    "GramFactors",
    "LowRankSparse",
    "cholesky_jitter",
    "fit_admm",
    "fit_prune",
    "fit_svd",
    "fit_svd_ranks",
    "fit_weight_space",
    "largest_eigenvalue",
    "project_sparse",
    "truncate",
]

STRUCTURES = ("unstructured", "rows", "columns")
# ADMM stops once both residuals are below this share of ‖Y‖ (see fit_admm)
ADMM_TOL = 1e-3
ACTIVATIONS = ("identity", "relu")


@dataclass(frozen=True)
class LowRankSparse:
    """``W ≈ left @ right + sparse``.

    Attributes
    ----------
    left : Tensor, shape (m, r)
    right : Tensor, shape (r, n)
    sparse : Tensor, shape (m, n)
    history : tuple of float
        Objective per iteration (empty for one-shot fits).
    """

    left: torch.Tensor
    right: torch.Tensor
    sparse: torch.Tensor
    history: tuple[float, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.sparse))

    @property
    def params(self) -> int:
        """Stored values: ``r (m + n) + nnz`` (rank 0 stores no factors)."""
        m, n = self.sparse.shape
        return self.rank * (m + n) + self.nnz

    def dense(self) -> torch.Tensor:
        return self.left @ self.right + self.sparse

    def scale_rows(self, factor: torch.Tensor) -> LowRankSparse:
        """The decomposition of ``diag(factor) W`` (rank and support unchanged)."""
        f = factor.to(self.left.dtype)[:, None]
        return LowRankSparse(self.left * f, self.right, self.sparse * f, self.history)


def truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation ``left @ right`` of ``matrix`` (truncated SVD).

    ``left`` has orthonormal columns and ``right`` carries the singular values. Past
    :data:`EIGH_MIN_SIDE` rows and columns the top singular vectors come from the eigenvectors of the
    smaller Gram matrix (``AAᵀ`` or ``AᵀA``), several times faster than a full SVD, unless the kept
    singular values are too small for squared values to resolve them.
    """
    m, n = matrix.shape
    if rank == 0:
        return matrix.new_zeros(m, 0), matrix.new_zeros(0, n)
    if min(m, n) >= EIGH_MIN_SIDE and rank < min(m, n):
        pair = _truncate_eigh(matrix, rank)
        if pair is not None:
            return pair
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank, None] * vh[:rank]


EIGH_MIN_SIDE = 256


def _truncate_eigh(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`truncate` through ``eigh`` of the smaller Gram matrix; None when it would be inexact."""
    wide = matrix.shape[0] <= matrix.shape[1]
    values, vectors = torch.linalg.eigh(matrix @ matrix.T if wide else matrix.T @ matrix)
    top, vals = vectors[:, -rank:].flip(1), values[-rank:].flip(0)
    if float(vals[-1]) <= 1e-10 * float(values[-1]):  # σ_r² within rounding of σ_1²
        return None
    if wide:
        return top, top.T @ matrix
    sing = vals.sqrt()
    return (matrix @ top) / sing[None, :], sing[:, None] * top.T


def project_sparse(matrix: torch.Tensor, nnz: int, structure: str = "unstructured") -> torch.Tensor:
    """Keep the ``nnz`` largest-magnitude entries (or whole rows / columns, ``nnz // n`` of them)."""
    m, n = matrix.shape
    if nnz <= 0:
        return torch.zeros_like(matrix)
    if structure == "unstructured":
        if nnz >= matrix.numel():
            return matrix.clone()
        keep = matrix.abs().flatten().topk(nnz).indices
        out = torch.zeros(matrix.numel(), dtype=matrix.dtype)
        out[keep] = matrix.flatten()[keep]
        return out.reshape(m, n)
    axis = 1 if structure == "rows" else 0
    units = nnz // matrix.shape[axis]
    norms = matrix.pow(2).sum(dim=axis)
    mask = torch.zeros_like(norms, dtype=torch.bool)
    mask[norms.topk(min(units, norms.numel())).indices] = True
    return matrix * (mask[:, None] if structure == "rows" else mask[None, :])


def cholesky_jitter(gram: torch.Tensor, rel: float = 1e-8) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + λI`` in float64, λ grown from ``rel · mean diag`` until it works."""
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    base = float(gram.diagonal().mean()) if n else 0.0
    lam = max(rel * base, 1e-12)
    eye = torch.eye(n, dtype=torch.float64)
    for _ in range(20):
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0:
            return factor
        lam *= 10
    raise RuntimeError("XXᵀ could not be factorised even with jitter")


def _column_scale(gram: torch.Tensor) -> torch.Tensor:
    diag = gram.diagonal().clamp_min(0)
    return (diag + 1e-8 * float(diag.mean()) + 1e-12).sqrt()


def largest_eigenvalue(gram: torch.Tensor) -> float:
    """``λ_max`` of a symmetric positive semidefinite matrix (Lanczos past 512 rows, to 1e-10)."""
    n = gram.shape[0]
    if n <= 512:
        return float(torch.linalg.eigvalsh(gram)[-1])
    from scipy.sparse.linalg import eigsh

    value = eigsh(gram.numpy(), k=1, which="LA", tol=1e-10, v0=np.ones(n), return_eigenvectors=False)
    return float(value[0])


class GramFactors:
    """What every fit of one layer shares, each computed once on first use.

    ``gram`` is ``XXᵀ`` (float64); ``chol`` its jittered Cholesky factor (:func:`cholesky_jitter`);
    ``step`` the S-step length ``1 / λ_max(XXᵀ)``; ``column_scale`` the OATS scaling ``√diag(XXᵀ)``.
    """

    def __init__(self, gram: torch.Tensor, inputs: torch.Tensor | None = None):
        self.gram = gram.to(torch.float64)
        self.inputs = inputs

    @classmethod
    def of(cls, inputs: torch.Tensor) -> GramFactors:
        x = inputs.to(torch.float64)
        return cls(x @ x.T, x)

    def times(self, a: torch.Tensor) -> torch.Tensor:
        """``a XXᵀ``, through ``X`` when there are few columns (cheaper, same value)."""
        return (a @ self.inputs) @ self.inputs.T if self.few_columns else a @ self.gram

    @functools.cached_property
    def chol(self) -> torch.Tensor:
        return cholesky_jitter(self.gram)

    @property
    def few_columns(self) -> bool:
        """Fewer calibration columns than half the inputs: work in the columns' span."""
        return self.inputs is not None and 2 * self.inputs.shape[1] < self.inputs.shape[0]

    @functools.cached_property
    def column_basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, d)``: ``U`` (n, k) an orthonormal basis of X's columns, ``d = (σ² + λ)^-½``.

        ``XXᵀ + λI = U diag(σ² + λ) Uᵀ + λ(I − UUᵀ)`` with λ the first jitter of
        :func:`cholesky_jitter`; from the eigendecomposition of the small ``XᵀX``.
        """
        x = self.inputs
        values, vectors = torch.linalg.eigh(x.T @ x)
        keep = values > 1e-12 * float(values[-1].clamp_min(1e-300))
        sing = values[keep].sqrt()
        basis = (x @ vectors[:, keep]) / sing[None, :]
        lam = max(1e-8 * float(self.gram.diagonal().mean()), 1e-12)
        return basis, (values[keep] + lam).rsqrt()

    @functools.cached_property
    def step(self) -> float:
        return 1.0 / max(largest_eigenvalue(self.gram), 1e-12)

    @functools.cached_property
    def column_scale(self) -> torch.Tensor:
        return _column_scale(self.gram)


def fit_svd(weight: torch.Tensor, rank: int) -> LowRankSparse:
    """Plain truncated SVD of ``weight``."""
    return fit_svd_ranks(weight, [rank])[0]


def fit_svd_ranks(weight: torch.Tensor, ranks: Sequence[int]) -> list[LowRankSparse]:
    """:func:`fit_svd` at every rank in ``ranks`` from one decomposition of ``weight``."""
    w = weight.to(torch.float64)
    top = max(ranks, default=0)
    left, right = truncate(w, top)
    zeros = torch.zeros_like(w)
    return [LowRankSparse(left[:, :r], right[:r], zeros) for r in ranks]


def fit_prune(weight: torch.Tensor, nnz: int, structure: str = "unstructured") -> LowRankSparse:
    """Plain magnitude pruning of ``weight``."""
    w = weight.to(torch.float64)
    m, n = w.shape
    return LowRankSparse(w.new_zeros(m, 0), w.new_zeros(0, n), project_sparse(w, nnz, structure))


def fit_weight_space(
    weight: torch.Tensor,
    rank: int,
    nnz: int,
    gram: torch.Tensor | GramFactors | None = None,
    *,
    structure: str = "unstructured",
    iterations: int = 20,
    tol: float = 1e-9,
) -> LowRankSparse:
    """OATS-style alternation on ``W D``, ``D = √diag(XXᵀ)`` (identity without ``gram``).

    Each run stops early once an alternation lowers ``‖WD − L − S‖²`` by at most ``tol`` times
    its value (the alternation never raises it).
    """
    w = weight.to(torch.float64)
    if gram is None:
        d = torch.ones(w.shape[1], dtype=torch.float64)
    else:
        d = gram.column_scale if isinstance(gram, GramFactors) else _column_scale(gram)
    wd = w * d[None, :]
    runs = [_alternate(wd, rank, nnz, structure, iterations, tol, sparse_first=False)]
    if rank and nnz:
        runs.append(_alternate(wd, rank, nnz, structure, iterations, tol, sparse_first=True))
    left, right, sparse, history = min(runs, key=lambda run: run[3][-1])
    return LowRankSparse(left, right / d[None, :], sparse / d[None, :], tuple(history))


def _alternate(wd, rank, nnz, structure, iterations, tol, *, sparse_first):
    """Alternate ``L = [WD − S]_r``, ``S = P_k(WD − L)`` from ``S = 0`` or from ``S = P_k(WD)``."""
    sparse = project_sparse(wd, nnz, structure) if sparse_first else torch.zeros_like(wd)
    history: list[float] = []
    for _ in range(iterations if nnz and rank else 1):
        left, right = truncate(wd - sparse, rank)
        sparse = project_sparse(wd - left @ right, nnz, structure)
        history.append(float((wd - left @ right - sparse).pow(2).sum()))
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
    return left, right, sparse, history


def _activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    return z.clamp_min(0) if activation == "relu" else z


def _prox(y: torch.Tensor, v: torch.Tensor, rho: float, activation: str) -> torch.Tensor:
    """Elementwise ``argmin_z (σ(z) − y)² + (ρ/2)(z − v)²``."""
    z_pos = (2 * y + rho * v) / (2 + rho)
    if activation == "identity":
        return z_pos
    z_pos = z_pos.clamp_min(0)
    z_neg = v.clamp_max(0)
    cost_pos = (z_pos - y) ** 2 + 0.5 * rho * (z_pos - v) ** 2
    cost_neg = y**2 + 0.5 * rho * (z_neg - v) ** 2
    return torch.where(cost_pos <= cost_neg, z_pos, z_neg)


def _reduced_rank(target_xt: torch.Tensor, factors: GramFactors, rank: int):
    """``argmin_{rank ≤ r} ‖L X − T‖² + λ‖L‖²`` as factors, given ``T Xᵀ``.

    Whitened by ``XXᵀ + λI = R Rᵀ`` (Cholesky), or, with few columns, by the symmetric root in the
    columns' span (``T Xᵀ`` lies in it, so the truncated SVD is of an (m, k) matrix, k ≤ N): the
    same minimiser, since a truncated SVD commutes with an orthogonal change of whitening.
    """
    m, n = target_xt.shape
    if rank == 0:
        return target_xt.new_zeros(m, 0), target_xt.new_zeros(0, n)
    if factors.few_columns:
        basis, root = factors.column_basis
        left, right = truncate((target_xt @ basis) * root[None, :], rank)
        return left, (right * root[None, :]) @ basis.T
    chol = factors.chol
    whitened = torch.linalg.solve_triangular(chol, target_xt.T, upper=False).T  # T Xᵀ R⁻ᵀ
    left, right = truncate(whitened, rank)
    right = torch.linalg.solve_triangular(chol.T, right.T, upper=True).T  # · R⁻¹
    return left, right


class _Columns:
    """ADMM on the calibration columns: ``Z``, ``U`` and ``(L + S) X`` are (m, N) matrices."""

    def __init__(self, w, b, x, x0, activation, gram):
        self.x, self.b, self.activation = x, b, activation
        self.y = _activate(w @ x0 + b, activation)

    def apply(self, left, right, sparse):
        return left @ (right @ self.x) + sparse @ self.x

    def prox(self, pre, dual, rho):
        return _prox(self.y, pre + self.b - dual, rho, self.activation)

    def target_xt(self, z, dual):
        return (z + dual - self.b) @ self.x.T

    def residual(self, z, pre):
        return z - pre - self.b

    def objective(self, pre) -> float:
        return float((_activate(pre + self.b, self.activation) - self.y).pow(2).sum())

    def norm(self, a) -> float:
        return float(a.norm())


class _GramSpace:
    """Identity activation with its own inputs as target: every iterate is ``M X + b``.

    ``Z = M_z X + b``, ``U = M_u X`` and ``(L + S) X`` are carried by their (m, n) coefficients; the
    steps of :func:`fit_admm` map onto them exactly (``M_z = (2W + ρ(P − M_u)) / (2 + ρ)``,
    ``T Xᵀ = (M_z + M_u) XXᵀ``, ``M_u ← M_u + M_z − P``) and ``‖A X‖² = tr(A XXᵀ Aᵀ)``, so an iteration
    costs O(m n²) instead of O(m n N): cheaper once there are more columns than inputs.
    """

    def __init__(self, w, b, x, x0, activation, gram):
        self.w, self.gram = w, gram
        self.y = torch.zeros_like(w)  # the dual's shape

    def apply(self, left, right, sparse):
        return left @ right + sparse

    def prox(self, pre, dual, rho):
        return (2 * self.w + rho * (pre - dual)) / (2 + rho)

    def target_xt(self, z, dual):
        return (z + dual) @ self.gram

    def residual(self, z, pre):
        return z - pre

    def objective(self, pre) -> float:
        diff = pre - self.w
        return float(((diff @ self.gram) * diff).sum().clamp_min(0))

    def norm(self, a) -> float:
        return float(((a @ self.gram) * a).sum().clamp_min(0)) ** 0.5


def fit_admm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: torch.Tensor,
    rank: int,
    nnz: int,
    *,
    activation: str = "relu",
    structure: str = "unstructured",
    iterations: int = 30,
    rho: float = 1.0,
    rho_growth: float = 1.15,
    rho_max: float = 1e4,
    sparse_steps: int = 3,
    tol: float = ADMM_TOL,
    init: LowRankSparse | None = None,
    target_inputs: torch.Tensor | None = None,
    factors: GramFactors | None = None,
) -> LowRankSparse:
    """Activation-aware L + S by ADMM (see the module docstring for the derivation).

    Parameters
    ----------
    weight : Tensor, shape (m, n)
    bias : Tensor, shape (m,), optional
    inputs : Tensor, shape (n, N)
        Calibration inputs ``X`` (columns).
    rank, nnz : int
        Rank of L and nonzeros of S.
    activation : {"relu", "identity"}
    structure : {"unstructured", "rows", "columns"}
    iterations : int
        The most iterations.
    rho, rho_growth, rho_max : float
        Initial penalty, its growth per iteration, its cap.
    sparse_steps : int
        Projected-gradient steps per S-step.
    tol : float
        Stop once the primal residual ``‖Z − (L + S) X − b‖`` and the dual residual
        ``ρ ‖(L + S − L′ − S′) X‖`` (primes: the previous iterate) are both at most ``tol · ‖Y‖``;
        0 runs every iteration.
    init : LowRankSparse, optional
        Starting point; default the weight-space fit.
    target_inputs : Tensor, shape (n, N), optional
        Inputs ``X₀`` defining the target ``Y = σ(W X₀ + b)`` (sequential calibration); default
        ``inputs``.
    factors : GramFactors, optional
        ``XXᵀ`` and its factorisation, shared by every fit on the same ``inputs``.

    Returns
    -------
    LowRankSparse
        The best iterate; ``history[0]`` is the objective at the start, one entry per iteration run.
    """
    w = weight.to(torch.float64)
    x = inputs.to(torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    b = b[:, None]
    if target_inputs is not None and target_inputs.shape != x.shape:
        raise ValueError(f"target_inputs has shape {tuple(target_inputs.shape)}, inputs {tuple(x.shape)}")
    x0 = x if target_inputs is None else target_inputs.to(torch.float64)
    factors = factors or GramFactors.of(x)
    gram = factors.gram
    in_gram = activation == "identity" and target_inputs is None and x.shape[1] > x.shape[0]
    space = (_GramSpace if in_gram else _Columns)(w, b, x, x0, activation, gram)
    scale = float(torch.linalg.vector_norm(_activate(w @ x0 + b, activation))) if tol > 0 else 0.0
    start = init or fit_weight_space(w, rank, nnz, factors, structure=structure)
    left, right, sparse = start.left.clone(), start.right.clone(), start.sparse.clone()

    pre = space.apply(left, right, sparse)  # (L + S) X, shared by the objective, the Z-step and the dual
    best = (space.objective(pre), left, right, sparse)
    history = [best[0]]
    dual = torch.zeros_like(space.y)
    for _ in range(iterations):
        z = space.prox(pre, dual, rho)
        target_xt = space.target_xt(z, dual)  # T Xᵀ; every other product goes through XXᵀ
        left, right = _reduced_rank(target_xt - factors.times(sparse), factors, rank)
        low_gram = left @ factors.times(right)
        for _ in range(sparse_steps if nnz else 0):
            gradient = low_gram + factors.times(sparse) - target_xt
            sparse = project_sparse(sparse - factors.step * gradient, nnz, structure)
        previous, pre = pre, space.apply(left, right, sparse)
        residual = space.residual(z, pre)
        dual = dual + residual
        primal, change = space.norm(residual), space.norm(pre - previous)
        history.append(space.objective(pre))
        if history[-1] < best[0]:
            best = (history[-1], left, right, sparse)
        if primal <= tol * scale and rho * change <= tol * scale:
            break
        new_rho = min(rho * rho_growth, rho_max)
        dual *= rho / new_rho  # the scaled dual is λ/ρ
        rho = new_rho
    return LowRankSparse(best[1], best[2], best[3], tuple(history))
