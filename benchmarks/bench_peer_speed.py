"""The bit-allocation benchmark's ``peer_speed`` row alone (see :mod:`benchmarks.bench_bit_allocation`)."""

from __future__ import annotations

from benchmarks.bench_bit_allocation import run_peer_speed


def run(quick: bool = False) -> dict:
    return run_peer_speed(quick)
