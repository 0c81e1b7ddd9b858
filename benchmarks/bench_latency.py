"""Latency of the execution modes against fp32 (PyTorch and onnxruntime), and accuracy with activations
quantized.

* Latency: ResNet-18 and MobileNetV2 at 224×224 (random init, BatchNorm statistics perturbed), a
  Llama-style 58M LM from a ``transformers`` config (random init, 64 tokens) and every zoo model,
  every weight at 8 bits. fp32 vs each mode (``reference``, ``dequant-cached``, ``int8``,
  ``fake-int8``, ``weight-only`` for LMs) vs onnxruntime fp32 / QDQ (the default export: shared
  grids, quantized adds, reduced input ranges; for image models also the per-layer graph of
  before and the inexact full-range U8S8 one), batch 1 and 8, 20 rounds timed
  interleaved in one process (each round calls every candidate once, the order rotated), one
  intra-op thread per engine. Per candidate: wall-clock and CPU-time medians and quartiles,
  speed-ups as medians (and quartiles) of per-round ratios against fp32, the peak RSS during one
  call, the weights' MB; output agreement of every mode with the reference.
* Accuracy: digits-resnet and mnist1d-cnn compressed at 10× weight bytes; the same plan with
  activations at 8 bits (fake-int8 with min-max / percentile / MSE ranges, the int8 kernels,
  onnxruntime QDQ), per channel and at 4 bits (simulated).
* W×A allocation: activation bits chosen per layer inside the knapsack under BOPs budgets.

``--quick``: 64×64 images, a 2-layer Llama, two zoo models, 5 rounds, no accuracy part.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import cetopt
from benchmarks.vision_models import MobileNetV2, ResNet18
from cetopt._io import atomic_write_json
from cetopt.deploy import calibrate_activations, runtime
from cetopt.deploy.allocation import activation_sensitivity, allocate_wa
from cetopt.deploy.latency import measure_latency, peak_rss_mb, peak_rss_of_call, rss_mb
from cetopt.graph import Quantize, rewrite
from cetopt.zoo import accuracy, load_dataset, load_model, model_names

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
THREADS = 1  # one intra-op thread for PyTorch and onnxruntime alike (see run())
PROGRESS = Path(__file__).resolve().parent / "results" / "quick" / "latency.progress.json"


def _quantize_all(model: nn.Module, bits: int = 8) -> nn.Module:
    names = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    return rewrite(model, [Quantize(n, bits, clip_search=False) for n in names])


LLAMA_58M = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 256,
}
LLAMA_QUICK = {
    **LLAMA_58M,
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
}


def _llama(quick: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(LLAMA_QUICK if quick else LLAMA_58M))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return _Logits(model)


class _Logits(nn.Module):
    """A HF causal LM returning its logits tensor (what the timing and the exporters need)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def _vision(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.1, 0.1)
    return model


def _cases(quick: bool):
    """(name, float model, inputs of a batch size, calibration batches or None, is an LM); quick:
    64×64 images, a 2-layer Llama, two zoo models (a smoke run of every code path)."""
    gen = torch.Generator().manual_seed(0)
    side = 64 if quick else 224
    img = lambda b: torch.randn(b, 3, side, side, generator=gen)  # noqa: E731
    yield "resnet18", _vision(ResNet18), img, [img(4), img(4)], False
    if not quick:
        yield "mobilenetv2", _vision(MobileNetV2), img, [img(4), img(4)], False
    vocab = (LLAMA_QUICK if quick else LLAMA_58M)["vocab_size"]
    yield (
        "llama-quick" if quick else "llama-58m",
        _llama(quick),
        lambda b: torch.randint(0, vocab, (b, 64), generator=gen),
        None,
        True,
    )
    zoo = ("digits-cnn", "pydoc-char-lm") if quick else model_names()
    for name in zoo:
        model = load_model(name).eval()
        data = load_dataset(_dataset(name))
        x = data.x_val
        lm = name.endswith("lm")
        yield name, model, (lambda b, x=x: x[:b]), None if lm else [x[:256]], lm


def _dataset(name: str) -> str:
    from cetopt.zoo import zoo_entry

    return zoo_entry(name).dataset


def _onnx(model, q, x, calibration, activations, tmp: Path, name: str) -> dict:
    from cetopt.deploy.onnx_export import export_float_onnx, export_onnx, onnx_session

    out = {}
    try:
        export_float_onnx(q, tmp / f"{name}-fp32.onnx", x)
        out["ort-fp32"] = onnx_session(tmp / f"{name}-fp32.onnx", threads=THREADS)
    except Exception as exc:  # reported, not hidden: some HF models do not export
        out["ort-fp32-error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        res = export_onnx(q, tmp / f"{name}-qdq.onnx", x, activations=activations, calibration=calibration)
        out["ort-qdq"] = onnx_session(res.path, threads=THREADS)
        out["qdq-check"] = {
            "max_abs_diff": res.max_abs_diff,
            "tolerance": res.tolerance,
            "rounding_spread": res.rounding_spread,
            "output_step": max(float(res.activation_ranges.outputs[n].scale) for n in res.quantized_layers),
            "within": res.max_abs_diff is not None and res.max_abs_diff <= res.tolerance,
            "quantized_layers": len(res.quantized_layers),
            "float_layers": res.float_layers,
        }
        out["qdq-check"]["activation_range"] = dict(res.activation_range)
        out["qdq-check"]["weight_format"] = dict(res.weight_format)
        out["qdq-check"]["shared_grids"] = res.activation_ranges.shared_grids
        out["qdq-check"]["quantized_adds"] = sum(
            k.startswith("tensor_quant") for k in res.activation_ranges.inputs
        )
        if x.is_floating_point():  # the graph of before: each layer's own grids, float adds
            per_layer = export_onnx(
                q,
                tmp / f"{name}-qdq-per-layer.onnx",
                x,
                activations=activations,
                calibration=calibration,
                shared_grids=False,
                fuse=False,
            )
            out["ort-qdq-per-layer"] = onnx_session(per_layer.path, threads=THREADS)
            out["qdq-check-per-layer"] = {
                "max_abs_diff": per_layer.max_abs_diff,
                "tolerance": per_layer.tolerance,
                "within": per_layer.max_abs_diff is not None
                and per_layer.max_abs_diff <= per_layer.tolerance,
            }
        if x.is_floating_point():  # U8S8 on the full input range: can saturate without VNNI
            fast = export_onnx(
                q,
                tmp / f"{name}-qdq-u8s8.onnx",
                x,
                activations=res.activation_ranges,
                weight_format="u8s8",
                activation_range="full",
            )
            out["ort-qdq-u8s8"] = onnx_session(fast.path, threads=THREADS)
            out["qdq-check-u8s8"] = {
                "max_abs_diff": fast.max_abs_diff,
                "tolerance": fast.tolerance,
                "within": fast.max_abs_diff is not None and fast.max_abs_diff <= fast.tolerance,
            }
        if not x.is_floating_point() and x.dim() == 2:  # token ids: the sequence axis is dynamic
            try:
                out["qdq-check"]["other_lengths"] = _other_lengths(q, res, out.get("ort-fp32"), x)
            except Exception as exc:  # a model with a fixed length: reported
                out["qdq-check"]["other_lengths"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    except Exception as exc:
        out["ort-qdq-error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def _other_lengths(q, res, fp32_session, x) -> dict:
    """The exported LM at sequence lengths other than the example's: QDQ against fake-int8 and
    fp32 onnxruntime against fp32 PyTorch (max |difference|)."""
    from cetopt.deploy.onnx_export import onnx_session

    fake = runtime(q, "fake-int8", activations=res.activation_ranges)
    qdq = onnx_session(res.path, threads=THREADS)
    gen = torch.Generator().manual_seed(1)
    out = {}
    for length in (x.shape[1] // 4, 2 * x.shape[1]):
        ids = torch.randint(0, int(x.max()) + 1, (x.shape[0], length), generator=gen)
        with torch.no_grad():
            expected, expected_fp = fake(ids).numpy(), q(ids).numpy()
        row = {"qdq_max_abs_diff": float(np.abs(qdq.run(None, {"input0": ids.numpy()})[0] - expected).max())}
        if fp32_session is not None:
            got = fp32_session.run(None, {"input0": ids.numpy()})[0]
            row["fp32_max_abs_diff"] = float(np.abs(got - expected_fp).max())
        row["within_tolerance"] = row["qdq_max_abs_diff"] <= res.tolerance
        out[str(length)] = row
    return out


def _model_mb(model: nn.Module) -> float:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def _latency_case(name, model, make_input, calibration, lm, runs, tmp) -> dict:
    rss0 = rss_mb()
    q = _quantize_all(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modes = {
            "reference": q,
            "dequant-cached": runtime(q, "dequant-cached"),
            "int8": runtime(q, "int8", calibration=calibration),
        }
        int8_ranges = modes["int8"].activation_ranges
        modes["fake-int8"] = runtime(q, "fake-int8", activations=int8_ranges)
        if lm:
            modes["weight-only"] = runtime(q, "weight-only")
        x1 = make_input(1)
        # the QDQ graph needs static grids: the int8 mode's, else (LMs: dynamic int8) 8 inputs'
        ort = _onnx(model, q, make_input(2), calibration or [make_input(8)], int8_ranges, tmp, name)
    fallbacks = sorted({str(w.message) for w in caught if "layer" in str(w.message)})
    entry = {
        "model_mb": {"fp32": _model_mb(model), **{k: _model_mb(m) for k, m in modes.items()}},
        "int8_activations": "dynamic (Linear; quantized::linear_dynamic)"
        if int8_ranges is None
        else "static",
        "fallback_warnings": fallbacks[:20],
        "fallback_warning_count": len(fallbacks),
        "onnx": {k: v for k, v in ort.items() if isinstance(v, (str, dict))},
    }
    with torch.no_grad():
        ref = q(x1)
        entry["max_abs_diff_vs_reference"] = {k: float((m(x1) - ref).abs().max()) for k, m in modes.items()}
        entry["reference_max_abs"] = float(ref.abs().max())
    for batch in (1, 8):
        x = make_input(batch)
        cands = {"fp32": (lambda m=model, x=x: m(x))}
        cands.update({k: (lambda m=m, x=x: m(x)) for k, m in modes.items()})
        feed = x.numpy()
        for key in ("ort-fp32", "ort-qdq", "ort-qdq-per-layer", "ort-qdq-u8s8"):
            if key in ort:
                cands[key] = lambda s=ort[key], f=feed: s.run(None, {"input0": f})
        # at batch 8 the two simulation modes (reference: dequantize per call; fake-int8:
        # fake-quant in float) run half the rounds
        half = max(10, runs // 2)
        slow = {} if batch == 1 else {"reference": half, "fake-int8": half}
        stats = measure_latency(cands, runs=runs, baseline="fp32", runs_for=slow, warmup=2, min_sample_s=0.01)
        for key, fn in cands.items():
            stats[key]["rss_during_call"] = peak_rss_of_call(fn)
        for qdq in ("ort-qdq", "ort-qdq-per-layer", "ort-qdq-u8s8"):  # ratios of medians (timed every round)
            if "ort-fp32" in stats and qdq in stats:
                for key in ("median_s", "cpu_median_s"):
                    stats[qdq][f"speedup_vs_ort_fp32_{key.removesuffix('_s')}"] = (
                        stats["ort-fp32"][key] / stats[qdq][key]
                    )
        entry[f"batch{batch}"] = stats
        print(
            f"  {name} batch {batch} (CPU-time speed-up vs fp32, wall in brackets): "
            + ", ".join(f"{k} ×{v['cpu_speedup']:.2f} (×{v['speedup']:.2f})" for k, v in stats.items()),
            flush=True,
        )
    entry["rss_mb_after"] = rss_mb()
    entry["rss_mb_growth"] = rss_mb() - rss0
    entry["peak_rss_mb_process"] = peak_rss_mb()
    return entry


def _accuracy_case(name: str, quick: bool) -> dict:
    model = load_model(name)
    data = load_dataset(_dataset(name))
    result = cetopt.compress(model, data.loader("train", batch_size=512), "10x", method="measured")
    q = result.model
    calib = data.loader("val", batch_size=256)
    x, y = data.x_test, data.y_test
    pp = lambda a: 100 * a  # noqa: E731
    weights_only = pp(accuracy(q, x, y))
    out = {
        "plan_bits": result.plan.bits,
        "plan_bytes": result.plan.bytes,
        "fp32": pp(accuracy(model, x, y)),
        "weights_only": weights_only,
        "a8": {},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("minmax", "percentile", "mse"):
            ranges = calibrate_activations(q, calib, method=method)
            fake = pp(accuracy(runtime(q, "fake-int8", activations=ranges), x, y))
            kernel = pp(accuracy(runtime(q, "int8", activations=ranges), x, y))
            out["a8"][method] = {
                "fake_int8": fake,
                "int8_kernels": kernel,
                "delta_pp_vs_weights_only": fake - weights_only,
            }
        ranges = calibrate_activations(q, calib, method="minmax")
        out["a8"]["minmax"]["onnxruntime_qdq"] = _ort_accuracy(q, ranges, x, y)
        probe = runtime(q, "fake-int8", activations=ranges)
        out["a8"]["minmax"]["activation_range"] = dict(probe.activation_range)
        full = {  # the fallback: every input on the full 8-bit grid (U8U8 export where needed)
            "fake_int8": pp(
                accuracy(runtime(q, "fake-int8", activations=ranges, activation_range="full"), x, y)
            ),
            "int8_kernels": pp(
                accuracy(runtime(q, "int8", activations=ranges, activation_range="full"), x, y)
            ),
            "onnxruntime_qdq": _ort_accuracy(q, ranges, x, y, activation_range="full"),
        }
        full["delta_pp_vs_weights_only"] = full["fake_int8"] - weights_only
        out["a8_minmax_full_range"] = full
        per_channel = calibrate_activations(q, calib, method="minmax", per_channel=True)
        out["a8_per_channel_minmax_fake"] = pp(
            accuracy(runtime(q, "fake-int8", activations=per_channel), x, y)
        )
        a4 = calibrate_activations(q, calib, method="mse", bits=4)
        out["a4_mse_fake"] = pp(accuracy(runtime(q, "fake-int8", activations=a4), x, y))
    out["target_within_1pp"] = all(abs(v["delta_pp_vs_weights_only"]) <= 1.0 for v in out["a8"].values())
    out["wa_allocation"] = _wa(model, result, q, data, calib)
    print(f"  {name}: weights-only {weights_only:.2f} %, A8 {out['a8']}", flush=True)
    return out


def _ort_accuracy(q, ranges, x, y, activation_range: str = "auto") -> float | str:
    try:
        from cetopt.deploy.onnx_export import export_onnx, onnx_session

        with tempfile.TemporaryDirectory() as tmp:
            res = export_onnx(
                q, Path(tmp) / "m.onnx", x[:8], activations=ranges, activation_range=activation_range
            )
            logits = onnx_session(res.path).run(None, {"input0": x.numpy()})[0]
        return 100 * float((logits.argmax(-1) == y.numpy()).mean())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _wa(model, result, q, data, calib) -> dict:
    """Activation bits chosen in the knapsack under BOPs budgets (share of the all-A8 BOPs)."""
    table = result.table
    values = activation_sensitivity(q, calib, (4, 8), layers=table.layers)
    w_bits = np.array([result.plan.bits[n] for n in table.layers])
    a8_bops = float((table.macs * w_bits * 8).sum())
    out = {
        "activation_sensitivity": {"bits": [4, 8], "layers": table.layers, "values": values.tolist()},
        "a8_bops_of_weight_plan": a8_bops,
    }
    train = data.loader("train", batch_size=512)
    for share in (1.0, 0.75, 0.5):
        try:
            plan = allocate_wa(
                table, values, "10x", bops_budget=share * a8_bops, allow_float_activations=False
            )
        except cetopt.errors.CetoptError as exc:
            out[f"bops_{share}"] = str(exc)
            continue
        wq = cetopt.quantize(model, plan.weight_bits, gptq=train, bias_correction=train, sequential=True)
        ranges = calibrate_activations(wq, calib, bits=plan.activation_bits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fake = runtime(wq, "fake-int8", activations=ranges)
        out[f"bops_{share}"] = {
            **plan.to_dict(),
            "bops_budget": share * a8_bops,
            "accuracy_weights_only": 100 * accuracy(wq, data.x_test, data.y_test),
            "accuracy_fake_quant_activations": 100 * accuracy(fake, data.x_test, data.y_test),
        }
    return out


def run(quick: bool = False) -> dict:
    # One intra-op thread: on the shared 2-core machine (load often above 2) a second thread is
    # descheduled mid-kernel and its partner waits at the barrier, which turned sub-millisecond
    # calls into ~100 ms ones; with one thread per engine the CPU time is the work itself.
    torch.set_num_threads(THREADS)
    runs = 5 if quick else 20
    torch.manual_seed(0)
    latency, accuracy_results = {}, {}
    header = {
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": THREADS,
        "quantized_engine": torch.backends.quantized.engine,
        "runs": runs,
        "timing": "interleaved rounds (fp32, then each mode, per round); speedup / cpu_speedup are "
        "medians of per-round ratios fp32/mode (wall clock / process CPU time), with quartiles",
    }

    def progress(done: bool = False) -> dict:
        data = {**header, "complete": done, "latency": latency, "accuracy_10x": accuracy_results}
        data["targets"] = _targets(latency, accuracy_results)
        if not quick:
            atomic_write_json(PROGRESS, data)
        return data

    with tempfile.TemporaryDirectory() as tmp:
        for name, model, make_input, calibration, lm in _cases(quick):
            print(f"latency {name}", flush=True)
            try:
                latency[name] = _latency_case(name, model, make_input, calibration, lm, runs, Path(tmp))
            except Exception as exc:
                latency[name] = {"error": f"{type(exc).__name__}: {exc}"}
            progress()
    for name in () if quick else ("digits-resnet", "mnist1d-cnn"):
        print(f"accuracy {name}", flush=True)
        accuracy_results[name] = _accuracy_case(name, quick)
        progress()
    return progress(done=True)


def _targets(latency: dict, acc: dict) -> dict:
    """The issue's targets, judged on the CPU-time ratios (wall-clock ratios next to them)."""

    def speed(model, mode, batch=1, key="cpu_speedup"):
        try:
            return latency[model][f"batch{batch}"][mode][key]
        except KeyError:
            return None

    def ort_ratio(model, batch, cpu=True, qdq="ort-qdq"):
        fp32, qdq = (speed(model, k, batch, "cpu_median_s" if cpu else "median_s") for k in ("ort-fp32", qdq))
        return None if fp32 is None or qdq is None else fp32 / qdq

    def judged(value, target):
        return {"value": value, "target": target, "met": value is not None and value >= target}

    timed = [m for m in latency if "batch1" in latency[m]]
    return {
        "basis": "CPU-time speed-ups (median of per-round ratios); wall-clock ones under *_wall",
        "dequant_cached_within_5pct_of_fp32": {
            f"{m}_batch{b}": judged(speed(m, "dequant-cached", b), 1 / 1.05) for m in timed for b in (1, 8)
        },
        "dequant_cached_within_5pct_of_fp32_wall": {
            f"{m}_batch{b}": judged(speed(m, "dequant-cached", b, "speedup"), 1 / 1.05)
            for m in timed
            for b in (1, 8)
        },
        "int8_resnet18_batch1_speedup": judged(speed("resnet18", "int8"), 1.5),
        "int8_llama_batch1_speedup": judged(speed("llama-58m", "int8"), 1.5),
        "int8_resnet18_batch1_speedup_wall": judged(speed("resnet18", "int8", 1, "speedup"), 1.5),
        "int8_llama_batch1_speedup_wall": judged(speed("llama-58m", "int8", 1, "speedup"), 1.5),
        "ort_qdq_vs_ort_fp32_resnet18_batch1": judged(ort_ratio("resnet18", 1), 2.0),
        "ort_qdq_vs_ort_fp32_resnet18_batch8": judged(ort_ratio("resnet18", 8), 2.0),
        "ort_qdq_vs_ort_fp32_resnet18_batch1_wall": judged(ort_ratio("resnet18", 1, False), 2.0),
        "ort_qdq_per_layer_vs_ort_fp32_resnet18_batch1": judged(
            ort_ratio("resnet18", 1, qdq="ort-qdq-per-layer"), 2.0
        ),
        "ort_qdq_u8s8_vs_ort_fp32_resnet18_batch1": judged(ort_ratio("resnet18", 1, qdq="ort-qdq-u8s8"), 2.0),
        "ort_qdq_u8s8_vs_ort_fp32_resnet18_batch8": judged(ort_ratio("resnet18", 8, qdq="ort-qdq-u8s8"), 2.0),
        "a8_within_1pp_of_weights_only": {m: v["target_within_1pp"] for m, v in acc.items()},
    }


def _rerun_record(load_before: tuple[float, float, float], t0: float, why: str) -> dict:
    """When, at which commit and under what load a case was re-measured, and why."""
    import os
    import time

    from benchmarks.harness import machine_info

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "git_commit": machine_info()["git_commit"],
        "wall_s": time.time() - t0,
        "loadavg_1_5_15_before": list(load_before),
        "loadavg_1_5_15_after": list(os.getloadavg()),
        "why": why,
    }


def rerun(names: list[str], path: Path | None = None, accuracy_names: list[str] = ()) -> dict:
    """Re-measure the latency cases ``names`` (and the accuracy cases ``accuracy_names``) and
    merge them into the committed ``latency.json``.

    The other cases and the header stay as they were; each re-measured case records when it ran,
    the git commit and the load average around it (``rerun``), and the targets are judged again.
    """
    import os
    import time

    from benchmarks.harness import RESULTS

    path = path or RESULTS / "latency.json"
    data = json.loads(Path(path).read_text())
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    runs = data.get("runs", 20)
    found = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, make_input, calibration, lm in _cases(False) if names else ():
            if name not in names:
                continue
            found.add(name)
            print(f"latency {name} (re-run)", flush=True)
            load_before, t0 = os.getloadavg(), time.time()
            entry = _latency_case(name, model, make_input, calibration, lm, runs, Path(tmp))
            entry["rerun"] = _rerun_record(
                load_before, t0, "reduced activation range where 8-bit weights could saturate: exact U8S8"
            )
            data["latency"][name] = entry
    missing = sorted(set(names) - found)
    if missing:
        raise ValueError(f"no latency case named {missing}")
    for name in accuracy_names:
        print(f"accuracy {name} (re-run)", flush=True)
        load_before, t0 = os.getloadavg(), time.time()
        entry = _accuracy_case(name, False)
        entry["rerun"] = _rerun_record(
            load_before,
            t0,
            "reduced activation range (codes 0..127) on the inputs of layers with 8-bit weights",
        )
        data.setdefault("accuracy_10x", {})[name] = entry
    data["targets"] = _targets(data["latency"], data.get("accuracy_10x", {}))
    atomic_write_json(path, data)
    return data


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="re-measure latency cases into latency.json")
    parser.add_argument("--only", default="", help="comma-separated latency cases, e.g. llama-58m")
    parser.add_argument("--accuracy", default="", help="comma-separated accuracy cases, e.g. mnist1d-cnn")
    args = parser.parse_args()
    rerun([n for n in args.only.split(",") if n], accuracy_names=[n for n in args.accuracy.split(",") if n])
