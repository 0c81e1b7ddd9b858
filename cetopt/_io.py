"""Atomic file writes: a reader never sees a half-written file, and a crash leaves the old one intact.

Every file cetopt writes goes through :func:`atomic_write_bytes`. The data goes to a temporary
file beside the target, named ``.<target>.<host>.<pid>.<random>.tmp``, which is fsynced and renamed
over the target. A process killed before the rename strands its temporary file; the next write of
the same target on the same host removes the temporaries whose process is gone (a live process's
are left alone: it may be writing right now). An existing target keeps its permission bits.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cetopt.errors import OutputPathError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, keeping an existing file's permissions.

    Parameters
    ----------
    path : str or PathLike
        The target; its directory is created if needed.
    data : bytes

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_output_dir(path: str | os.PathLike, files: tuple[str, ...] = ()) -> Path:
    """Check, before any work, that ``path`` can be a directory that ``files`` are written into.

    Raises
    ------
    OutputPathError
        ``path`` (or a folder above it) is a file, a file to write is a directory, or a folder
        cannot be written to.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} exists and is not a directory")
    if not path.exists():
        _check_creatable(path)
        return path
    _check_writable_dir(path)
    for name in files:
        check_output_file(path / name)
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that the file ``path`` can be written (created or replaced).

    Raises
    ------
    OutputPathError
        ``path`` is a directory or a read-only file, or its folder cannot be created or written to.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{path} exists and is not writable")
    parent = path.parent
    if parent.exists():
        if not parent.is_dir():
            raise OutputPathError(f"{parent} is not a directory")
        _check_writable_dir(parent)
    else:
        _check_creatable(parent)
    return path


def _check_writable_dir(path: Path) -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path} is not writable")


def _check_creatable(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a writable directory."""
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise OutputPathError(f"cannot create {path}: {above} is a file")
    _check_writable_dir(above)


def _target_mode(path: Path) -> int:
    """The existing file's permission bits, else the usual ones for a new file under the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_host()}.{os.getpid()}."


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by dead processes of this host."""
    head, host = f".{path.name}.", _host()
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(head) and p.name.endswith(".tmp")]
    except OSError:
        return
    for candidate in candidates:
        parts = candidate.name[len(head) : -len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue  # not ours: another target's, another host's, or not a cetopt temporary
        if not _alive(int(parts[1])):
            with contextlib.suppress(OSError):  # another process cleaned it first
                candidate.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot tell: keep its file
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic UTF-8 text write."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write (indented, keys in insertion order, NaN written as null)."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _jsonable(obj: Any) -> Any:
    import math

    import numpy as np

    if isinstance(obj, Mapping):  # dicts and read-only mappings such as a plan's bits
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "value") and isinstance(obj.value, str):  # enums such as Status
        return obj.value
    return obj
