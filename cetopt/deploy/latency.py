"""Latency measurement: candidates timed round-robin in one process, so load drifts hit them alike.

Each call is timed twice: wall clock (``time.perf_counter``) and the process's CPU time
(``time.process_time``, every thread of the process). On a shared, loaded machine the wall clock
includes the time the process waited for a core; CPU time does not, so it is the steadier measure
of the work a mode does (with one intra-op thread it is the latency an idle core would see).
Speed-ups are medians of per-round ratios: round ``i``'s baseline call over round ``i``'s
candidate call, so a load spike that lasts a round cancels.
"""

from __future__ import annotations

import math
import os
import re
import resource
import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["measure_latency", "peak_rss_mb", "peak_rss_of_call", "rss_mb"]


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_of_call(fn: Callable[[], object]) -> dict | None:
    """The process's peak resident memory (MiB) during one call of ``fn``.

    The kernel's high-water mark is reset first (``/proc/self/clear_refs``), so the figure is this
    call's peak: every model alive in the process plus what the call allocates.

    Returns
    -------
    dict or None
        ``peak_mb`` (the peak) and ``over_rss_mb`` (the peak less the resident memory just
        before the call: what the call itself needed); None where procfs does not offer it.
    """
    try:
        before = rss_mb()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    with torch.inference_mode():
        fn()
    with open("/proc/self/status") as fh:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", fh.read())
    if not found:
        return None
    peak = int(found.group(1)) / 1024
    return {"peak_mb": peak, "over_rss_mb": peak - before}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def _summary(wall: list[float], cpu: list[float]) -> dict:
    p25, med, p75 = _quartiles(wall)
    c25, cmed, c75 = _quartiles(cpu)
    return {
        "median_s": med,
        "p25_s": p25,
        "p75_s": p75,
        "min_s": min(wall),
        "max_s": max(wall),
        "cpu_median_s": cmed,
        "cpu_p25_s": c25,
        "cpu_p75_s": c75,
        "runs": len(wall),
    }


def measure_latency(
    candidates: Mapping[str, Callable[[], object]],
    *,
    runs: int = 20,
    warmup: int = 2,
    baseline: str | None = None,
    runs_for: Mapping[str, int] | None = None,
    min_sample_s: float = 0.0,
) -> dict:
    """Time each candidate ``runs`` times, interleaved (one call of each per round, rotated).

    Parameters
    ----------
    candidates : dict of str to callable
        Zero-argument calls (the model on fixed inputs).
    runs, warmup : int
    baseline : str, optional
        Add speed-ups against this candidate to every entry: ``speedup`` and ``cpu_speedup`` are
        the medians of the per-round ratios (baseline time / candidate time, wall and CPU) over
        the rounds both ran, ``speedup_p25`` … ``cpu_speedup_p75`` their quartiles, and
        ``speedup_of_medians`` the ratio of the two wall-clock medians.
    runs_for : dict of str to int, optional
        Fewer runs for candidates too slow for ``runs`` (they drop out of later rounds).
    min_sample_s : float
        When the baseline's call (its fastest warm-up call) takes less, every candidate is called
        ``k`` times in a row per sample, the same ``k`` for all, chosen so a baseline sample lasts
        about this long; the figures are per call. Sub-millisecond calls timed one by one are
        dominated by timer and cache noise.

    Returns
    -------
    dict
        Per candidate: wall-clock median, quartiles, min, max, CPU-time median and quartiles
        (seconds), runs, and the speed-ups when ``baseline`` is given.
    """
    runs_for = dict(runs_for or {})
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    fastest: dict[str, float] = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            fastest[name] = math.inf
            for _ in range(max(warmup, 1 if min_sample_s > 0 else 0)):
                t0 = time.perf_counter()
                fn()
                fastest[name] = min(fastest[name], time.perf_counter() - t0)
        # one count for every candidate (from the baseline's, else the slowest's, fastest warm-up
        # call): a sample's first call finds the caches cold after the other candidates ran, and
        # a candidate repeated fewer times would pay that more per call
        ref = fastest[baseline] if baseline is not None else max(fastest.values(), default=0.0)
        k = 1 if min_sample_s <= 0 else max(1, min(1000, math.ceil(min_sample_s / max(ref, 1e-7))))
        repeat = dict.fromkeys(candidates, k)
        names = list(candidates)
        for i in range(runs):
            # round i starts at candidate i (mod n): every candidate runs after every other one
            # equally often, so a cold cache after a different engine's call hits them alike
            for name in names[i % len(names) :] + names[: i % len(names)]:
                if i >= runs_for.get(name, runs):
                    continue
                fn, k = candidates[name], repeat[name]
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(k):
                    fn()
                t1, c1 = time.perf_counter(), time.process_time()
                wall[name].append((t1 - t0) / k)
                cpu[name].append((c1 - c0) / k)
    out = {k: {**_summary(wall[k], cpu[k]), "calls_per_sample": repeat[k]} for k in candidates}
    if baseline is not None:
        for k, v in out.items():
            n = min(len(wall[k]), len(wall[baseline]))
            ratios = [wall[baseline][i] / wall[k][i] for i in range(n)]
            cpu_ratios = [cpu[baseline][i] / max(cpu[k][i], 1e-9) for i in range(n)]
            lo, med, hi = _quartiles(ratios)
            clo, cmed, chi = _quartiles(cpu_ratios)
            v.update(
                speedup=med,
                speedup_p25=lo,
                speedup_p75=hi,
                cpu_speedup=cmed,
                cpu_speedup_p25=clo,
                cpu_speedup_p75=chi,
                speedup_of_medians=out[baseline]["median_s"] / v["median_s"],
            )
    return out
