"""The demo model zoo: offline datasets and small models trained deterministically on the CPU.

>>> from cetopt.zoo import load_model, load_dataset
>>> model = load_model("digits-resnet")        # trains once (< 60 s), then loads from the cache
>>> data = load_dataset("digits")
>>> loader = data.loader("val", batch_size=128)

Weights are cached as safetensors under :func:`cache_dir` (``$CETOPT_CACHE_DIR`` to move it).
"""

from cetopt.zoo.data import DATASETS, Dataset, cache_dir, load_dataset
from cetopt.zoo.registry import ZOO, ZooEntry, build_model, load_model, model_names, zoo_entry
from cetopt.zoo.training import Recipe, accuracy, train

__all__ = [
    "DATASETS",
    "ZOO",
    "Dataset",
    "Recipe",
    "ZooEntry",
    "accuracy",
    "build_model",
    "cache_dir",
    "load_dataset",
    "load_model",
    "model_names",
    "train",
    "zoo_entry",
]
