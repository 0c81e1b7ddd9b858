"""CBC, the binary PuLP bundles, driven directly: the model is written as free MPS from the arrays
(no PuLP objects per variable) and the native solution file and log are read back.

The status comes from CBC's own solution file, not from PuLP's mapping (which reports a stopped
solve as "Optimal"). CBC's command line prints a lower bound only when it stops short of
optimality, so :attr:`Solution.bound` is filled only then, or when the run was optimal with a zero
gap tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from cetopt.problem import MILP, Solution, Status
from cetopt.solving.base import Capabilities, Solver

__all__ = ["CbcSolver", "cbc_path", "write_mps"]


@functools.lru_cache(maxsize=1)
def cbc_path() -> str | None:
    """Path of the CBC binary bundled with PuLP, or ``None`` if PuLP or the binary is missing."""
    try:
        import pulp
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # PuLP 3.x deprecates the bundled binary
            path = pulp.PULP_CBC_CMD().path
    except Exception:
        return None
    return path if path and os.path.exists(path) and os.access(path, os.X_OK) else None


def _num(values: np.ndarray) -> list[str]:
    return [repr(float(v)) for v in values]


def write_mps(problem: MILP, path: str, *, negate: bool = False) -> np.ndarray:
    """Write ``problem`` as fixed-column MPS (columns ``C<j>``, rows ``R<i>``), which CBC reads reliably.

    Rows free on both sides are left out. With ``negate`` the objective is written negated (used
    to turn a maximization into a minimization). Returns the indices of the rows written.
    """
    if max(problem.num_cols, problem.num_rows) >= 10**7:
        raise ValueError(
            "the CBC backend writes 8-character MPS names and takes at most 9,999,999 rows/columns"
        )
    c = -problem.c if negate else problem.c
    lo, up = problem.row_lower, problem.row_upper
    kept = np.flatnonzero(np.isfinite(lo) | np.isfinite(up))
    lo, up = lo[kept], up[kept]
    A = sp.csc_matrix(problem.A[kept])
    kinds = np.where(lo == up, "E", np.where(np.isfinite(up), "L", "G"))
    lines = ["NAME          CETOPT", "ROWS", " N  OBJ"]
    lines += [f" {k}  R{i}" for i, k in enumerate(kinds)]
    lines.append("COLUMNS")
    marker = "    MARKER                 'MARKER'                 '{}'"
    integer = problem.integrality
    in_int = False
    for j in range(problem.num_cols):
        if integer[j] != in_int:
            in_int = bool(integer[j])
            lines.append(marker.format("INTORG" if in_int else "INTEND"))
        name = f"C{j}"
        a, b = A.indptr[j], A.indptr[j + 1]
        lines.append(f"    {name:<8}  OBJ       {float(c[j])!r}")
        lines += [f"    {name:<8}  R{r:<7}  {v}" for r, v in zip(A.indices[a:b].tolist(), _num(A.data[a:b]))]
    if in_int:
        lines.append(marker.format("INTEND"))
    rhs = np.where(kinds == "G", lo, up)
    lines.append("RHS")
    lines += [f"    RHS       R{i:<7}  {v}" for i, v in enumerate(_num(rhs)) if float(v) != 0.0]
    ranged = np.flatnonzero((kinds == "L") & np.isfinite(lo))
    if ranged.size:
        lines.append("RANGES")
        lines += [f"    RNG       R{i:<7}  {float(up[i] - lo[i])!r}" for i in ranged]
    lines.append("BOUNDS")
    for j, (lb, ub) in enumerate(zip(problem.col_lower.tolist(), problem.col_upper.tolist())):
        name = f"C{j}"
        if lb == ub:
            lines.append(f" FX BND       {name:<8}  {lb!r}")
            continue
        if lb == -np.inf and ub == np.inf:
            lines.append(f" FR BND       {name}")
            continue
        if lb == -np.inf:
            lines.append(f" MI BND       {name}")
        elif lb != 0.0:
            lines.append(f" LO BND       {name:<8}  {lb!r}")
        # Explicit upper bounds everywhere: some readers default integer columns to [0, 1].
        lines.append(f" UP BND       {name:<8}  {ub!r}" if ub != np.inf else f" PL BND       {name}")
    lines.append("ENDATA")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
        fh.write("\n")
    return kept


_STATUS_WORDS = [
    ("Optimal", Status.OPTIMAL),
    ("Infeasible", Status.INFEASIBLE),
    ("Integer infeasible", Status.INFEASIBLE),
    ("Unbounded", Status.UNBOUNDED),
    ("Stopped on time", Status.TIME_LIMIT),
    ("Stopped on", Status.STOPPED),
    ("Stopped", Status.STOPPED),
]


def _read_solution_file(path: str, n: int) -> tuple[str, np.ndarray | None]:
    with open(path) as fh:
        head = fh.readline().strip()
        x = np.zeros(n)
        for line in fh:
            parts = line.replace("**", " ").split()
            if len(parts) >= 3 and parts[1].startswith("C") and parts[1][1:].isdigit():
                x[int(parts[1][1:])] = float(parts[2])
    return head, x


class CbcSolver(Solver):
    """COIN-OR CBC as bundled with PuLP. Capabilities: MIP, time limit, warm start; bound when CBC prints one.

    ``options`` maps CBC command-line switches to values, e.g. ``{"threads": 2, "cuts": "off"}``
    becomes ``-threads 2 -cuts off``.
    """

    name = "cbc"
    capabilities = Capabilities(mip=True, time_limit=True, dual_bound=False, warm_start=True, options=True)

    @classmethod
    def available(cls) -> bool:
        return cbc_path() is not None

    def solve(
        self,
        problem: MILP,
        time_limit: float | None = None,
        mip_gap: float | None = None,
        *,
        start: np.ndarray | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Solution:
        binary = cbc_path()
        if binary is None:
            raise RuntimeError("CBC is not available: install PuLP (pip install pulp)")
        first = self._run(binary, problem, time_limit, mip_gap, start, options, ())
        if first.status != Status.UNBOUNDED:
            return first
        # CBC's dual simplex calls LPs with right-hand sides past ~1e15 unbounded; primal simplex
        # only says so on a ray, so an "unbounded" stands only if primal simplex confirms it.
        second = self._run(binary, problem, time_limit, mip_gap, start, options, ("-primalS",))
        if second.status == Status.UNBOUNDED:
            return first
        return dataclasses.replace(
            second, message=f"{second.message} (dual simplex had said unbounded; primal simplex did not)"
        )

    def _run(self, binary, problem, time_limit, mip_gap, start, options, extra) -> Solution:
        negate = problem.sense == "max"
        with tempfile.TemporaryDirectory(prefix="cetopt-cbc-") as tmp:
            model, sol = os.path.join(tmp, "model.mps"), os.path.join(tmp, "model.sol")
            exact = os.path.join(tmp, "model.bin")
            rows = write_mps(problem, model, negate=negate).size
            cmd = [binary, model, "-timeMode", "elapsed", "-ratio", repr(0.0 if mip_gap is None else mip_gap)]
            if time_limit is not None:
                cmd += ["-sec", repr(float(time_limit))]
            if start is not None:
                mst = os.path.join(tmp, "start.mst")
                _write_start(mst, start, problem.c if not negate else -problem.c)
                cmd += ["-mips", mst]
            for key, value in (options or {}).items():
                cmd += [f"-{key}", str(value)]
            cmd += [*extra, "-solve", "-solu", sol, "-saveS", exact]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - t0
            if not os.path.exists(sol):
                tail = (run.stdout + run.stderr)[-800:]
                raise RuntimeError(f"CBC exited with code {run.returncode} and wrote no solution: {tail}")
            head, x = _read_solution_file(sol, problem.num_cols)
            cbc_objective, x_exact = _read_saved_solution(exact, rows, problem.num_cols)
        if x_exact is not None:
            x = x_exact  # the text file has 8 significant digits; the binary one is exact
        solution = self._make_solution(problem, head, x, run.stdout, elapsed, negate, mip_gap)
        if solution.x is not None and cbc_objective is not None:
            # CBC's own objective, so that cetopt.solve compares it with c·x
            reported = (-cbc_objective if negate else cbc_objective) + problem.offset
            solution = dataclasses.replace(solution, objective=reported, gap=None)
        return solution

    def _make_solution(self, problem, head, x, log, elapsed, negate, mip_gap) -> Solution:
        status = next((s for word, s in _STATUS_WORDS if head.startswith(word)), Status.ERROR)
        stats: dict[str, Any] = {"native_status": head}
        m = re.search(r"Enumerated nodes:\s+(\d+)", log)
        if m:
            stats["nodes"] = int(m.group(1))
        objective = bound = None
        has_point = (
            status in (Status.OPTIMAL, Status.TIME_LIMIT, Status.STOPPED) and "no solution" not in head
        )
        if status in (Status.TIME_LIMIT, Status.STOPPED) and "objective value" not in head:
            has_point = False
        if has_point and status != Status.OPTIMAL and problem.violation(x) > 1e-5:
            has_point = False  # a stopped run may list an infeasible point; never return it as a solution
        if has_point:
            objective = problem.objective_value(x)
        else:
            x = None
        lower = re.search(r"Lower bound:\s+([-+0-9.eE]+)", log)
        if lower:
            raw = _printed_lower_bound(lower.group(1))
            bound = (-raw if negate else raw) + problem.offset
        elif status == Status.OPTIMAL and not mip_gap and objective is not None:
            bound = objective  # proven optimal with no gap tolerance
        if status == Status.OPTIMAL and not problem.is_mip and objective is not None:
            bound = objective
        return Solution(
            status=status,
            x=x,
            objective=objective,
            bound=bound,
            time=elapsed,
            solver=self.name,
            message=head,
            stats=stats,
        )


def _read_saved_solution(path: str, rows: int, cols: int) -> tuple[float | None, np.ndarray | None]:
    """CBC's binary ``-saveSolution`` file: objective and column values at full double precision.

    Layout: two int32 (rows, columns), the objective, then row activities, row duals, column
    values and reduced costs as float64. Anything else (missing, other sizes) gives ``None``.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None, None
    if len(data) < 8:
        return None, None
    m, n = (int(v) for v in np.frombuffer(data[:8], dtype=np.int32))
    values = np.frombuffer(data[8:], dtype=np.float64)
    if (m, n) != (rows, cols) or values.size != 1 + 2 * m + 2 * n:
        return None, None
    return float(values[0]), values[1 + 2 * m : 1 + 2 * m + n].copy()


def _printed_lower_bound(text: str) -> float:
    """A sound lower bound from CBC's printed one, which it rounds (e.g. ``13.254`` for 13.25405).

    Half a unit of the last printed digit is subtracted, so the result never exceeds the true bound.
    """
    value = float(text)
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return value - 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def _write_start(path: str, start: np.ndarray, c: np.ndarray) -> None:
    value = float(c @ start)
    lines = ["Feasible - objective value " + repr(value)]
    lines += [f"{j} C{j} {float(v)!r} 0" for j, v in enumerate(start) if v != 0.0]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
