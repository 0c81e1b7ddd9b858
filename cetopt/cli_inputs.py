"""What the ``cetopt`` command line reads: your model, your data and your trained weights.

Every argument is checked before any work starts, and a bad one raises :class:`CommandLineError`
naming the flag, the value and what is wrong, which the command prints as one line.

* ``--model``: a zoo name (``cetopt zoo``; old spellings such as ``digits-2x100`` are accepted with
  a hint) or ``module:attr``. The module is imported with the current folder on ``sys.path``;
  ``attr`` is an ``nn.Module`` or a callable taking no arguments that returns one.
* ``--data``: a zoo dataset name, a NumPy ``.npz`` (read with ``allow_pickle=False``) or a
  safetensors file holding arrays ``x`` and ``y``, or ``module:attr`` giving ``(x, y)`` or a
  DataLoader (or a callable returning either). Files may also hold ``x_val``/``y_val`` and
  ``x_test``/``y_test``; without them the examples are split 60/20/20 into train (calibration),
  val and test (reporting) with a fixed seed.
* ``--checkpoint``: a safetensors file of the architecture's ``state_dict``, loaded strictly.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cetopt.errors import CetoptError, CommandLineError
from cetopt.zoo.data import DATASETS, Dataset

__all__ = [
    "canonical_model_name",
    "check_fits",
    "load_checkpoint",
    "load_data",
    "load_user_object",
    "split_examples",
]

#: Split shares used when a data file holds only ``x`` and ``y`` (train, val; the rest is test).
SPLIT = (0.6, 0.2)


def canonical_model_name(name: str) -> tuple[str, str | None]:
    """The zoo's name for ``name``, and a hint when an old spelling was used.

    ``digits-2x100`` (the name ``cetopt leo`` used to take) is ``digits-mlp-2x100``.
    """
    import re

    match = re.fullmatch(r"(digits|digits28|digits32|mnist1d)-(\d+)x(\d+)", name)
    if match is None:
        return name, None
    new = f"{match.group(1)}-mlp-{match.group(2)}x{match.group(3)}"
    return new, f"note: model {name!r} is now called {new!r}; the old name still works"


def _is_spec(text: str) -> bool:
    """True for ``module:attr`` (not a Windows drive path such as ``C:\\data.npz``)."""
    module, sep, attr = text.partition(":")
    return bool(sep) and bool(module) and bool(attr) and "/" not in text and "\\" not in text


def load_user_object(spec: str, flag: str):
    """Import ``module:attr`` (current folder importable) and return the attribute.

    Raises
    ------
    CommandLineError
        The module cannot be imported, or has no such attribute.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CommandLineError(f"{flag} {spec!r}: expected module:attr, e.g. mymodel:build")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CommandLineError(f"{flag} {spec!r}: cannot import module {module_name!r} ({reason})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandLineError(f"{flag} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_user_model(spec: str) -> nn.Module:
    """The ``nn.Module`` named by ``module:attr``: the attribute itself, or what calling it returns."""
    obj = load_user_object(spec, "--model")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise CommandLineError(
                f"--model {spec!r} is a {type(obj).__name__}, "
                "not a torch.nn.Module or a function returning one"
            )
        try:
            obj = obj()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise CommandLineError(f"--model {spec!r}: calling it raised {reason}") from exc
        if not isinstance(obj, nn.Module):
            raise CommandLineError(f"--model {spec!r} returned a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def split_examples(name: str, x: torch.Tensor, y: torch.Tensor, extra: dict | None = None) -> Dataset:
    """A :class:`~cetopt.zoo.Dataset` from examples: given val/test splits, else a seeded 60/20/20 split."""
    extra = extra or {}
    if "x_test" in extra:
        x_val, y_val = extra.get("x_val"), extra.get("y_val")
        x_tr, y_tr = x, y
        if x_val is None:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
            n_val = max(1, round(0.2 * len(x)))
            x_tr, y_tr, x_val, y_val = x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]
        x_te, y_te = extra["x_test"], extra["y_test"]
    else:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        n_tr, n_val = round(SPLIT[0] * len(x)), round(SPLIT[1] * len(x))
        parts = order[:n_tr], order[n_tr : n_tr + n_val], order[n_tr + n_val :]
        (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = ((x[p], y[p]) for p in parts)
    classes = int(max(int(t.max()) for t in (y_tr, y_val, y_te) if t.numel()) + 1) if y.numel() else 0
    return Dataset(name, x_tr, y_tr, x_val, y_val, x_te, y_te, classes)


def _tensor(value, what: str, spec: str) -> torch.Tensor:
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise CommandLineError(f"--data {spec!r}: {what} has dtype {array.dtype}, not numbers")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise CommandLineError(f"--data {spec!r}: {what} holds NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _examples(arrays: dict, spec: str) -> Dataset:
    for key in ("x", "y"):
        if key not in arrays:
            raise CommandLineError(
                f"--data {spec!r} has no array {key!r} (found: {', '.join(sorted(arrays)) or 'none'}); "
                "it needs x (inputs, first axis = examples) and y (integer labels)"
            )
    tensors = {k: _tensor(v, k, spec) for k, v in arrays.items() if k in _KEYS}
    for x_key, y_key in (("x", "y"), ("x_val", "y_val"), ("x_test", "y_test")):
        if (x_key in tensors) != (y_key in tensors):
            raise CommandLineError(f"--data {spec!r}: {x_key} and {y_key} come together; one is missing")
        if x_key not in tensors:
            continue
        x, y = tensors[x_key], tensors[y_key]
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
            raise CommandLineError(
                f"--data {spec!r}: {x_key} has shape {tuple(x.shape)} and {y_key} {tuple(y.shape)}; "
                "both need one entry per example along the first axis"
            )
        if y.is_floating_point():
            raise CommandLineError(f"--data {spec!r}: {y_key} must hold integer class labels, not floats")
        if len(y) and int(y.min()) < 0:
            raise CommandLineError(f"--data {spec!r}: {y_key} holds a negative label ({int(y.min())})")
    if len(tensors["x"]) < 5:
        raise CommandLineError(f"--data {spec!r}: {len(tensors['x'])} examples; at least 5 are needed")
    if "x_val" in tensors and "x_test" not in tensors:
        raise CommandLineError(f"--data {spec!r}: x_val is given but x_test is not")
    extra = {k: v for k, v in tensors.items() if k not in ("x", "y")}
    return split_examples(spec, tensors["x"], tensors["y"], extra)


_KEYS = ("x", "y", "x_val", "y_val", "x_test", "y_test")


def _read_file(path: Path, spec: str) -> dict:
    if not path.is_file():
        raise CommandLineError(
            f"--data {spec!r}: no such file" if not path.exists() else f"--data {spec!r}: not a file"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CommandLineError(f"--data {spec!r}: cannot be read ({reason})") from exc
    raise CommandLineError(f"--data {spec!r}: expected a .npz or .safetensors file of x and y arrays")


def _from_object(obj, spec: str) -> Dataset:
    from torch.utils.data import DataLoader

    if callable(obj) and not isinstance(obj, (tuple, list, DataLoader)):
        try:
            obj = obj()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise CommandLineError(f"--data {spec!r}: calling it raised {reason}") from exc
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return _examples({"x": obj[0], "y": obj[1]}, spec)
    if isinstance(obj, DataLoader):
        xs, ys = [], []
        for batch in obj:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise CommandLineError(f"--data {spec!r}: the DataLoader's batches are not (inputs, targets)")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise CommandLineError(f"--data {spec!r}: the DataLoader is empty")
        return _examples({"x": torch.cat(xs), "y": torch.cat(ys)}, spec)
    raise CommandLineError(
        f"--data {spec!r} gave a {type(obj).__name__}; "
        "expected (x, y) arrays or a DataLoader of (inputs, targets)"
    )


def load_data(spec: str) -> Dataset:
    """The dataset named by ``--data``: a zoo dataset, a ``.npz``/``.safetensors`` file, or ``module:attr``.

    The whole dataset is held in memory (the CLI splits and evaluates it); for data that does not
    fit, call :func:`cetopt.compress` from Python with your own DataLoader.

    Raises
    ------
    CommandLineError
        The file is missing, unreadable or lacks ``x``/``y``, the arrays do not pair up, or the
        object is neither ``(x, y)`` nor a DataLoader.
    """
    from cetopt.zoo import load_dataset

    if spec in DATASETS:
        return load_dataset(spec)
    path = Path(spec)
    if path.suffix.lower() in (".npz", ".safetensors") or path.exists():
        return _examples(_read_file(path, spec), spec)
    if _is_spec(spec):
        return _from_object(load_user_object(spec, "--data"), spec)
    raise CommandLineError(
        f"--data {spec!r}: not a zoo dataset ({', '.join(DATASETS)}), "
        "a .npz/.safetensors file, or module:attr"
    )


def check_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors ``state_dict`` file (never a pickle).

    Raises
    ------
    CommandLineError
        The file is missing or not safetensors.
    """
    file = Path(path)
    if not file.is_file():
        raise CommandLineError(f"--checkpoint {path!r}: no such file")
    if file.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise CommandLineError(
            f"--checkpoint {path!r}: only safetensors files are read (never pickles); convert it with "
            "safetensors.torch.save_file(torch.load(f, weights_only=True), 'w.safetensors')"
        )
    try:
        from safetensors.torch import load_file

        return load_file(str(file))
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CommandLineError(f"--checkpoint {path!r}: not a readable safetensors file ({reason})") from exc


def load_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly; a mismatch names the keys and shapes that differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]

    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(
            f"shape of {k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
            + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else "")
        )
    if problems:
        raise CommandLineError(f"--checkpoint {path!r} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_fits(model: nn.Module, data: Dataset, spec: str) -> None:
    """Run ``model`` on two examples, so a model that does not fit the data fails now, in one line."""
    x = data.x_train[:2]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CommandLineError(
            f"--model {spec!r} cannot run on the data's inputs of shape {tuple(x.shape[1:])} ({reason})"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != len(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CommandLineError(
            f"--model {spec!r} gave {shape} on 2 examples; expected logits (batch, classes)"
        )
    if data.classes and out.shape[-1] < data.classes and out.dim() == 2:
        raise CommandLineError(
            f"--model {spec!r} has {out.shape[-1]} outputs but the labels reach {data.classes - 1}"
        )


def zoo_error(exc: CetoptError, name: str) -> CommandLineError:
    """A zoo lookup failure as a ``--model`` error."""
    return CommandLineError(f"--model {name!r}: {exc}")
