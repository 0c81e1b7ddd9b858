"""Where onnxruntime's time goes on the exact QDQ graphs (ResNet-18, MobileNetV2 at 224, batch 1).

Same process, interleaved rounds, 1 and 2 intra-op threads, CPU time and wall clock per call:

* ``ort-fp32``: the float graph (the baseline of every ratio);
* ``ort-qdq``: the default export: inputs of 8-bit-weight layers on the reduced range (codes
  0..127, exact U8S8 on any x86 CPU), grids shared along edges, residual adds quantized, the
  exact rewrites of ``fuse_qdq`` (``cetopt.deploy.grids``);
* ``ort-qdq-per-layer``: the graph of before (each layer's own grids, float requantization and
  float adds between layers: ``shared_grids=False, fuse=False``);
* ``ort-qdq-u8u8-full``: full-range inputs, U8U8 weights (exact, slow kernels);
* ``ortq-*``: onnxruntime's own ``quantize_static`` of the float graph (QDQ, per-channel or
  per-tensor weights, U8S8 or S8S8, full-range activations): not this definition and inexact
  where U8S8 saturates on CPUs without VNNI, timed as the reference of what onnxruntime's
  fusion reaches;
* session options on ``ort-qdq``: ``ORT_ENABLE_EXTENDED`` (no layout transformation) and
  spinning threads;
* ``torch-fp32`` / ``torch-int8``: PyTorch's float model and the ``int8`` mode, same grids.

Also per graph: the operators of onnxruntime's optimized graph, and a per-operator profile.

Run: ``python -m benchmarks.bench_reduced_range [--runs N] [--models resnet18,mobilenetv2]``;
writes ``benchmarks/results/latency_reduced_range.json`` (``--quick``: 64×64, 5 runs, under
``results/quick/``).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_latency import _cases, _quantize_all
from benchmarks.harness import RESULTS, atomic_write_json, machine_info
from cetopt.deploy import runtime
from cetopt.deploy.onnx_export import export_float_onnx, export_onnx

THREADS = (1, 2)


def _session(path, threads: int, level: str = "all", spinning: bool = False, optimized=None, profile=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_quantized(fp32: Path, tmp: Path, calibration: list) -> dict[str, Path]:
    """onnxruntime's own static QDQ quantization of the float graph, four weight/activation types."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            rows = [x[i : i + 1].numpy() for x in calibration for i in range(len(x))]
            self.batches = iter([{"input0": r} for r in rows])

        def get_next(self):
            return next(self.batches, None)

    pre = tmp / "pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    out = {}
    for per_channel in (True, False):
        for act, name in ((QuantType.QUInt8, "u8s8"), (QuantType.QInt8, "s8s8")):
            key = f"ortq-{'per-channel' if per_channel else 'per-tensor'}-{name}"
            path = tmp / f"{key}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(pre),
                    str(path),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                )
            out[key] = path
    return out


def _profile(path: Path, tmp: Path, feed: dict, threads: int, runs: int = 20) -> dict:
    """Per operator type: microseconds per call (onnxruntime's profiler, kernel time)."""
    session = _session(path, threads, profile=tmp / f"profile-{path.stem}")
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per[e["args"].get("op_name", "?")] += e["dur"]
    return {k: round(v / runs, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


def _optimized_ops(path: Path, tmp: Path) -> dict:
    import onnx

    target = tmp / f"optimized-{path.stem}.onnx"
    _session(path, 1, optimized=target)
    return dict(collections.Counter(n.op_type for n in onnx.load(target).graph.node))


def _check(r) -> dict:
    return {
        "max_abs_diff": r.max_abs_diff,
        "tolerance": r.tolerance,
        "within": r.max_abs_diff is not None and r.max_abs_diff <= r.tolerance,
    }


def _time(calls: dict, runs: int) -> dict:
    cpu = {k: [] for k in calls}
    wall = {k: [] for k in calls}
    keys = list(calls)
    with torch.no_grad():
        for f in calls.values():
            f()  # warm-up
        for r in range(runs):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # the order rotated every round
                t, w = time.process_time(), time.perf_counter()
                calls[k]()
                cpu[k].append(time.process_time() - t)
                wall[k].append(time.perf_counter() - w)
    return {
        k: {
            "cpu_median_s": float(np.median(cpu[k])),
            "cpu_p10_p90_s": [float(np.percentile(cpu[k], 10)), float(np.percentile(cpu[k], 90))],
            "wall_median_s": float(np.median(wall[k])),
        }
        for k in calls
    }


def run(quick: bool = False, runs: int | None = None, names: tuple = ("resnet18", "mobilenetv2")) -> dict:
    runs = runs or (5 if quick else 30)
    out = {
        "machine": machine_info(),
        "quick": quick,
        "runs": runs,
        "batch": 1,
        "threads": list(THREADS),
        "timing": "interleaved rounds, order rotated; ratios of medians against ort-fp32 (torch-int8: "
        "against torch-fp32), CPU time (process_time) and wall clock, same process",
        "models": {},
    }
    for name, model, make_input, calibration, _ in _cases(quick):
        if name not in names and not (quick and name == "resnet18"):
            continue
        q = _quantize_all(model)
        x = make_input(1)
        feed = {"input0": x.numpy()}
        entry = {}
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp_dir:
            warnings.simplefilter("ignore")
            tmp = Path(tmp_dir)
            int8 = runtime(q, "int8", calibration=calibration)
            ranges = int8.activation_ranges
            fp32 = Path(export_float_onnx(q, tmp / "fp32.onnx", make_input(2)))
            exports = {
                "ort-qdq": export_onnx(q, tmp / "qdq.onnx", make_input(2), activations=ranges),
                "ort-qdq-per-layer": export_onnx(
                    q,
                    tmp / "per-layer.onnx",
                    make_input(2),
                    activations=runtime(
                        q, "fake-int8", calibration=calibration, shared_grids=False
                    ).activation_ranges,
                    shared_grids=False,
                    fuse=False,
                ),
                "ort-qdq-u8u8-full": export_onnx(
                    q,
                    tmp / "u8u8.onnx",
                    make_input(2),
                    activations=runtime(
                        q, "fake-int8", calibration=calibration, activation_range="full"
                    ).activation_ranges,
                    activation_range="full",
                ),
            }
            paths = {"ort-fp32": fp32, **{k: Path(r.path) for k, r in exports.items()}}
            paths.update(_ort_quantized(fp32, tmp, calibration))
            entry["checks"] = {k: _check(r) for k, r in exports.items()}
            chosen = exports["ort-qdq"].activation_range.values()
            entry["activation_range"] = dict(collections.Counter(chosen))
            entry["optimized_graph_ops"] = {
                k: _optimized_ops(paths[k], tmp)
                for k in ("ort-fp32", "ort-qdq", "ort-qdq-per-layer", "ortq-per-channel-u8s8")
            }
            for threads in THREADS:
                torch.set_num_threads(threads)
                sessions = {k: _session(p, threads) for k, p in paths.items()}
                sessions["ort-qdq (ORT_ENABLE_EXTENDED)"] = _session(paths["ort-qdq"], threads, "extended")
                sessions["ort-qdq (spinning threads)"] = _session(paths["ort-qdq"], threads, spinning=True)
                calls = {
                    "torch-fp32": lambda m=model, x=x: m(x),
                    "torch-int8": lambda m=int8, x=x: m(x),
                    **{k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()},
                }
                timed = _time(calls, runs)
                ratios = {
                    k: {
                        "cpu": timed["ort-fp32"]["cpu_median_s"] / v["cpu_median_s"],
                        "wall": timed["ort-fp32"]["wall_median_s"] / v["wall_median_s"],
                    }
                    for k, v in timed.items()
                    if k.startswith("ort")
                }
                ratios["torch-int8 vs torch-fp32"] = {
                    "cpu": timed["torch-fp32"]["cpu_median_s"] / timed["torch-int8"]["cpu_median_s"],
                    "wall": timed["torch-fp32"]["wall_median_s"] / timed["torch-int8"]["wall_median_s"],
                }
                entry[f"threads{threads}"] = {
                    "times": timed,
                    "speedup_vs_ort_fp32": ratios,
                    "profile_us_per_call": {
                        k: _profile(paths[k], tmp, feed, threads)
                        for k in ("ort-fp32", "ort-qdq", "ort-qdq-per-layer")
                    },
                }
                print(
                    f"{name} threads {threads}: "
                    + ", ".join(f"{k} x{v['cpu']:.2f}" for k, v in ratios.items()),
                    flush=True,
                )
        out["models"][name] = entry
    out["targets"] = {
        "ort_qdq_vs_ort_fp32_resnet18_batch1": {
            f"threads{t}": out["models"]
            .get("resnet18", {})
            .get(f"threads{t}", {})
            .get("speedup_vs_ort_fp32", {})
            .get("ort-qdq")
            for t in THREADS
        },
        "target": 2.0,
    }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--models", default="resnet18,mobilenetv2")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(args.quick, args.runs, tuple(args.models.split(",")))
    path = (RESULTS / "quick" if args.quick else RESULTS) / "latency_reduced_range.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")
