"""One-pass vs sequential calibration of the 10× plans, on the digits ResNet and the MNIST-1D CNN,
over ten seeds: the check of the bit-allocation target (ILP + cet within 0.5 pp of fp32 at 10×,
no fine-tuning), with a standard error small enough to read it. Earlier runs used seeds 0–2; the
rows were kept and seeds 3–9 added before any of them had been run.

For each model and seed, three plans at the 10× budget (as in ``bit_allocation``): ILP + cet per
layer (16 probes), ILP + cet per channel (64 probes), and uniform 3-bit. Each is quantized with
GPTQ rounding and bias correction calibrated two ways on the training split (the calibration
data): all layers at once on the float model's inputs (``one-pass``), and layer by layer on the
inputs the quantized model gives each layer (``sequential``, the default of ``cetopt compress``).
No gradient steps; same bits and bytes in both. Accuracy is top-1 on the test split. Time is the
sequential calibration's as a ratio to the one-pass calibration's, measured in the same run.
"""

from __future__ import annotations

import time

from benchmarks.harness import mean_sd
from cetopt.allocation import allocate
from cetopt.analysis import channel_bits, channel_sensitivity, sensitivity
from cetopt.quant.apply import quantize
from cetopt.zoo import accuracy, load_dataset, load_model, zoo_entry

BITS = (2, 3, 4, 5, 6, 8)
CALIBRATION = "train"


def _plans(model, loader, quick: bool) -> dict[str, dict]:
    layer = sensitivity(model, loader, BITS, "cet", probes=8 if quick else 16, progress=False)
    channel = channel_sensitivity(model, loader, BITS, "cet", probes=32 if quick else 64, progress=False)
    return {
        "ilp+cet": allocate(layer, "10x").bits,
        "ilp+cet-channel": channel_bits(allocate(channel, "10x")),
        "uniform-3bit": dict.fromkeys(layer.layers, 3),
    }


def _one(name: str, seed: int, quick: bool) -> dict:
    data = load_dataset(zoo_entry(name).dataset)
    model = load_model(name, seed=seed, progress=False)
    loader = data.loader(CALIBRATION, batch_size=512)
    row = {"model": name, "seed": seed, "fp32_accuracy": accuracy(model, data.x_test, data.y_test)}
    for plan, bits in _plans(model, loader, quick).items():
        entry = {}
        for mode, sequential in (("one-pass", False), ("sequential", True)):
            t0 = time.perf_counter()
            quantized = quantize(model, bits, gptq=loader, bias_correction=loader, sequential=sequential)
            entry[f"{mode}_seconds"] = time.perf_counter() - t0
            entry[mode] = accuracy(quantized, data.x_test, data.y_test)
        entry["time_ratio"] = entry["sequential_seconds"] / entry["one-pass_seconds"]
        row[plan] = entry
    return row


def run(quick: bool = False) -> dict:
    seeds = [0] if quick else list(range(10))
    rows = []
    for name in ("digits-resnet", "mnist1d-cnn"):
        for seed in seeds:
            rows.append(_one(name, seed, quick))
            print(f"   {rows[-1]}", flush=True)
    summary = {}
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        entry = {"fp32": mean_sd([r["fp32_accuracy"] for r in mine])}
        for plan in ("ilp+cet", "ilp+cet-channel", "uniform-3bit"):
            for mode in ("one-pass", "sequential"):
                entry[f"{plan} {mode}"] = mean_sd([r[plan][mode] for r in mine])
                entry[f"{plan} {mode} minus fp32 (pp)"] = mean_sd(
                    [100 * (r[plan][mode] - r["fp32_accuracy"]) for r in mine]
                )
            entry[f"{plan} time ratio sequential/one-pass"] = mean_sd([r[plan]["time_ratio"] for r in mine])
        summary[name] = entry
    return {"bits": BITS, "calibration_split": CALIBRATION, "runs": rows, "summary": summary}
