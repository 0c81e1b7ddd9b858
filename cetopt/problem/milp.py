"""The solver-neutral problem form: a mixed-integer linear program held as arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from cetopt.errors import ProblemError

__all__ = ["MILP"]


def _numbers(name: str, value) -> np.ndarray:
    """``value`` as a float64 array; anything that is not real numbers raises ProblemError naming ``name``."""
    arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64, copy=False)
    if arr.dtype.kind == "O":
        try:
            return np.array([float(v) for v in arr.ravel()], dtype=np.float64).reshape(arr.shape)
        except (TypeError, ValueError):
            pass
    raise ProblemError(f"{name} must hold real numbers, got dtype {arr.dtype} ({np.ravel(arr)[:3]!r}...)")


def _vector(name: str, value, n: int, default: float, *, allow_inf: bool, bad_inf: float = 0.0) -> np.ndarray:
    if value is None:
        return np.full(n, default, dtype=np.float64)
    arr = _numbers(name, value)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ProblemError(f"{name} has shape {arr.shape}, expected ({n},)")
    bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "NaN" if allow_inf else "NaN or inf"
        raise ProblemError(f"{name}[{i}] is {float(arr[i])!r}: {what} is not allowed")
    if bad_inf and (arr == bad_inf).any():
        i = int(np.flatnonzero(arr == bad_inf)[0])
        raise ProblemError(f"{name}[{i}] is {float(arr[i])!r}: no value satisfies it")
    return arr


def _integrality(value, n: int) -> np.ndarray:
    if value is None:
        return np.zeros(n, dtype=bool)
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise ProblemError(f"integrality has shape {arr.shape}, expected ({n},)")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iuf":
        bad = (arr != 0) & (arr != 1)
    else:
        bad = np.array(
            [
                not (isinstance(v, (bool, np.bool_)) or (type(v) in (int, float) and v in (0, 1)))
                for v in arr.ravel()
            ],
            dtype=bool,
        )
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        value = np.ravel(arr)[j]
        value = value.item() if isinstance(value, np.generic) else value
        raise ProblemError(f"integrality[{j}] is {value!r}: expected True/False (or 1/0)")
    return arr.astype(bool)


def _matrix(A, m_hint: int | None, n: int) -> sp.csr_matrix:
    if A is None:
        return sp.csr_matrix((0 if m_hint is None else m_hint, n), dtype=np.float64)
    if isinstance(A, sp.csr_matrix) and A.dtype == np.float64:
        mat = A  # no copy: a large matrix is shared, never modified
    elif sp.issparse(A) and A.dtype.kind in "biuf":
        mat = sp.csr_matrix(A, dtype=np.float64)
    elif sp.issparse(A):
        raise ProblemError(f"A must hold real numbers, got dtype {A.dtype}")
    else:
        dense = _numbers("A", A)
        if dense.ndim != 2:
            raise ProblemError(f"A must be two-dimensional, got shape {dense.shape}")
        mat = sp.csr_matrix(dense)
    if mat.shape[1] != n:
        raise ProblemError(f"A has {mat.shape[1]} columns but c has {n} entries")
    if not mat.has_canonical_format:
        mat = mat.copy()
        mat.sum_duplicates()
    if not np.isfinite(mat.data).all():
        k = int(np.flatnonzero(~np.isfinite(mat.data))[0])
        row = int(np.searchsorted(mat.indptr, k, side="right") - 1)
        raise ProblemError(f"A[{row}, {int(mat.indices[k])}] is {mat.data[k]!r}: NaN or inf is not allowed")
    return mat


def _check_order(kind: str, lower: np.ndarray, upper: np.ndarray, names) -> None:
    bad = lower > upper
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        label = f"{kind} {i}" + (f" ({names[i]!r})" if names is not None else "")
        raise ProblemError(f"{label}: lower bound {lower[i]!r} is above upper bound {upper[i]!r}")


@dataclass(frozen=True, eq=False, kw_only=True)
class MILP:
    """A mixed-integer linear program ``opt c·x + offset  s.t.  row_lower ≤ A x ≤ row_upper``,
    ``col_lower ≤ x ≤ col_upper``, ``x_j`` integer where ``integrality[j]``.

    Every field is an array; nothing is stored per variable, so problems with millions of columns
    cost what their arrays cost.

    Parameters
    ----------
    c : array_like, shape (n,)
        Objective coefficients.
    A : scipy.sparse matrix or array_like, shape (m, n), optional
        Constraint matrix; stored as CSR float64. ``None`` means no rows.
    row_lower, row_upper : array_like, shape (m,), optional
        Row activity bounds; ``-inf``/``inf`` for a free side. Default: free.
    col_lower, col_upper : array_like, shape (n,), optional
        Column bounds. Default ``0`` and ``inf``.
    integrality : array_like of bool, shape (n,), optional
        ``True`` where the column must take an integer value. Default: all continuous.
    sense : {"min", "max"}
        Direction of optimization.
    offset : float
        Constant added to the objective.
    col_names, row_names : sequence of str, optional
        Labels used in error messages and by solvers that print models.

    Raises
    ------
    ProblemError
        On a shape mismatch, a NaN or infinite coefficient, or a lower bound above its upper bound;
        the message names the row or column.
    """

    c: np.ndarray
    A: sp.csr_matrix | None = None
    row_lower: np.ndarray | None = None
    row_upper: np.ndarray | None = None
    col_lower: np.ndarray | None = None
    col_upper: np.ndarray | None = None
    integrality: np.ndarray | None = None
    sense: str = "min"
    offset: float = 0.0
    col_names: Sequence[str] | None = field(default=None, repr=False)
    row_names: Sequence[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        c = _numbers("c", self.c)
        if c.ndim != 1:
            raise ProblemError(f"c must be one-dimensional, got shape {c.shape}")
        n = c.shape[0]
        c = _vector("c", c, n, 0.0, allow_inf=False)
        m_hint = None
        for name in ("row_lower", "row_upper"):
            value = getattr(self, name)
            if value is not None and np.ndim(value) == 1:
                m_hint = len(value)
        A = _matrix(self.A, m_hint, n)
        m = A.shape[0]
        inf = np.inf
        row_lower = _vector("row_lower", self.row_lower, m, -inf, allow_inf=True, bad_inf=inf)
        row_upper = _vector("row_upper", self.row_upper, m, inf, allow_inf=True, bad_inf=-inf)
        col_lower = _vector("col_lower", self.col_lower, n, 0.0, allow_inf=True, bad_inf=inf)
        col_upper = _vector("col_upper", self.col_upper, n, inf, allow_inf=True, bad_inf=-inf)
        integrality = _integrality(self.integrality, n)
        if not isinstance(self.sense, str) or self.sense not in ("min", "max"):
            raise ProblemError(f"sense must be 'min' or 'max', got {self.sense!r}")
        offset = _numbers("offset", self.offset)
        if offset.ndim != 0 or not np.isfinite(offset):
            raise ProblemError(f"offset is {self.offset!r}: a finite number is required")
        for kind, names, size in (("column", self.col_names, n), ("row", self.row_names, m)):
            if names is not None and (isinstance(names, str) or not hasattr(names, "__len__")):
                raise ProblemError(f"{kind} names must be a sequence of str, got {type(names).__name__}")
            if names is not None and len(names) != size:
                raise ProblemError(f"{kind} names: got {len(names)}, expected {size}")
        _check_order("row", row_lower, row_upper, self.row_names)
        _check_order("column", col_lower, col_upper, self.col_names)
        for name, value in (
            ("c", c),
            ("A", A),
            ("row_lower", row_lower),
            ("row_upper", row_upper),
            ("col_lower", col_lower),
            ("col_upper", col_upper),
            ("integrality", integrality),
            ("offset", float(offset)),
        ):
            object.__setattr__(self, name, value)

    @property
    def num_cols(self) -> int:
        """Number of variables."""
        return int(self.c.shape[0])

    @property
    def num_rows(self) -> int:
        """Number of constraint rows."""
        return int(self.A.shape[0])

    @property
    def is_mip(self) -> bool:
        """Whether any column is integer."""
        return bool(self.integrality.any())

    def objective_value(self, x: np.ndarray) -> float:
        """Objective of ``x`` (offset included)."""
        return float(self.c @ x + self.offset)

    def violation(self, x: np.ndarray) -> float:
        """Largest violation of any bound, row or integrality requirement at ``x`` (0 if feasible)."""
        x = np.asarray(x, dtype=np.float64)
        worst = 0.0
        if self.num_rows:
            act = self.A @ x
            worst = max(worst, float(np.max(self.row_lower - act, initial=0.0)))
            worst = max(worst, float(np.max(act - self.row_upper, initial=0.0)))
        worst = max(worst, float(np.max(self.col_lower - x, initial=0.0)))
        worst = max(worst, float(np.max(x - self.col_upper, initial=0.0)))
        if self.is_mip:
            xi = x[self.integrality]
            worst = max(worst, float(np.max(np.abs(xi - np.round(xi)), initial=0.0)))
        return worst

    def relaxation(self) -> MILP:
        """The same problem with every integrality requirement dropped (its LP relaxation)."""
        return MILP(
            c=self.c,
            A=self.A,
            row_lower=self.row_lower,
            row_upper=self.row_upper,
            col_lower=self.col_lower,
            col_upper=self.col_upper,
            sense=self.sense,
            offset=self.offset,
            col_names=self.col_names,
            row_names=self.row_names,
        )

    def feasibility(self) -> MILP:
        """The same constraints with a zero objective: optimal iff the problem is feasible.

        Backends use it to settle a solver's "unbounded or infeasible" answer.
        """
        return MILP(
            c=np.zeros(self.num_cols),
            A=self.A,
            row_lower=self.row_lower,
            row_upper=self.row_upper,
            col_lower=self.col_lower,
            col_upper=self.col_upper,
            integrality=self.integrality,
        )

    def __repr__(self) -> str:
        kind = "MILP" if self.is_mip else "LP"
        return (
            f"MILP({kind}, sense={self.sense!r}, cols={self.num_cols}, rows={self.num_rows}, "
            f"nnz={self.A.nnz}, integer={int(self.integrality.sum())})"
        )
