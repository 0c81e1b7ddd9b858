"""Offline datasets: sklearn's 8×8 digits, MNIST-1D and a character-level text corpus.

All three are local (nothing is downloaded). The text corpus is the Python documentation's topic
pages shipped with the standard library (``pydoc_data.topics``). The held-out split is for calibration and
preservation sets; the test split is only for reporting accuracy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from cetopt.errors import CetoptError

__all__ = ["DATASETS", "Dataset", "cache_dir", "load_dataset", "stdlib_files"]


def cache_dir() -> Path:
    """Where trained weights and generated data are cached.

    ``$CETOPT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/cetopt``, else ``~/.cache/cetopt``.
    """
    if os.environ.get("CETOPT_CACHE_DIR"):
        return Path(os.environ["CETOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cetopt"


@dataclass(frozen=True, eq=False)
class Dataset:
    """Tensors of one dataset, in three disjoint splits.

    Attributes
    ----------
    name : str
    x_train, y_train : Tensor
        Training data.
    x_val, y_val : Tensor
        Held out from training: calibration, preservation sets, early decisions.
    x_test, y_test : Tensor
        For reporting only.
    classes : int
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch dimension."""
        return tuple(self.x_train.shape[1:])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {which!r}")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def loader(
        self, which: str, *, batch_size: int = 256, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """A DataLoader of ``(inputs, targets)`` batches over one split."""
        x, y = self.split(which)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def _split(x: np.ndarray, y: np.ndarray, fractions: tuple[float, float], seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = round(fractions[0] * len(x))
    n_val = round(fractions[1] * len(x))
    parts = np.split(order, [n_train, n_train + n_val])
    return [(x[p], y[p]) for p in parts]


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    (xtr, ytr), (xva, yva), (xte, yte) = _split(x, y, (0.6, 0.2), seed=0)
    return _make("digits", xtr, ytr, xva, yva, xte, yte, 10)


def _mnist1d() -> Dataset:
    path = cache_dir() / "data" / "mnist1d.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        raw = make_dataset(get_dataset_args())  # seed 42, 4000 train + 1000 test, generated locally
        arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        _save_npz(path, arrays)
    x = arrays["x"].astype(np.float32)[:, None, :]  # (N, 1, 40), raw values
    y = arrays["y"].astype(np.int64)
    (xtr, ytr), (xva, yva), _ = _split(x, y, (0.8, 0.2), seed=0)
    xte = arrays["x_test"].astype(np.float32)[:, None, :]
    return _make("mnist1d", xtr, ytr, xva, yva, xte, arrays["y_test"].astype(np.int64), 10)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    from cetopt._io import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _make(name, xtr, ytr, xva, yva, xte, yte, classes) -> Dataset:
    t = torch.from_numpy
    return Dataset(name, t(xtr), t(ytr), t(xva), t(yva), t(np.ascontiguousarray(xte)), t(yte), classes)


#: Characters of the text corpus; anything else maps to ``"?"``. Index = token id.
TEXT_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
TEXT_CONTEXT = 64


def encode_text(text: str) -> torch.Tensor:
    """Token ids of ``text`` in :data:`TEXT_VOCAB` (unknown characters become ``"?"``)."""
    lookup = {ch: i for i, ch in enumerate(TEXT_VOCAB)}
    unknown = lookup["?"]
    return torch.tensor([lookup.get(ch, unknown) for ch in text], dtype=torch.int64)


def _windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(ids) - 1) // context
    x = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return x.contiguous(), y.contiguous()


def _pydoc_text() -> Dataset:
    """Next-character prediction on the stdlib's ``pydoc_data.topics`` (the Python docs' topic pages).

    The topics, in sorted order, are concatenated and cut into three contiguous blocks (80% train,
    10% held-out, 10% test), so no window of one split overlaps another. Each example is a window of
    :data:`TEXT_CONTEXT` characters; its target is the same window shifted by one.
    """
    from pydoc_data.topics import topics

    ids = encode_text("\n".join(topics[k] for k in sorted(topics)))
    a, b = int(0.8 * len(ids)), int(0.9 * len(ids))
    (xtr, ytr), (xva, yva), (xte, yte) = (
        _windows(ids[lo:hi], TEXT_CONTEXT) for lo, hi in ((0, a), (a, b), (b, len(ids)))
    )
    return Dataset("pydoc-text", xtr, ytr, xva, yva, xte, yte, len(TEXT_VOCAB))


#: Window length of the byte-level stdlib corpus, and the bytes of each split.
STDLIB_CONTEXT = 128
STDLIB_SPLIT_BYTES = {"train": 3 << 19, "val": 1 << 17, "test": 1 << 17}  # 1.5 MiB, 128 KiB, 128 KiB
_STDLIB_BLOCK = 1 << 14  # the corpus is dealt out to the splits in blocks of 16 KiB


def stdlib_files() -> list[Path]:
    """The standard library's own top-level ``*.py`` files, sorted by name (found via ``sysconfig``)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda f: f.name)
    if not files:
        raise CetoptError(f"no standard-library sources found under {root}")
    return files


def _stdlib_bytes() -> Dataset:
    """Next-byte prediction on the Python standard library's own source files (vocabulary 256).

    The top-level ``Lib/*.py`` files, sorted by name, are concatenated (a newline between files) and
    cut into blocks of 16 KiB; the blocks are dealt out in turn, eight to training, one held out,
    one to the test split, so every split spans the whole library and no window crosses splits.
    Each split is cut to its size in :data:`STDLIB_SPLIT_BYTES` (a few CPU-minutes of training) and
    into windows of :data:`STDLIB_CONTEXT` bytes; a target is its window shifted by one byte. The
    text depends on the Python version whose library is found.
    """
    corpus = b"\n".join(f.read_bytes() for f in stdlib_files())
    ids = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
    blocks = ids[: len(ids) // _STDLIB_BLOCK * _STDLIB_BLOCK].reshape(-1, _STDLIB_BLOCK)
    turn = torch.arange(len(blocks)) % 10
    parts = {"train": blocks[turn < 8], "val": blocks[turn == 8], "test": blocks[turn == 9]}
    out = []
    for split, size in STDLIB_SPLIT_BYTES.items():
        stream = parts[split].reshape(-1)[: size + 1]
        if len(stream) < size + 1:
            raise CetoptError(f"the standard library holds too little source for the {split!r} split")
        out.append(_windows(stream, STDLIB_CONTEXT))
    (xtr, ytr), (xva, yva), (xte, yte) = out
    return Dataset("stdlib-bytes", xtr, ytr, xva, yva, xte, yte, 256)


DATASETS = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "pydoc-text": _pydoc_text,
    "stdlib-bytes": _stdlib_bytes,
}
_LOADED: dict[str, Dataset] = {}


def load_dataset(name: str) -> Dataset:
    """Load (or generate) a dataset by name: ``"digits"``, ``"mnist1d"``, ``"pydoc-text"``,
    ``"stdlib-bytes"``."""
    if name not in DATASETS:
        raise CetoptError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if name not in _LOADED:
        _LOADED[name] = DATASETS[name]()
    return _LOADED[name]
