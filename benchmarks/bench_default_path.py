"""The README's zoo figures with ``compress``'s defaults: accuracy at 10x, per layer and per channel.

``cetopt.compress(model, train split, "10x")`` with every default (``method="auto"``, sequential
GPTQ + bias correction), per layer and with ``per_channel=True``, on the digits ResNet and the
MNIST-1D CNN over the seeds of ``benchmarks/results/bit_allocation.json``, next to that file's
``accuracy_sequential`` of the ILP + cet and ILP + measured plans on the same seeds (the figures
before ``auto`` was the default). Test accuracy; nothing is tuned on the test split.
"""

from __future__ import annotations

import os

from benchmarks.bench_bit_allocation import run_default_path


def run(quick: bool = False) -> dict:
    """``CETOPT_DEFAULT_PATH_KINDS`` (comma-separated ``per_layer``, ``per_channel``) picks the rows."""
    kinds = os.environ.get("CETOPT_DEFAULT_PATH_KINDS", "per_layer,per_channel")
    return {**run_default_path(quick, kinds=tuple(kinds.split(","))), "kinds": kinds}
