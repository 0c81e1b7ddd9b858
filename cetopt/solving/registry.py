"""Name → backend registry, filled by :func:`register_solver` and the ``cetopt.solvers`` entry points.

Built-in backends are declared as entry points in cetopt's own ``pyproject.toml`` and load through
exactly the path a third-party plugin takes. Entry points load lazily: a backend's module is only
imported when it is first asked for, and a plugin that fails to import shows up as unavailable
(with its error) instead of breaking ``import cetopt``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass

from cetopt.errors import SolverRegistrationError, UnknownSolverError
from cetopt.solving.base import Capabilities, Solver

__all__ = ["SolverInfo", "available_solvers", "get_solver", "register_solver", "unregister_solver"]

ENTRY_POINT_GROUP = "cetopt.solvers"

# Used only when cetopt runs from a source tree that was never installed, so that the package
# metadata (and with it our own entry points) is missing.
_BUILTIN_FALLBACK = {
    "highs": "solvers.highs:HighsSolver",
    "cbc": "solvers.cbc:CbcSolver",
    "cvxpy": "solvers.cvxpy:CvxpySolver",
}


@dataclass
class _Entry:
    name: str
    origin: str
    cls: type[Solver] | None = None
    target: str | None = None  # "module:attr", loaded on first use
    load_error: str | None = None
    clashes: tuple[str, ...] = ()  # other entry points that claimed this name, ignored

    def load(self) -> type[Solver] | None:
        if self.cls is None and self.load_error is None and self.target is not None:
            module_name, _, attr = self.target.partition(":")
            try:
                obj = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
                _check_solver_class(obj)
                self.cls = obj
            except Exception as exc:  # a broken plugin must not break the registry
                self.load_error = f"{type(exc).__name__}: {exc}"
        return self.cls


@dataclass(frozen=True)
class SolverInfo:
    """One row of :func:`available_solvers`: a registered backend and whether it can run here.

    ``clashes`` lists the other entry points that claim the same name; they are ignored (a built-in
    always wins; between plugins, the first target in sorted order) until one is registered
    explicitly with ``register_solver(cls, replace=True)``.
    """

    name: str
    available: bool
    capabilities: Capabilities | None
    origin: str
    reason: str = ""
    clashes: tuple[str, ...] = ()
    """Entry points (``module:attr``) that also claim this name and were ignored."""


_lock = threading.RLock()
_entries: dict[str, _Entry] = {}
_entry_points_loaded = False


def _check_solver_class(cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise SolverRegistrationError(f"{cls!r} is not a subclass of cetopt.Solver")
    if not isinstance(cls.name, str) or not cls.name:
        raise SolverRegistrationError(f"{cls.__name__} must set a non-empty string attribute 'name'")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for name, (target, others) in _claims().items():
        if name not in _entries:
            _entries[name] = _Entry(name=name, origin=f"entry point {target}", target=target, clashes=others)


def _claims() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Name → (the target that gets it, the other targets claiming it), built-ins first."""
    claims: dict[str, list[str]] = {name: [target] for name, target in _BUILTIN_FALLBACK.items()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        targets = claims.setdefault(ep.name, [])
        if ep.value not in targets:
            targets.append(ep.value)
    out = {}
    for name, targets in claims.items():
        winner = _BUILTIN_FALLBACK.get(name) or min(targets)
        out[name] = (winner, tuple(sorted(t for t in targets if t != winner)))
    return out


def register_solver(cls: type[Solver] | None = None, *, name: str | None = None, replace: bool = False):
    """Register a :class:`cetopt.Solver` subclass so ``solver="<name>"`` selects it everywhere.

    Usable as a plain call or as a class decorator (``@register_solver`` or
    ``@register_solver(replace=True)``).

    Parameters
    ----------
    cls : type
        The backend class.
    name : str, optional
        Registry name; defaults to ``cls.name``.
    replace : bool
        Allow replacing a backend already registered under that name.

    Raises
    ------
    SolverRegistrationError
        If ``cls`` is not a Solver subclass, or the name is taken and ``replace`` is false.
    """
    if cls is None:
        return lambda c: register_solver(c, name=name, replace=replace)
    _check_solver_class(cls)
    key = name or cls.name
    with _lock:
        _load_entry_points()
        if key in _entries and not replace:
            raise SolverRegistrationError(
                f"a solver named {key!r} is already registered ({_entries[key].origin}); "
                "pass replace=True to replace it"
            )
        _entries[key] = _Entry(
            name=key, origin=f"register_solver({cls.__module__}.{cls.__qualname__})", cls=cls
        )
    return cls


def unregister_solver(name: str) -> None:
    """Remove a registered backend (mostly useful in tests)."""
    with _lock:
        _load_entry_points()
        if name not in _entries:
            raise UnknownSolverError(f"no solver named {name!r} is registered")
        del _entries[name]


def _refresh_entry_points() -> None:
    """Forget what the entry points provided and read them again (after installing a plugin)."""
    global _entry_points_loaded
    with _lock:
        for key in [k for k, e in _entries.items() if e.target is not None]:
            del _entries[key]
        _entry_points_loaded = False
        _load_entry_points()


def _available(cls: type[Solver]) -> tuple[bool, str]:
    try:
        ok = bool(cls.available())
    except Exception as exc:
        return False, f"available() raised {type(exc).__name__}: {exc}"
    return ok, "" if ok else "its dependency is not installed"


def available_solvers() -> list[SolverInfo]:
    """Every registered backend, whether it can run here, and what it can do.

    Returns
    -------
    list of SolverInfo
        Sorted by name.
    """
    with _lock:
        _load_entry_points()
        entries = list(_entries.values())
    rows = []
    for entry in sorted(entries, key=lambda e: e.name):
        cls = entry.load()
        if cls is None:
            rows.append(
                SolverInfo(entry.name, False, None, entry.origin, entry.load_error or "", entry.clashes)
            )
            continue
        ok, reason = _available(cls)
        rows.append(SolverInfo(entry.name, ok, cls.capabilities, entry.origin, reason, entry.clashes))
    return rows


def get_solver(solver: str | Solver | type[Solver]) -> Solver:
    """Resolve a name, a Solver class or a Solver instance to an instance.

    Raises
    ------
    UnknownSolverError
        If no backend has that name; the message lists the registered ones and which can run.
    """
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, type):
        _check_solver_class(solver)
        return solver()
    if not isinstance(solver, str):
        raise UnknownSolverError(f"solver must be a name, a Solver class or instance; got {solver!r}")
    with _lock:
        _load_entry_points()
        entry = _entries.get(solver)
    if entry is None:
        listing = ", ".join(
            f"{info.name}{'' if info.available else ' (unavailable)'}" for info in available_solvers()
        )
        raise UnknownSolverError(f"unknown solver {solver!r}; registered solvers: {listing}")
    cls = entry.load()
    if cls is None:
        raise UnknownSolverError(f"solver {solver!r} could not be loaded: {entry.load_error}")
    return cls()
