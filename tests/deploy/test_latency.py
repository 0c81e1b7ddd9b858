import sys
import time

import pytest

from cetopt.deploy.latency import measure_latency, peak_rss_of_call


def test_round_robin_rotates_and_ratios_are_per_round():
    calls = []
    cands = {k: (lambda k=k: calls.append(k)) for k in ("fp32", "a", "b")}
    out = measure_latency(cands, runs=6, warmup=0, baseline="fp32", runs_for={"b": 3})
    assert [out[k]["runs"] for k in cands] == [6, 6, 3]
    # round i starts at candidate i mod 3; b drops out after round 3
    assert calls[:9] == ["fp32", "a", "b", "a", "b", "fp32", "b", "fp32", "a"]
    assert out["fp32"]["speedup"] == out["fp32"]["cpu_speedup"] == 1.0
    for v in out.values():
        assert v["p25_s"] <= v["median_s"] <= v["p75_s"] and v["cpu_median_s"] >= 0
        assert v["speedup_p25"] <= v["speedup"] <= v["speedup_p75"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs")
def test_peak_rss_of_a_call_sees_its_own_allocation():
    def allocate():
        block = bytearray(64 * 2**20)
        block[::4096] = b"\x01" * (len(block) // 4096)  # touch every page
        return len(block)

    seen = peak_rss_of_call(allocate)
    assert seen["over_rss_mb"] >= 48 and seen["peak_mb"] >= seen["over_rss_mb"]
    assert peak_rss_of_call(lambda: None)["over_rss_mb"] < 16


def test_fast_calls_are_repeated_per_sample_the_same_number_of_times():
    calls = []
    cands = {"fp32": lambda: calls.append(1), "slow": lambda: time.sleep(1e-4)}
    out = measure_latency(cands, runs=3, warmup=1, min_sample_s=1e-3, baseline="fp32")
    k = out["fp32"]["calls_per_sample"]
    assert k > 1 and out["slow"]["calls_per_sample"] == k and len(calls) == 1 + 3 * k
    assert out["slow"]["median_s"] >= 1e-4  # per call, not per sample
