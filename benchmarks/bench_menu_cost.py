"""The menu at real cost: ``build_menu`` and ``decompose(method="admm")`` on every layer of a ResNet-18.

The model is Hugging Face ``transformers``' ResNet-18 (``ResNetConfig(layer_type="basic", depths=[2, 2,
2, 2])``, random initialisation, no download), wrapped to return its logits; torchvision does not
import against the CPU torch here. Calibration data are random images (the cost does not depend on
what they show). Each step runs in a forked child, so its peak RSS is its own (it includes the
parent's model and data, shared at the fork), and is killed at a deadline.

Costs are given as multiples of one forward and one forward+backward pass of the model over the
same calibration images, measured in the same run (the fastest of three). ``before`` is the code
at commit :data:`BEFORE_COMMIT` (the last commit before this work), run from a ``git archive`` of
that commit in a subprocess with its own deadline (``before_deadline``); a step that runs past it
is reported with ``finished: false`` and the seconds it ran.

The menu uses the default grid except for a smaller L + S grid (:data:`LS_GRID`: ranks {1/16, 1/8}
× density 3 %, i.e. two weight-space and two ADMM fits per layer, each also with 4- and 8-bit
factors), stated in the results; ``decompose`` fits rank ⌈min(m, n)/8⌉ plus 3 % nonzeros per layer.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness import with_deadline

BEFORE_COMMIT = "1d1ef2e"
LS_GRID = {"ls_rank_fractions": (1 / 16, 1 / 8), "ls_densities": (0.03,)}
FULL = {"size": 112, "images": 8, "deadline": 1800.0, "before_deadline": 600.0, "layers": None}
QUICK = {"size": 64, "images": 4, "deadline": 300.0, "before_deadline": 120.0, "layers": 6}
ROOT = Path(__file__).resolve().parent.parent


class Logits(nn.Module):
    """A Hugging Face image classifier returning its logits tensor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def resnet18(seed: int = 0) -> nn.Module:
    """ResNet-18 (basic blocks, 2-2-2-2, 1000 classes), random initialisation, eval mode."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        num_labels=1000,
    )
    return Logits(ResNetForImageClassification(config)).eval()


def images(cfg: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(cfg["images"], 3, cfg["size"], cfg["size"], generator=g)


def _pass_seconds(model: nn.Module, x: torch.Tensor) -> dict:
    def forward():
        with torch.no_grad():
            model(x)

    def backward():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    out = {}
    for key, fn in (("forward", forward), ("forward_backward", backward)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[key] = best
    model.zero_grad(set_to_none=True)
    return out


def _layers(model, cfg):
    from cetopt.lowrank import supported_layers

    names = supported_layers(model)
    return names if cfg["layers"] is None else names[: cfg["layers"]]


def _steps(cfg: dict) -> dict:
    """What each measured step runs; works with the code before and after this work."""
    import inspect

    import cetopt
    from cetopt.lowrank import build_menu

    model, x = resnet18(), images(cfg)
    names = _layers(model, cfg)
    quiet = {"progress": False} if "progress" in inspect.signature(build_menu).parameters else {}
    modules = dict(model.named_modules())
    ranks = {n: max(1, min(modules[n].weight.shape[0], modules[n].weight[0].numel()) // 8) for n in names}

    def menu():
        m = build_menu(model, x, layers=names, **LS_GRID, **quiet)
        return {"options": sum(len(v) for v in m.options.values())}

    def decompose():
        nnz = dict.fromkeys(names, 0.03)
        result = cetopt.decompose(model, x, rank=ranks, nnz=nnz, method="admm", **quiet)
        return {"ratio": result.ratio, "iterations": [len(r.history) - 1 for r in result.layers.values()]}

    return {"build_menu": menu, "decompose_admm": decompose}


def _run_step(cfg: dict, step: str, deadline: float | None = None) -> dict:
    torch.set_num_threads(1)

    def child():
        value = _steps(cfg)[step]()
        return {**value, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    value, seconds, finished = with_deadline(child, deadline or cfg["deadline"])
    return {"seconds": seconds, "finished": finished, **(value or {})}


def _before(cfg: dict, step: str) -> dict:
    """The same step on the code of :data:`BEFORE_COMMIT`, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", BEFORE_COMMIT, "cetopt"], cwd=ROOT, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        code = (
            "import json, sys; from benchmarks.bench_menu_cost import _run_step; "
            f"c = json.loads(sys.argv[1]); print(json.dumps(_run_step(c, {step!r}, c['before_deadline'])))"
        )
        env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}"}
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(cfg)], cwd=tmp, env=env, capture_output=True, text=True
        )
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(entry: dict, passes: dict) -> dict:
    if not entry.get("finished"):
        return entry
    return {
        **entry,
        "forward_passes": entry["seconds"] / passes["forward"],
        "forward_backward_passes": entry["seconds"] / passes["forward_backward"],
    }


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    cfg = QUICK if quick else FULL
    model, x = resnet18(), images(cfg)
    passes = _pass_seconds(model, x)
    steps = {}
    for step in ("build_menu", "decompose_admm"):
        after = _ratios(_run_step(cfg, step), passes)
        before = _ratios(_before(cfg, step), passes)
        steps[step] = {"after": after, "before": before}
        print(f"   {step}: after {after}, before {before}", flush=True)
    return {
        "model": "transformers ResNet-18 (basic, 2-2-2-2), random init, logits",
        "config": {**cfg, "layers": len(_layers(model, cfg)), "ls_grid": LS_GRID, "threads": 1},
        "before_commit": BEFORE_COMMIT,
        "pass_seconds": passes,
        "steps": steps,
    }
