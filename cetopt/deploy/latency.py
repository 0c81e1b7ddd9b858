"""Latency measurement: candidates timed round-robin in one process, so load drifts hit them alike."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["measure_latency", "peak_rss_mb", "rss_mb"]


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "p25_s": q[0],
        "p75_s": q[2],
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
    }


def measure_latency(
    candidates: Mapping[str, Callable[[], object]],
    *,
    runs: int = 20,
    warmup: int = 2,
    baseline: str | None = None,
    runs_for: Mapping[str, int] | None = None,
) -> dict:
    """Time each candidate ``runs`` times, interleaved (one call of each per round).

    Parameters
    ----------
    candidates : dict of str to callable
        Zero-argument calls (the model on fixed inputs).
    runs, warmup : int
    baseline : str, optional
        Add ``speedup`` (baseline median / candidate median) to every entry.
    runs_for : dict of str to int, optional
        Fewer runs for candidates too slow for ``runs`` (they drop out of later rounds).

    Returns
    -------
    dict
        Per candidate: median, quartiles, min, max (seconds), runs, and ``speedup``.
    """
    runs_for = dict(runs_for or {})
    times: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        for i in range(runs):
            for name, fn in candidates.items():
                if i >= runs_for.get(name, runs):
                    continue
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    out = {k: _summary(v) for k, v in times.items()}
    if baseline is not None:
        base = out[baseline]["median_s"]
        for v in out.values():
            v["speedup"] = base / v["median_s"]
    return out
