"""Shared benchmark plumbing: machine information, timing, and result files."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cetopt._io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"

#: The joint menu's grids on real-size models (:func:`cetopt.lowrank.build_menu`): fewer ranks
#: and densities than the defaults, so that one menu fits a shared CPU.
SMALL_JOINT_MENU = {
    "rank_fractions": (1 / 16, 1 / 8, 1 / 4),
    "prune_densities": (0.1, 0.3, 0.5),
    "ls_rank_fractions": (1 / 16, 1 / 8),
    "ls_densities": (0.03, 0.1),
    "iterations": 10,
}

_PACKAGES = ("numpy", "scipy", "torch", "highspy", "PuLP", "cvxpy", "networkx", "scikit-learn")


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "git_commit": commit,
        "packages": versions,
    }


def forward_backward_seconds(model, batches: list, loss_fn=None) -> dict:
    """Wall and CPU seconds of one forward+backward pass over ``batches`` of ``(inputs, targets)``
    (``loss_fn(outputs, targets)``, default cross-entropy): the unit model work is counted in."""
    import torch

    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in batches:
        loss_fn(model(x), y).backward()
    seconds = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    model.zero_grad(set_to_none=True)
    return seconds


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``ru_maxrss``), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` once; return its value and the wall-clock seconds it took."""
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def best_of(fn: Callable[[], Any], repeats: int = 3) -> tuple[Any, float]:
    """Fastest of ``repeats`` runs (the least disturbed by a noisy machine)."""
    best, value = float("inf"), None
    for _ in range(repeats):
        value, seconds = timed(fn)
        best = min(best, seconds)
    return value, best


def with_deadline(fn: Callable[[], Any], deadline: float) -> tuple[Any, float, bool]:
    """Run ``fn`` in a forked child process, killed after ``deadline`` seconds.

    Some solvers do not check their own time limit inside every heuristic; a benchmark must not
    hang on them. Returns ``(value, seconds, finished)``; ``value`` is ``None`` when killed.
    ``fn``'s return value must be picklable.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target():
        try:
            child.send(("ok", fn()))
        except BaseException as exc:  # report, do not hang the parent
            child.send(("error", f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=target, daemon=True)
    t0 = time.perf_counter()
    proc.start()
    finished = parent.poll(deadline)
    seconds = time.perf_counter() - t0
    if not finished:
        proc.kill()
        proc.join()
        return None, seconds, False
    kind, value = parent.recv()
    proc.join()
    if kind == "error":
        raise RuntimeError(value)
    return value, seconds, True


def write_result(name: str, data: dict[str, Any], *, quick: bool = False) -> Path:
    """Write ``results/<name>.json`` with machine information; quick runs go to the untracked
    ``results/quick/<name>.json``, so a smoke run never rewrites a committed result."""
    path = RESULTS / "quick" / f"{name}.json" if quick else RESULTS / f"{name}.json"
    return atomic_write_json(path, {"benchmark": name, "quick": quick, "machine": machine_info(), **data})


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "sd", "se", "n"}`` of ``values``: the sample standard deviation (0 for a single
    value) and the standard error of the mean, ``sd / √n``."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": float(mean), "sd": float(var**0.5), "se": float((var / n) ** 0.5), "n": n}
