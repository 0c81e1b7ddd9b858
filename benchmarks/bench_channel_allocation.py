"""Per-channel vs per-layer bit allocation at 10× smaller weights, no fine-tuning.

On the digits ResNet and the MNIST-1D CNN, for each seed, at the same 10× byte budget:

* per layer: ILP over the ``cet`` table (what ``cetopt compress`` does by default);
* per channel: ILP over measured per-channel sensitivities (``cetopt.channel_sensitivity``);
* uniform 3-bit, for reference (its real bytes may exceed 10×).

Every model is quantized with GPTQ rounding and bias correction on the calibration (train) split,
as ``cetopt compress`` does; accuracy is top-1 on the test split, which nothing here is tuned on.
Bytes are the quantized weights as ``cetopt.save`` writes them (codes, scales, bit widths). The
sensitivity time of each table is reported as a ratio to the per-layer ``measured`` table's,
computed in the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

import cetopt
from benchmarks.harness import mean_sd
from cetopt.analysis import channel_bits, channel_sensitivity, sensitivity
from cetopt.zoo import accuracy, load_dataset, load_model, zoo_entry

BITS = (2, 3, 4, 5, 6, 8)


def _timed(fn):
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def _evaluate(model, data, bits) -> dict:
    calibration = data.loader("train", batch_size=512)
    small = cetopt.quantize(model, bits, gptq=calibration, bias_correction=calibration)
    with tempfile.TemporaryDirectory() as tmp:
        saved = cetopt.save(small, Path(tmp) / "m.safetensors")
    return {"accuracy": accuracy(small, data.x_test, data.y_test), "weight_bytes": saved.quantized_bytes}


def _one(name: str, seed: int) -> dict:
    data = load_dataset(zoo_entry(name).dataset)
    model = load_model(name, seed=seed, progress=False)
    calibration = data.loader("train", batch_size=512)
    _, t_measured = _timed(lambda: sensitivity(model, calibration, BITS, "measured", progress=False))
    cet, t_cet = _timed(lambda: sensitivity(model, calibration, BITS, "cet", progress=False))
    channels, t_channels = _timed(lambda: channel_sensitivity(model, calibration, BITS, progress=False))
    layer_plan = cetopt.allocate(cet, "10x")
    channel_plan = cetopt.allocate(channels, "10x")
    row = {
        "model": name,
        "seed": seed,
        "fp32_accuracy": accuracy(model, data.x_test, data.y_test),
        "budget_bytes": layer_plan.budget_bytes,
        "channels": channels.num_layers,
        "sensitivity_seconds_ratio_to_layer_measured": {
            "cet": t_cet / t_measured,
            "measured-channel": t_channels / t_measured,
        },
        "per_layer_cet": {**_evaluate(model, data, layer_plan), "plan_bytes": layer_plan.bytes},
        "per_channel_measured": {
            **_evaluate(model, data, channel_bits(channel_plan)),
            "plan_bytes": channel_plan.bytes,
            "solver": channel_plan.solver,
            "status": channel_plan.status,
            "solve_seconds": channel_plan.solve_time,
            "bits_histogram": {
                int(b): int(n)
                for b, n in zip(*np.unique(list(channel_plan.bits.values()), return_counts=True))
            },
        },
        "uniform_3bit": _evaluate(model, data, dict.fromkeys(cet.layers, 3)),
    }
    return row


def _summary(rows: list[dict]) -> dict:
    out = {}
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]

        out[name] = {
            "fp32": mean_sd([r["fp32_accuracy"] for r in mine]),
            **{
                key: mean_sd([r[key]["accuracy"] for r in mine])
                for key in ("per_layer_cet", "per_channel_measured", "uniform_3bit")
            },
            "per_channel_minus_fp32_pp": mean_sd(
                [100 * (r["per_channel_measured"]["accuracy"] - r["fp32_accuracy"]) for r in mine]
            ),
            "per_channel_minus_per_layer_pp": mean_sd(
                [100 * (r["per_channel_measured"]["accuracy"] - r["per_layer_cet"]["accuracy"]) for r in mine]
            ),
        }
    return out


def run(quick: bool = False) -> dict:
    rows = []
    for name in ("digits-resnet", "mnist1d-cnn"):
        for seed in [0] if quick else [0, 1, 2]:
            rows.append(_one(name, seed))
            r = rows[-1]
            print(
                f"   {name} seed {seed}: fp32 {r['fp32_accuracy']:.4f}, per-layer "
                f"{r['per_layer_cet']['accuracy']:.4f}, "
                f"per-channel {r['per_channel_measured']['accuracy']:.4f}, "
                f"uniform-3bit {r['uniform_3bit']['accuracy']:.4f}",
                flush=True,
            )
    return {"bits": BITS, "calibration_split": "train", "runs": rows, "summary": _summary(rows)}
