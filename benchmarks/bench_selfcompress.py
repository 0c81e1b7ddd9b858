"""Safety-guided self-compression: accuracy (or LM loss) against bytes on disk, 3 seeds.

For each model (digits CNN, MNIST-1D CNN, the character-level transformer LM on the stdlib's
pydoc topics) and seed (the zoo model's training seed and the compression seed):

* ``fp32`` — the zoo model as trained, saved unquantized;
* ``ft16`` — a control: the same training loop with no size pressure (16 bits per weight, bit
  depths frozen), so gains from the extra fine-tuning steps show apart from compression;
* ``sc`` — self-compression without the preservation set;
* ``sc+pres`` — with it (loss term, restore rule with the paper's reference: accuracy at the start,
  threshold 5 pp);
* ``sc+pres/best`` — with it, and the restore rule measured against the best preservation accuracy
  so far with a 2 pp threshold (a tighter rule, more likely to fire);
* ``ilp`` — the allocation integer program (``cetopt.compress``: cet sensitivities on the held-out
  split, bits {2, 3, 4, 5, 6, 8}, bias correction, no fine-tuning) at the same quantized-weight
  bytes as ``sc+pres``. Where that is below the ILP's smallest plan (every layer at 2 bits), it runs
  at its smallest plan instead and the row says ``infeasible: true``. For the LM: 128 held-out
  windows, 4 probes, and no bias correction (``correct_bias`` reads channels on dim 1, while a
  Linear on ``(N, T, C)`` has them last).

Bytes are those of the file :func:`cetopt.save` writes (``bytes_on_disk``; ``weight_bytes`` is
the quantized-weight payload); ratios are against the fp32 file. Accuracy and loss are on the test
split, which nothing here reads while compressing. The self-compression runs fine-tune the weights
(the same number of steps for every variant); the ILP does not.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import cetopt
from cetopt.errors import InfeasibleBudgetError
from cetopt.selfcompress import self_compress
from cetopt.zoo import accuracy, load_dataset, load_model, zoo_entry
from cetopt.zoo.training import mean_loss, task_loss

MODELS = {
    "digits-cnn": dict(steps=300, batch_size=128),
    "mnist1d-cnn": dict(steps=300, batch_size=128),
    "pydoc-char-lm": dict(steps=150, batch_size=32, bit_lr=0.1, preservation_size=128, preservation_batch=16),
}
COMMON = dict(bit_lr=0.05, size_weight=0.1, init_bits=8.0, remove_every=50, removal_grace=100)
VARIANTS = {
    "ft16": dict(preservation=False, size_weight=0.0, bit_lr=0.0, init_bits=16.0),
    "sc": dict(preservation=False),
    "sc+pres": dict(preservation=True),
    "sc+pres/best": dict(preservation=True, restore_reference="best", restore_threshold=0.02),
}


def _measure(model, data, tmp: Path, tag: str) -> dict:
    saved = cetopt.save(model, tmp / f"{tag}.safetensors")
    return {
        "accuracy": accuracy(model, data.x_test, data.y_test),
        "loss": mean_loss(model, data.x_test, data.y_test),
        "bytes_on_disk": saved.bytes_on_disk,
        "weight_bytes": saved.quantized_bytes,
    }


def _sc(model, data, seed: int, opts: dict, tmp: Path, tag: str) -> dict:
    t0 = time.perf_counter()
    result = self_compress(model, data, seed=seed, **opts)
    seconds = time.perf_counter() - t0
    row = _measure(result.model, data, tmp, tag)
    assert row["weight_bytes"] == result.size_bytes  # the size term counts exactly what is stored
    kept = sum(len(v) for v in result.bits.values())
    stored = sum(sum(v) * _fan_in(result.model, n) for n, v in result.bits.items())
    return {
        **row,
        "seconds": seconds,
        "restores": len(result.restores),
        "restored_channels": sum(e.count for e in result.restores),
        "restore_steps": [e.step for e in result.restores],
        "channels_removed": sum(len(d.units) for d in result.removals),
        "channels_kept": kept,
        "mean_bits_per_weight": stored / max(1, _weights(result.model, result.bits)),
        "preservation_counts": None if result.preservation is None else result.preservation.counts,
    }


def _fan_in(model, name: str) -> int:
    w = model.get_submodule(name).weight_q
    return int(np.prod(w.shape[1:]))


def _weights(model, bits: dict) -> int:
    return sum(model.get_submodule(n).weight_q.numel() for n in bits)


def _ilp(model, data, budget: float, tmp: Path, tag: str, is_lm: bool, at_minimum: bool = False) -> dict:
    """The ILP at ``budget`` bytes; if that is below its smallest plan, at its smallest plan instead."""
    if is_lm:  # 128 held-out windows (8192 tokens) keep cet's forward-mode passes affordable
        loader = DataLoader(TensorDataset(data.x_val[:128], data.y_val[:128]), batch_size=64)
    else:
        loader = data.loader("val", batch_size=256)
    t0 = time.perf_counter()
    try:
        result = cetopt.compress(
            model,
            loader,
            budget,
            method="cet",
            probes=4 if is_lm else 8,
            progress=False,
            loss_fn=task_loss if is_lm else None,
            bias_correction=not is_lm,  # cetopt.quant.correct_bias reads channels on dim 1
        )
    except InfeasibleBudgetError as exc:
        if at_minimum:
            raise
        row = _ilp(model, data, exc.minimum, tmp, tag, is_lm, at_minimum=True)
        return {**row, "infeasible": True, "budget": budget, "run_at_minimum_weight_bytes": exc.minimum}
    return {**_measure(result.model, data, tmp, tag), "seconds": time.perf_counter() - t0, "budget": budget}


def _one(name: str, seed: int, quick: bool) -> dict:
    torch.manual_seed(seed)
    data = load_dataset(zoo_entry(name).dataset)
    model = load_model(name, seed=seed, progress=False)
    opts = {**COMMON, **MODELS[name]}
    if quick:
        opts["steps"] = 40
    row: dict = {"model": name, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        row["fp32"] = _measure(model, data, tmp, "fp32")
        for variant, extra in VARIANTS.items():
            row[variant] = _sc(model, data, seed, {**opts, **extra}, tmp, variant)
        row["ilp"] = _ilp(model, data, row["sc+pres"]["weight_bytes"], tmp, "ilp", name.endswith("lm"))
    fp32 = row["fp32"]["bytes_on_disk"]
    for key in ("fp32", *VARIANTS, "ilp"):
        if "bytes_on_disk" in row[key]:
            row[key]["size_ratio"] = row[key]["bytes_on_disk"] / fp32
    return row


def _stat(values) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not arr.size:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "n": int(arr.size),
    }


def _summary(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        entry = {}
        for key in ("fp32", *VARIANTS, "ilp"):
            entry[key] = {
                m: _stat([r[key].get(m) for r in mine])
                for m in ("accuracy", "loss", "bytes_on_disk", "size_ratio", "weight_bytes")
            }
            if key in VARIANTS:
                entry[key]["restores"] = _stat([r[key]["restores"] for r in mine])
                entry[key]["channels_removed"] = _stat([r[key]["channels_removed"] for r in mine])
            if key == "ilp":
                entry[key]["infeasible_runs"] = sum(bool(r[key].get("infeasible")) for r in mine)
        for key in ("sc", "ilp", "ft16"):
            diffs = [
                r["sc+pres"]["accuracy"] - r[key]["accuracy"]
                for r in mine
                if r[key].get("accuracy") is not None
            ]
            entry[f"sc+pres_minus_{key}_accuracy_pp"] = _stat([100 * d for d in diffs])
            entry[f"sc+pres_minus_{key}_loss"] = _stat([r["sc+pres"]["loss"] - r[key]["loss"] for r in mine])
        out[name] = entry
    return out


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    seeds = [0] if quick else [0, 1, 2]
    rows = []
    for name in MODELS:
        for seed in seeds:
            t0 = time.perf_counter()
            rows.append(_one(name, seed, quick))
            r = rows[-1]
            print(
                f"   {name} seed {seed} ({time.perf_counter() - t0:.0f} s): "
                + ", ".join(
                    f"{k} acc {r[k].get('accuracy', float('nan')):.4f} "
                    f"loss {r[k].get('loss', float('nan')):.3f} "
                    f"size {r[k].get('size_ratio', float('nan')):.3f}"
                    for k in ("fp32", *VARIANTS, "ilp")
                ),
                flush=True,
            )
    return {
        "settings": {"common": COMMON, "models": MODELS, "variants": VARIANTS, "seeds": seeds},
        "runs": rows,
        "summary": _summary(rows),
    }
