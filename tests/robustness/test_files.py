"""The user's files: loads fail with one named error, saves are atomic and keep permissions, the CLI
checks ``--out`` first and never touches a path it was not asked to write."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import cetopt
from cetopt import cli
from cetopt._io import atomic_write_bytes
from cetopt.errors import CetoptError, ModelFileError

REPO = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[bytes, nn.Module]:
    """A valid file with a Factorize, quantized factors and quantized layers, and its architecture."""
    torch.manual_seed(0)
    base, x = Net().eval(), torch.randn(32, 8)
    d = cetopt.decompose(base, x, rank={"fc2": 2}, nnz={"fc2": 0.2}, method="weight_space", layers=["fc2"])
    model = cetopt.quantize(d.model, {"fc1": 3, "fc3": 4, "fc2.first": 4})
    path = tmp_path_factory.mktemp("saved") / "m.safetensors"
    cetopt.save(model, path)
    return path.read_bytes(), base


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging."""

    def expire(signum, frame):
        raise TimeoutError(f"took over {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _outcome(path: Path, base: nn.Module) -> str:
    """Load ``path``: a model, or a cetopt error; anything else (or a hang) fails the test."""
    with deadline(20):
        try:
            model = cetopt.load(path, model=base)
        except CetoptError as exc:
            assert str(exc), "a named error must say what is wrong"
            return type(exc).__name__
    assert isinstance(model, nn.Module)
    return "loaded"


def _with_metadata(blob: bytes, **changes) -> bytes:
    size = struct.unpack("<Q", blob[:8])[0]
    meta = json.loads(blob[8 : 8 + size])["__metadata__"]
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    return st_save(st_load(blob), metadata=meta)


def _framed(header) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * 16


def test_load_errors_are_named_for_each_kind_of_bad_file(saved, tmp_path):
    blob, base = saved
    cases = {
        "truncated": blob[: len(blob) // 2],
        "short": blob[:5],
        "bad json": struct.pack("<Q", 5) + b"{not}" + b"\0" * 8,
        "bad utf-8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
        "missing field": _drop_field(blob, "history"),
        "deep json": _with_metadata(blob, history="[" * 100_000 + "]" * 100_000),
        "not safetensors": b"PK\x03\x04" + os.urandom(200),
        "wrong offsets": blob.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1),
    }
    assert cases["wrong offsets"] != blob
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelFileError) as info:
            cetopt.load(tmp_path / name, model=base)
        assert str(tmp_path / name) in str(info.value), name
    with pytest.raises(ModelFileError, match="cannot read"):
        cetopt.load(tmp_path / "absent.safetensors", model=base)


def _drop_field(blob: bytes, key: str) -> bytes:
    size = struct.unpack("<Q", blob[:8])[0]
    meta = json.loads(blob[8 : 8 + size])["__metadata__"]
    del meta[key]
    return st_save(st_load(blob), metadata=meta)


@pytest.mark.parametrize(
    "changes",
    [
        {"example_inputs": [{"shape": [1 << 20, 1 << 20], "dtype": "float32"}]},  # 4 TB
        {"example_inputs": [{"shape": [2, 8], "dtype": "save"}]},  # not a dtype
        {
            "history": [
                {
                    "type": "Factorize",
                    "layer": "fc2",
                    "first_shape": [1 << 20, 1 << 20],
                    "second_shape": [12, 2],
                    "nnz": 0,
                    "sparse_numel": None,
                }
            ]
        },
        {
            "history": [
                {
                    "type": "Factorize",
                    "layer": "fc2",
                    "first_shape": [2, 16],
                    "second_shape": [12, 2],
                    "nnz": 5,
                    "sparse_numel": 1 << 42,
                }
            ]
        },
        {"quantized": {"fc1": {"shape": [1 << 30, 1 << 12], "dtype": "int8"}}},
    ],
    ids=["example-inputs", "dtype", "factor", "sparse", "codes"],
)
def test_sizes_in_the_metadata_are_checked_before_allocating(saved, tmp_path, changes):
    blob, base = saved
    path = tmp_path / "huge.safetensors"
    path.write_bytes(_with_metadata(blob, **changes))
    with deadline(10), pytest.raises(ModelFileError):
        cetopt.load(path, model=base)


class _Marker:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CETOPT_TEST_MARKER"]),))


def test_load_never_unpickles(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("CETOPT_TEST_MARKER", str(marker))
    torch.save({"weight": torch.zeros(2), "evil": _Marker()}, tmp_path / "model.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(_Marker()))
    for name in ("model.pt", "raw.pkl"):
        with pytest.raises(ModelFileError):
            cetopt.load(tmp_path / name, model=Net())
    assert not marker.exists()


def _json_value(rng: np.random.Generator, depth: int = 0):
    kind = rng.integers(0, 7 if depth < 3 else 4)
    if kind == 0:
        return int(rng.integers(-(2**62), 2**62))
    if kind == 1:
        return float(rng.normal()) * 10.0 ** int(rng.integers(-5, 30))
    if kind == 2:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, rng.integers(0, 12)))
    if kind == 3:
        return [None, True, False][int(rng.integers(0, 3))]
    if kind == 4:
        return [_json_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    if kind == 5:
        return {str(rng.integers(0, 5)): _json_value(rng, depth + 1) for _ in range(rng.integers(0, 4))}
    return [int(v) for v in rng.integers(0, 1 << 40, rng.integers(1, 4))]  # a huge shape


def _mutations(blob: bytes, rng: np.random.Generator):
    size = struct.unpack("<Q", blob[:8])[0]
    meta = json.loads(blob[8 : 8 + size])["__metadata__"]
    fields = ["source", "history", "example_inputs", "quantized", "format"]
    for _ in range(25):
        yield "truncated", blob[: int(rng.integers(0, len(blob)))]
    for _ in range(40):
        data = bytearray(blob)
        where = rng.integers(0, 8 + size if rng.random() < 0.7 else len(blob), rng.integers(1, 5))
        for i in where:
            data[i] = int(rng.integers(0, 256))
        yield "flipped", bytes(data)
    for _ in range(30):
        field = fields[int(rng.integers(0, len(fields)))]
        yield f"field {field}", _with_metadata(blob, **{field: json.dumps(_json_value(rng))})
    for _ in range(20):
        parsed = json.loads(meta["history"] if rng.random() < 0.5 else meta["quantized"])
        _scramble(parsed, rng)
        key = "history" if isinstance(parsed, list) else "quantized"
        yield f"scrambled {key}", _with_metadata(blob, **{key: parsed})
    for _ in range(20):
        yield "random header", _framed({str(_json_value(rng)): _json_value(rng) for _ in range(3)})
    for _ in range(10):
        yield "random bytes", bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))


def _scramble(obj, rng: np.random.Generator) -> None:
    """Replace one leaf of a parsed JSON structure by a random value (often a huge number)."""
    while isinstance(obj, (list, dict)) and obj:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        key = keys[int(rng.integers(0, len(keys)))]
        if not isinstance(obj[key], (list, dict)) or not obj[key] or rng.random() < 0.3:
            obj[key] = _json_value(rng) if rng.random() < 0.5 else int(rng.integers(1 << 30, 1 << 50))
            return
        obj = obj[key]


def test_fuzz_load_either_works_or_raises_a_named_error(saved, tmp_path):
    blob, base = saved
    rng = np.random.default_rng(1616)
    seen: dict[str, set] = {}
    path = tmp_path / "fuzz.safetensors"
    for kind, data in _mutations(blob, rng):
        path.write_bytes(data)
        seen.setdefault(kind, set()).add(_outcome(path, base))
    assert "ModelFileError" in set().union(*seen.values())


def test_non_safetensors_files_raise_the_named_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("x", "y")
    (tmp_path / "text.txt").write_text("hello, this is not a model\n")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "arr.npy", np.zeros(3))
    for name in ("a.zip", "text.txt", "empty", "folder", "arr.npy"):
        with pytest.raises(ModelFileError):
            cetopt.load(tmp_path / name, model=Net())


def test_save_keeps_an_existing_files_permissions(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o640)
    cetopt.save(cetopt.quantize(Net().eval(), {"fc1": 4}), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    atomic_write_bytes(tmp_path / "r.json", b"{}")
    (tmp_path / "r.json").chmod(0o600)
    atomic_write_bytes(tmp_path / "r.json", b"[]")
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o600


_CRASH = """
import os, sys
import cetopt._io as io
def crash(src, dst):
    os._exit(3)  # killed between writing the temporary file and renaming it
io.os.replace = crash
io.atomic_write_bytes(sys.argv[1], b"new contents")
"""


def test_a_crash_leaves_no_temporary_file_after_the_next_save(tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _CRASH, str(target)], env=env, cwd=REPO)
    assert done.returncode == 3
    assert target.read_bytes() == b"old"
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the crash stranded one
    live = tmp_path / f".m.safetensors.{socket.gethostname()}.{os.getpid()}.abc.tmp"
    live.write_bytes(b"a live writer's")  # one of this (live) process must survive
    atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


@pytest.fixture
def no_work(monkeypatch):
    """Every subcommand's work fails loudly: a check of --out must come before it."""
    for name, (configure, _, text) in list(cli.COMMANDS.items()):
        monkeypatch.setitem(cli.COMMANDS, name, (configure, _refuse, text))


def _refuse(args):
    raise AssertionError("the command started working before checking --out")


_ARGS = {
    "compress": ["--model", "digits-mlp-2x25", "--budget", "10x"],
    "decompose": ["--model", "digits-mlp-2x25", "--params-ratio", "2"],
    "self-compress": ["--model", "digits-mlp-2x25"],
    "leo": [],
}


@pytest.mark.parametrize("command", list(_ARGS))
def test_cli_checks_out_before_any_work(command, tmp_path, capsys, no_work, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "folder"
    a_dir.mkdir()
    wrong = a_dir if command == "leo" else a_file
    for out, message in ((wrong, "directory"), (a_file / "below" / "r.json", "is a file")):
        assert cli.main([command, *_ARGS[command], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    target = tmp_path / "new.json" if command == "leo" else a_dir
    assert cli.main([command, *_ARGS[command], "--out", str(target)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_self_compress_leaves_the_users_other_files_alone(tmp_path, capsys):
    mine = tmp_path / "fp32.safetensors"
    mine.write_bytes(b"the user's own file")
    code = cli.main(
        [
            "self-compress",
            "--model",
            "digits-mlp-2x25",
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--no-preservation",
        ]
    )
    assert code == 0
    assert mine.read_bytes() == b"the user's own file"
    report = json.loads((tmp_path / "report.json").read_text())
    from cetopt.zoo import load_model

    reference = cetopt.save(load_model("digits-mlp-2x25"), tmp_path / "elsewhere" / "ref.safetensors")
    assert report["fp32_bytes_on_disk"] == reference.bytes_on_disk
