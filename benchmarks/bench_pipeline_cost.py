"""The compression pipeline at real cost: each step as a multiple of one forward+backward pass.

Models of real architecture and size, built from HF ``transformers`` configs with random weights
(no downloads): ResNet-18 and ResNet-50 (``ResNetConfig``: basic blocks [2, 2, 2, 2] and
bottlenecks [3, 4, 6, 3]), MobileNetV2 1.0 (``MobileNetV2Config``) and ViT-B/16
(``ViTConfig``), each with 1000 classes, wrapped so they return the logits. Calibration data:
standard-normal random images at 224×224 (64×64 with ``--quick``), each labelled with the
model's own argmax (so the loss is the model's confidence in its own predictions), in batches.

Each model runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own. In it:

* the reference passes over the calibration data: one forward (no grad) and one forward+backward
  (cross-entropy, gradients of every parameter), timed in the same process, the latter before and
  after ``compress`` (the ratios use the mean of the two). Every time is taken twice: wall clock,
  and the CPU time of the process (all threads), which the other engineers' jobs on the shared
  2-core machine disturb far less; both ratios are reported;
* ``cetopt.compress(model, batches, "8x")`` with every default (``method="auto"``, GPTQ + bias
  correction calibrated sequentially): the seconds of each step (sensitivity, allocation,
  quantization + calibration, total), each as a ratio to the forward+backward pass, the
  estimator ``auto`` chose and why, how many examples its sensitivities used, the peak RSS, the
  share of the model's weights that are quantized, and the top-1 agreement of the compressed
  model with the float one on the calibration images;
* the other estimators on the first few calibration images, each in its own subprocess with a
  deadline: ``fisher`` in full; ``cet`` and ``hutchinson`` for a few Hessian-vector products,
  whose measured cost per HVP (in forward+backward passes over the same images, timed in the
  same run) gives their cost for the full table (``cet``: 1 gradient + bits × its default
  16-probe design; ``hutchinson``: its ``max_probes`` of 200, an upper bound).

On the zoo models (digits ResNet, MNIST-1D CNN, seed 0, calibration = the train split as in
``bit_allocation``): every per-layer estimator's seconds as a ratio to one forward+backward pass
over the same data, its rank correlation with ``measured``, whether its 10× plan equals
``measured``'s, and what ``auto`` chose. Per-channel rank correlations are in
``bit_allocation.json``.

One model can be run and merged on its own, keeping the other rows of the results file::

    python -m benchmarks.bench_pipeline_cost resnet18 256 224 32 --threads 1 > row.json
    python -m benchmarks.bench_pipeline_cost --merge row.json --keep-as after_32_images
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.harness import forward_backward_seconds

BITS = (2, 3, 4, 5, 6, 8)
FULL = {  # images, side, batch, subprocess timeout (s)
    "resnet18": (256, 224, 32, 10800),
    "resnet50": (32, 224, 16, 7200),
    "mobilenetv2": (32, 224, 16, 5400),
    "vit-b16": (8, 224, 8, 3600),
}
QUICK = {
    "resnet18": (32, 64, 16, 900),
    "resnet50": (16, 64, 8, 900),
    "mobilenetv2": (16, 64, 8, 900),
    "vit-b16": (8, 64, 4, 900),
}
SUBSET = 16  # images the other estimators run on (8 with --quick)


class Logits(nn.Module):
    """An HF image classifier that returns its logits."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=x).logits


def build(name: str, side: int) -> nn.Module:
    """A random-initialised model of the named architecture, from its HF config."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "resnet18":
        config = tf.ResNetConfig(
            embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic"
        )
        inner = tf.ResNetForImageClassification(tf.ResNetConfig(**config.to_dict(), num_labels=1000))
    elif name == "resnet50":
        inner = tf.ResNetForImageClassification(tf.ResNetConfig(num_labels=1000))
    elif name == "mobilenetv2":
        inner = tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(num_labels=1000, image_size=side))
    elif name == "vit-b16":
        inner = tf.ViTForImageClassification(tf.ViTConfig(num_labels=1000, image_size=side))
    else:
        raise ValueError(name)
    return Logits(inner).eval()


@torch.no_grad()
def calibration(model: nn.Module, images: int, side: int, batch: int) -> list:
    """Random images labelled with the model's own argmax, in batches."""
    g = torch.Generator().manual_seed(1)
    out = []
    for start in range(0, images, batch):
        x = torch.randn(min(batch, images - start), 3, side, side, generator=g)
        out.append((x, model(x).argmax(1)))
    return out


def forward_seconds(model: nn.Module, batches: list) -> dict:
    """Wall and CPU seconds of one forward pass over ``batches``."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def _mean_reference(*passes: dict) -> dict:
    return {k: sum(p[k] for p in passes) / len(passes) for k in ("wall", "cpu")}


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def quantized_share(model: nn.Module, compressed: nn.Module) -> dict:
    """Share of the float model's parameters that sit in quantized layers of ``compressed``."""
    total = sum(p.numel() for p in model.parameters())
    floats = dict(model.named_modules())
    names = [n for n, m in compressed.named_modules() if hasattr(m, "weight_q") and n in floats]
    done = sum(floats[n].weight.numel() for n in names)
    return {"quantized_weights": done, "all_parameters": total, "share": done / total}


RUNS = {  # what each other estimator runs on the subset
    "fisher": {"bits": BITS},
    "cet": {"bits": (2,), "probes": 2, "rounds": 1},
    "hutchinson": {"bits": (2,), "max_probes": 2},
}


def estimator_child(name: str, method: str, images: int, side: int, batch: int) -> dict:
    """One other estimator on the first ``images`` calibration images, in this (sub)process."""
    from cetopt.analysis import sensitivity
    from cetopt.analysis.auto import _cet_probes

    model = build(name, side)
    subset = calibration(model, images, side, batch)
    fwdbwd = forward_backward_seconds(model, subset)["cpu"]
    options = RUNS[method]
    entry = {"run": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    entry["forward_backward_cpu_seconds"] = fwdbwd
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        table = sensitivity(model, subset, method=method, progress=False, **options)
    except Exception as exc:
        return {**entry, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "peak_rss_mb": peak_rss_mb()}
    seconds = time.process_time() - c0
    entry.update(wall_seconds=time.perf_counter() - t0, cpu_seconds=seconds, peak_rss_mb=peak_rss_mb())
    entry["ratio_to_forward_backward"] = seconds / fwdbwd
    if method in ("cet", "hutchinson"):
        hvps = table.meta.get("hvps", table.meta.get("probes"))
        gradient = 1 if method == "cet" else 0  # one gradient: about one forward+backward
        per_hvp = max(seconds / fwdbwd - gradient, 0) / hvps
        layers = len(table.layers)
        full = len(BITS) * _cet_probes(layers, 16, 2) if method == "cet" else 200
        entry.update(hvps=hvps, ratio_per_hvp=per_hvp, full_table_hvps=full)
        entry["full_table_ratio_estimate"] = gradient + full * per_hvp
    return entry


def _other_estimators(name: str, side: int, batch: int, images: int, quick: bool) -> dict:
    """Each other estimator in its own subprocess (a fork of a process that ran torch can hang)."""
    images = min(images, SUBSET // 2 if quick else SUBSET)
    out = {"images": images}
    for method in RUNS:
        command = [sys.executable, "-m", "benchmarks.bench_pipeline_cost", name, str(images), str(side)]
        command += [str(min(batch, images)), "--estimator", method]
        timeout = 240 if quick else 900
        out[method] = _subprocess(command, timeout)
    return out


def _subprocess(command: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"error": done.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        row = {"error": f"did not finish within {timeout} s"}
    row["wall_seconds"] = time.perf_counter() - t0
    return row


def child(name: str, images: int, side: int, batch: int, quick: bool) -> dict:
    """Everything measured on one model, in this (sub)process."""
    import cetopt

    model = build(name, side)
    row = {"model": name, "images": images, "side": side, "batch": batch}
    row["torch_threads"] = torch.get_num_threads()
    row["parameters"] = sum(p.numel() for p in model.parameters())
    row["quantizable_layers"] = sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())
    batches = calibration(model, images, side, batch)
    row["forward_seconds"] = forward_seconds(model, batches)
    before = forward_backward_seconds(model, batches)
    row["peak_rss_mb_before_compress"] = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        result = cetopt.compress(model, batches, "8x", progress=False)
    except Exception as exc:  # report what happens (e.g. a layer type not handled yet)
        error = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["compress"] = {"error": error, "seconds": time.perf_counter() - t0}
        row["peak_rss_mb"] = peak_rss_mb()
        return row
    after = forward_backward_seconds(model, batches)
    row["forward_backward_seconds"] = {"before": before, "after": after}
    fwdbwd = _mean_reference(before, after)
    steps = {
        k: {
            "wall_seconds": v,
            "cpu_seconds": result.cpu_seconds[k],
            "ratio_to_forward_backward_wall": v / fwdbwd["wall"],
            "ratio_to_forward_backward_cpu": result.cpu_seconds[k] / fwdbwd["cpu"],
        }
        for k, v in result.seconds.items()
    }
    with torch.no_grad():
        agree = np.mean([float((result.model(x).argmax(1) == y).float().mean()) for x, y in batches])
    row["compress"] = {
        "steps": steps,
        "method": result.table.method,
        "auto": result.table.meta.get("auto"),
        "examples_used_for_sensitivity": result.table.meta.get("examples_used"),
        "plan": {
            "bytes": result.plan.bytes,
            "budget_bytes": result.plan.budget_bytes,
            "status": result.plan.status,
            "average_bits": float(
                sum(result.plan.bits[n] * p for n, p in zip(result.table.layers, result.table.params))
                / result.table.params.sum()
            ),
        },
        "weights": quantized_share(model, result.model),
        "top1_agreement_with_fp32_on_calibration": float(agree),
    }
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def _zoo(quick: bool) -> dict:
    from cetopt.allocation import allocate
    from cetopt.analysis import rank_correlation, sensitivity
    from cetopt.zoo import load_dataset, load_model, zoo_entry

    out = {}
    for name in ("digits-resnet", "mnist1d-cnn"):
        model = load_model(name, seed=0, progress=False)
        loader = list(load_dataset(zoo_entry(name).dataset).loader("train", batch_size=512))
        before = forward_backward_seconds(model.train(False), loader)
        tables, seconds = {}, {}
        for method in ("measured", "auto", "cet", "hutchinson", "fisher"):
            c0 = time.process_time()
            probes = 8 if quick else 16
            tables[method] = sensitivity(model, loader, BITS, method, probes=probes, progress=False)
            seconds[method] = time.process_time() - c0
        fwdbwd = _mean_reference(before, forward_backward_seconds(model, loader))["cpu"]
        reference = allocate(tables["measured"], "10x").bits
        out[name] = {
            "forward_backward_cpu_seconds": fwdbwd,
            "auto": tables["auto"].meta["auto"],
            "auto_examples_used": tables["auto"].meta.get("examples_used"),
            "methods": {
                m: {
                    "cpu_seconds": seconds[m],
                    "ratio_to_forward_backward_cpu": seconds[m] / fwdbwd,
                    "rank_correlation_with_measured": rank_correlation(tables[m], tables["measured"]),
                    "plan_at_10x_equals_measured": allocate(tables[m], "10x").bits == reference,
                }
                for m in tables
            },
        }
        print(f"   zoo {name}: {json.dumps(out[name]['methods'])}", flush=True)
    return out


def _partial(quick: bool, data: dict) -> None:
    """What has been measured so far, in case a later model runs out of time."""
    from benchmarks.harness import RESULTS
    from cetopt._io import atomic_write_json

    path = RESULTS / f"pipeline_cost{'.quick' if quick else ''}.partial.json"
    atomic_write_json(path, data)


def run(quick: bool = False) -> dict:
    sizes = QUICK if quick else FULL
    rows = {}
    for name, (images, side, batch, timeout) in sizes.items():
        command = [sys.executable, "-m", "benchmarks.bench_pipeline_cost", name]
        command += [str(images), str(side), str(batch)] + (["--quick"] if quick else [])
        rows[name] = _subprocess(command, timeout)
        rows[name]["other_estimators"] = _other_estimators(name, side, batch, images, quick)
        print(f"   {name}: {json.dumps(rows[name])[:1500]}", flush=True)
        _partial(quick, {"models": rows})
    zoo = _zoo(quick)
    return {
        "bits": BITS,
        "budget": "8x",
        "data": "standard-normal random images, labels = the model's own argmax",
        "models": rows,
        "zoo": zoo,
    }


def merge_row(
    name: str, row: dict, *, key: str = "after", keep_as: str | None = None, note: str = ""
) -> Path:
    """Put one model's row into ``results/pipeline_cost.json`` without losing the other rows.

    The row goes under ``models[name][key]``; with ``keep_as``, the entry that was there moves to
    ``models[name][keep_as]`` first. The row records the commit it was measured at (unless it
    already does) and ``note``; ``partial`` stays as it was.
    """
    from benchmarks.harness import RESULTS, machine_info
    from cetopt._io import atomic_write_json

    path = RESULTS / "pipeline_cost.json"
    data = json.loads(path.read_text())
    entry = data.setdefault("models", {}).setdefault(name, {})
    entry.pop("not_run", None)
    if keep_as is not None and key in entry:
        entry[keep_as] = entry.pop(key)
    row = dict(row)
    row.setdefault("measured_at_commit", machine_info().get("git_commit"))
    if note:
        row["note"] = note
    entry[key] = row
    atomic_write_json(path, data)
    return path


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_pipeline_cost", description=__doc__)
    parser.add_argument("model", nargs="?", help="run one model in this process (the child of run())")
    parser.add_argument("sizes", nargs="*", type=int, help="images, side, batch (with a model)")
    parser.add_argument("--estimator", help="with a model: run this other estimator instead of compress")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--merge", metavar="ROW_JSON", help="merge a child's printed row into the results")
    parser.add_argument("--key", default="after", help="with --merge: the row's key under models[model]")
    parser.add_argument("--keep-as", help="with --merge: move the entry under --key here first")
    parser.add_argument("--note", default="", help="with --merge: a note stored with the row")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        lines = [ln for ln in Path(args.merge).read_text().splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1])
        print(merge_row(args.model or row["model"], row, key=args.key, keep_as=args.keep_as, note=args.note))
        return
    if args.model is None or len(args.sizes) != 3:
        parser.error("give a model and its images, side and batch (or --merge ROW_JSON)")
    images, side, batch = args.sizes
    if args.estimator:
        print(json.dumps(estimator_child(args.model, args.estimator, images, side, batch)), flush=True)
    else:
        print(json.dumps(child(args.model, images, side, batch, args.quick)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
