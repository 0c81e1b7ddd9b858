"""The zoo's names, how each model is built and trained, and the weight cache."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from cetopt._io import atomic_write_bytes
from cetopt.errors import CetoptError
from cetopt.zoo import models
from cetopt.zoo.data import cache_dir, load_dataset
from cetopt.zoo.training import TRAINING_THREADS, Recipe, train

__all__ = ["ZOO", "ZooEntry", "build_model", "load_model", "model_names", "zoo_entry"]

CACHE_VERSION = 1


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its dataset, how to build the architecture, and how to train it."""

    name: str
    dataset: str
    build: Callable[[], nn.Module]
    recipe: Recipe = field(default_factory=Recipe)
    description: str = ""


ZOO: dict[str, ZooEntry] = {}


def _register(entry: ZooEntry) -> None:
    ZOO[entry.name] = entry


_register(
    ZooEntry("digits-cnn", "digits", models.DigitsCNN, Recipe(epochs=30), "2 conv + 2 linear, 8×8 digits")
)
_register(
    ZooEntry(
        "digits-resnet", "digits", models.DigitsResNet, Recipe(epochs=30), "3 residual blocks with BatchNorm"
    )
)
_register(
    ZooEntry(
        "mnist1d-cnn",
        "mnist1d",
        models.Mnist1dCNN,
        Recipe(epochs=60, batch_size=128, lr=1e-2, weight_decay=1e-4),
        "3 strided 1-D conv + linear",
    )
)

_register(
    ZooEntry(
        "pydoc-char-lm",
        "pydoc-text",
        models.CharTransformer,
        Recipe(epochs=6, batch_size=64, lr=3e-3),
        "char-level transformer LM (2 layers, d=64, context 64) on the stdlib's pydoc topics",
    )
)

_register(
    ZooEntry(
        "stdlib-gpt",
        "stdlib-bytes",
        models.StdlibGPT,
        Recipe(epochs=1, batch_size=32, lr=3e-3),
        "byte-level GPT (4 layers, d=128, context 128, untied head) on the stdlib's own sources",
    )
)

_MLP = re.compile(r"^(digits|mnist1d)-mlp-(\d+)x(\d+)$")
_INPUTS = {"digits": 64, "mnist1d": 40}


def _mlp_entry(name: str) -> ZooEntry | None:
    match = _MLP.match(name)
    if match is None:
        return None
    dataset, depth, width = match.group(1), int(match.group(2)), int(match.group(3))
    if not (1 <= depth <= 8 and 1 <= width <= 4096):
        return None
    recipe = Recipe(epochs=40 if dataset == "digits" else 60, batch_size=64, lr=3e-3)
    return ZooEntry(
        name, dataset, lambda: models.MLP(_INPUTS[dataset], width, depth), recipe, f"{depth}×{width} ReLU MLP"
    )


def model_names() -> list[str]:
    """The fixed zoo names. MLPs are named ``<digits|mnist1d>-mlp-<depth>x<width>`` (any size)."""
    return [*ZOO, "digits-mlp-2x100", "mnist1d-mlp-2x100"]


def zoo_entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` called ``name``; an error lists the known names."""
    entry = ZOO.get(name) or _mlp_entry(name)
    if entry is None:
        raise CetoptError(
            f"unknown zoo model {name!r}; available: {', '.join(model_names())} "
            "(MLPs: <digits|mnist1d>-mlp-<depth>x<width>)"
        )
    return entry


def build_model(name: str) -> nn.Module:
    """The untrained architecture ``name``, seeded so it is the same every call."""
    from cetopt.serialization import mark_source

    entry = zoo_entry(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = entry.build()
    return mark_source(model.eval(), f"zoo:{name}")


def _cache_path(entry: ZooEntry, recipe: Recipe, seed: int, model: nn.Module):
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}  # a changed architecture retrains
    key = json.dumps(
        {
            "shapes": shapes,
            "v": CACHE_VERSION,
            "name": entry.name,
            "recipe": recipe.to_dict(),
            "seed": seed,
            "torch": torch.__version__.split("+")[0],
            "threads": TRAINING_THREADS,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{entry.name}-seed{seed}-{digest}.safetensors"


def load_model(
    name: str,
    *,
    seed: int = 0,
    l1: float | None = None,
    epochs: int | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> nn.Module:
    """A trained zoo model in eval mode, from the cache or trained now (deterministic, < 60 s).

    Parameters
    ----------
    name : str
        A zoo name (:func:`model_names`).
    seed : int
        Initialisation and batch-order seed.
    l1 : float, optional
        Override the recipe's L1 weight penalty (LEO's stability-inducing training).
    epochs : int, optional
        Override the recipe's epoch count.
    retrain : bool
        Ignore the cache.
    progress : bool
        Show a progress bar while training.

    Returns
    -------
    nn.Module
        A new module each call; ``model.zoo_info`` holds accuracies and training time.
    """
    from cetopt.serialization import mark_source

    entry = zoo_entry(name)
    recipe = entry.recipe
    if l1 is not None or epochs is not None:
        recipe = Recipe(
            **{
                **recipe.to_dict(),
                **({"l1": l1} if l1 is not None else {}),
                **({"epochs": epochs} if epochs is not None else {}),
            }
        )
    data = load_dataset(entry.dataset)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = entry.build()
    path = _cache_path(entry, recipe, seed, model)
    if path.exists() and not retrain:
        blob = path.read_bytes()
        model.load_state_dict(st_load(blob))
        info = json.loads(_metadata(blob)["info"])
    else:
        info = train(model, data, recipe, seed=seed, progress=progress)
        info.update(recipe=recipe.to_dict(), seed=seed)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, st_save(state, metadata={"info": json.dumps(info)}))
    model.eval()
    model.zoo_info = info
    return mark_source(model, f"zoo:{name}")


def _metadata(blob: bytes) -> dict:
    import struct

    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {})
