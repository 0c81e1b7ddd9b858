"""ResNet-18 (224, batch 1) after the reduced activation range: the exact QDQ graph (U8S8
everywhere, inputs of 8-bit-weight layers on codes 0..127) vs onnxruntime fp32, next to the
full-range U8U8 fallback and the full-range U8S8 graph (which can saturate); torch int8 vs fp32.
One thread per engine; CPU seconds per call, all variants timed every round (ratios of medians).

Run: ``python -m benchmarks.bench_reduced_range [--runs N]``; writes
``benchmarks/results/latency_reduced_range.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_latency import THREADS, _cases, _quantize_all
from benchmarks.harness import RESULTS, atomic_write_json, machine_info
from cetopt.deploy import runtime
from cetopt.deploy.onnx_export import export_float_onnx, export_onnx, onnx_session


def run(runs: int = 20, names: tuple = ("resnet18",)) -> dict:
    torch.set_num_threads(THREADS)
    out = {"machine": machine_info(), "runs": runs, "threads": THREADS, "batch": 1, "models": {}}
    for name, model, make_input, calibration, _ in _cases(False):
        if name not in names:
            continue
        q = _quantize_all(model)
        x = make_input(1)
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            int8 = runtime(q, "int8", calibration=calibration)
            ranges = int8.activation_ranges
            export_float_onnx(q, Path(tmp) / "fp32.onnx", make_input(2))
            exact = export_onnx(q, Path(tmp) / "exact.onnx", make_input(2), activations=ranges)
            u8u8 = export_onnx(
                q, Path(tmp) / "u8u8.onnx", make_input(2), activations=ranges, activation_range="full"
            )
            u8s8 = export_onnx(
                q,
                Path(tmp) / "u8s8.onnx",
                make_input(2),
                activations=ranges,
                activation_range="full",
                weight_format="u8s8",
            )
            sessions = {
                k: onnx_session(Path(tmp) / f"{k}.onnx", threads=THREADS)
                for k in ("fp32", "exact", "u8u8", "u8s8")
            }
        feed = {"input0": x.numpy()}
        calls = {
            "torch-fp32": lambda m=model, x=x: m(x),
            "torch-int8": lambda m=int8, x=x: m(x),
            **{f"ort-{k}": (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()},
        }
        times = {k: [] for k in calls}
        with torch.no_grad():
            for f in calls.values():
                f()  # warm-up
            for _ in range(runs):
                for k, f in calls.items():
                    t = time.process_time()
                    f()
                    times[k].append(time.process_time() - t)
        med = {k: float(np.median(v)) for k, v in times.items()}
        reduced = sum(v == "reduced" for v in exact.activation_range.values())
        out["models"][name] = {
            "cpu_s_median": med,
            "cpu_s_spread_p10_p90": {
                k: [float(np.percentile(v, 10)), float(np.percentile(v, 90))] for k, v in times.items()
            },
            "ort_exact_vs_ort_fp32": med["ort-fp32"] / med["ort-exact"],
            "ort_u8u8_full_range_vs_ort_fp32": med["ort-fp32"] / med["ort-u8u8"],
            "ort_u8s8_full_range_vs_ort_fp32": med["ort-fp32"] / med["ort-u8s8"],
            "torch_int8_vs_torch_fp32": med["torch-fp32"] / med["torch-int8"],
            "layers_reduced_range": reduced,
            "layers_quantized": len(exact.quantized_layers),
            "check": {
                k: {
                    "max_abs_diff": r.max_abs_diff,
                    "tolerance": r.tolerance,
                    "within": r.max_abs_diff <= r.tolerance,
                }
                for k, r in (("exact", exact), ("u8u8", u8u8), ("u8s8_full_range", u8s8))
            },
        }
        print(name, {k: round(v, 4) for k, v in med.items()}, flush=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--models", default="resnet18")
    args = parser.parse_args()
    result = run(args.runs, tuple(args.models.split(",")))
    path = RESULTS / "latency_reduced_range.json"
    if path.exists():  # other models measured before stay
        import json

        old = json.loads(path.read_text())
        result["models"] = {**old.get("models", {}), **result["models"]}
    atomic_write_json(path, result)
