"""cetopt's benchmark suite: ``python -m benchmarks [NAME ...] [--quick]``.

Each ``bench_<name>.py`` module defines ``run(quick: bool) -> dict``. The runner adds machine
information and writes ``benchmarks/results/<name>.json`` atomically. Benchmarks are not tests:
they measure speed and quality; the test suite checks correctness.
"""
