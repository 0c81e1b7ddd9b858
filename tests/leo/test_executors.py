"""Executors: the Ray cluster and flaky tasks give the same decisions; twice-failed tasks keep their unit."""

import numpy as np
import pytest

import cetopt
from cetopt.leo.exhaustive import exhaustive_states
from cetopt.leo.network import extract
from cetopt.solving.executors import Executor, Outcome, ThreadExecutor, map_tasks, run_with_retry
from tests.leo.nets import tiny_mlp

SOLVER_STAGES = ("interval", "milp")


class Flaky(Executor):
    """Raises on the first ``fail`` attempts of every item (``fail=None``: always)."""

    name = "flaky"

    def __init__(self, fail: int | None = 1):
        self.fail, self.attempts, self.inner = fail, {}, ThreadExecutor(1)

    def outcomes(self, fn, items):
        out = []
        for item in items:
            n = self.attempts[id(item)] = self.attempts.get(id(item), 0) + 1
            if self.fail is None or n <= self.fail:
                out.append(Outcome(False, error=RuntimeError("worker died")))
            else:
                out.append(self.inner.outcomes(fn, [item])[0])
        return out


def _model():
    return tiny_mlp(1, widths=(6, 6, 6, 6))


def _run(**kwargs):
    return cetopt.find_stable_units(_model(), (-1.0, 1.0), stages=SOLVER_STAGES, workers=1, **kwargs)


def test_retry_once_then_give_up():
    out, failed = run_with_retry(Flaky(1), lambda x: x * 2, [1, 2, 3])
    assert [o.value for o in out] == [2, 4, 6] and failed == []
    out, failed = run_with_retry(Flaky(2), lambda x: x * 2, [1, 2])
    assert failed == [0, 1] and not out[0].ok
    with pytest.raises(RuntimeError):
        map_tasks(lambda x: x, [1], Flaky(None))
    assert map_tasks(lambda x: x + 1, [1, 2], "thread", 2) == [2, 3]


def test_a_failed_task_is_retried_with_the_same_decisions():
    local = _run()
    flaky = _run(executor=Flaky(1))
    assert all(np.array_equal(a.state, b.state) for a, b in zip(local.layers, flaky.layers))
    assert flaky.extra["failed_tasks"] == [] and local.milps > 0


def test_a_task_that_fails_twice_keeps_its_unit():
    truth = exhaustive_states(extract(_model(), (2,)), -np.ones(2), np.ones(2))
    with pytest.warns(RuntimeWarning, match="failed twice"):
        report = _run(executor=Flaky(None))
    assert report.extra["failed_tasks"] and report.stage_counts()["failed"] > 0
    for layer, t in zip(report.layers, truth):
        stable = layer.state != 0
        assert np.array_equal(layer.state[stable], t[stable])  # nothing wrongly removed
        assert all(s in ("interval", "failed", "skipped") for s in layer.stage)


def test_ray_executor_gives_identical_decisions():
    ray = pytest.importorskip("ray")
    from cetopt.solving.executors import RayExecutor

    local = _run()
    try:
        remote = _run(executor=RayExecutor(num_cpus=2))
        assert remote.extra["executor"] == "ray"
        for a, b in zip(local.layers, remote.layers):
            assert np.array_equal(a.state, b.state) and a.stage == b.stage
    finally:
        ray.shutdown()
