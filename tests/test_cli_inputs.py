"""The command line on your own model, data and weights, and its one-line errors before any work."""

import json
import sys

import numpy as np
import pytest
import torch

from cetopt.cli import _plain_numbers, build_parser, main

MODULE = """
import pathlib

import torch
from torch import nn

VALUE = 3


def build():
    pathlib.Path("built.marker").write_text("built")
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


def wrong_model():
    return nn.Linear(5, 3)


def not_data():
    return "a string"


def data_pair():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 16, generator=g)
    return x, (x[:, :10]).argmax(1)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``h19mod.py`` (build(): an MLP), ``mydata.npz`` and trained ``w.safetensors``, made once."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("own")
    (folder / "h19mod.py").write_text(MODULE)
    (folder / "broken_h19.py").write_text("raise RuntimeError('broken on import')\n")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = (x @ rng.normal(size=(16, 10))).argmax(1)
    np.savez(folder / "mydata.npz", x=x, y=y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(150):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_file(model.state_dict(), str(folder / "w.safetensors"))
    return folder


@pytest.fixture
def workdir(files, tmp_path, monkeypatch):
    """A fresh copy of ``files`` as the current folder, importable as the CLI makes it."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(files, work)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield work
    torch.set_num_threads(threads)
    for name in ("h19mod", "broken_h19"):
        sys.modules.pop(name, None)


def test_compress_own_model_data_and_checkpoint(workdir, capsys):
    import cetopt

    args = ["compress", "--model", "h19mod:build", "--data", "mydata.npz", "--checkpoint", "w.safetensors"]
    assert main([*args, "--budget", "4x", "--out", "out"]) == 0
    captured = capsys.readouterr()
    assert "[1/5] loading model h19mod:build" in captured.err and "[5/5]" in captured.err
    assert "size on disk" in captured.out and "x smaller" in captured.out and "% of fp32" in captured.out
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["model"] == "h19mod:build" and report["checkpoint"] == "w.safetensors"
    assert report["per_channel"] is False
    assert report["accuracy_fp32"] > 0.9  # the checkpoint's trained weights, not build()'s random ones
    assert report["accuracy_compressed"] > 0.8
    parts = report["quantized_weight_bytes"] + report["other_bytes"] + report["header_bytes"]
    assert parts == report["bytes_on_disk"] == (workdir / "out" / "model.safetensors").stat().st_size
    assert report["quantized_weight_bytes"] <= report["plan"]["budget_bytes"]
    assert report["weight_compression_ratio"] >= 4
    sys.modules.pop("h19mod", None)
    import h19mod

    restored = cetopt.load(workdir / "out" / "model.safetensors", model=h19mod.build())
    with np.load(workdir / "mydata.npz") as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    assert (restored(x).argmax(1) == y).float().mean().item() > 0.8


def test_quiet_silences_stage_lines(workdir, capsys):
    args = ["compress", "--model", "h19mod:build", "--data", "mydata.npz", "--checkpoint", "w.safetensors"]
    assert main([*args, "--budget", "4x", "--out", "out", "--quiet", "--no-gptq"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "size on disk" in captured.out


BAD = [
    (["--model", "h19mod:nothing", "--data", "mydata.npz"], "has no attribute 'nothing'", False),
    (["--model", "no_such_module_h19:build", "--data", "mydata.npz"], "cannot import module", False),
    (["--model", "broken_h19:build", "--data", "mydata.npz"], "broken on import", False),
    (["--model", "h19mod:VALUE", "--data", "mydata.npz"], "not a torch.nn.Module", False),
    (["--model", "h19mod:wrong_model", "--data", "mydata.npz"], "cannot run on the data", False),
    (["--model", "digits-mlp-nope"], "unknown zoo model", False),
    (["--model", "h19mod:build"], "--data is needed", False),
    (["--model", "h19mod:build", "--data", "missing.npz"], "no such file", False),
    (["--model", "h19mod:build", "--data", "only_x.npz"], "no array 'y'", False),
    (["--model", "h19mod:build", "--data", "pickled.npz"], "cannot be read", False),
    (["--model", "h19mod:build", "--data", "notes.txt"], "expected a .npz or .safetensors", False),
    (
        ["--model", "h19mod:build", "--data", "h19mod:not_data"],
        "expected (x, y) arrays or a DataLoader",
        False,
    ),
    (["--model", "h19mod:build", "--data", "nan.npz"], "NaN", False),
    (
        ["--model", "h19mod:build", "--data", "mydata.npz", "--checkpoint", "gone.safetensors"],
        "no such file",
        False,
    ),
    (["--model", "h19mod:build", "--data", "mydata.npz", "--checkpoint", "w.pt"], "only safetensors", False),
    (
        ["--model", "h19mod:build", "--data", "mydata.npz", "--checkpoint", "bad.safetensors"],
        "not a readable",
        False,
    ),
    (
        ["--model", "h19mod:build", "--data", "mydata.npz", "--checkpoint", "other.safetensors"],
        "does not fit",
        True,
    ),
    (["--model", "h19mod:build", "--data", "mydata.npz", "--out", "afile"], "not a directory", False),
    (["--model", "h19mod:build", "--data", "mydata.npz", "--budget", "0.5x"], "at least 1", False),
    (["--model", "h19mod:build", "--data", "mydata.npz", "--bits", "1,4"], "2..16", False),
]


@pytest.mark.parametrize("args, message, builds", BAD, ids=[b[1] for b in BAD])
def test_bad_arguments_fail_in_one_line_before_any_work(workdir, capsys, monkeypatch, args, message, builds):
    from safetensors.torch import save_file

    import cetopt.pipeline
    import cetopt.zoo

    np.savez(workdir / "only_x.npz", x=np.zeros((10, 16), np.float32))
    np.savez(workdir / "pickled.npz", x=np.array([object()] * 10, dtype=object), y=np.arange(10))
    np.savez(workdir / "nan.npz", x=np.full((10, 16), np.nan, np.float32), y=np.arange(10))
    (workdir / "notes.txt").write_text("x y")
    (workdir / "w.pt").write_bytes(b"\x80\x02")
    (workdir / "bad.safetensors").write_bytes(b"not safetensors at all")
    save_file({"weight": torch.zeros(3, 3)}, str(workdir / "other.safetensors"))
    (workdir / "afile").write_text("")

    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cetopt.pipeline, "compress", no_work)
    monkeypatch.setattr(cetopt.zoo, "load_model", no_work)
    full = ["compress", *args]
    full += [] if "--budget" in args else ["--budget", "4x"]
    full += [] if "--out" in args else ["--out", "out"]
    assert main(full) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cetopt compress: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and "np.float64" not in err
    assert (workdir / "built.marker").exists() is builds  # bad files are caught before any import or build
    assert not (workdir / "out").exists()


def test_data_from_a_module_and_an_old_model_name(workdir, capsys, monkeypatch):
    from cetopt.cli_inputs import canonical_model_name, load_data

    data = load_data("h19mod:data_pair")
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 60 and data.classes <= 10
    assert canonical_model_name("digits-2x100")[0] == "digits-mlp-2x100"
    assert canonical_model_name("digits-mlp-2x100") == ("digits-mlp-2x100", None)

    import cetopt.pipeline

    def stop(*a, **k):
        raise SystemExit(7)

    monkeypatch.setattr(cetopt.pipeline, "compress", stop)
    with pytest.raises(SystemExit):
        main(["compress", "--model", "digits-2x25", "--budget", "10x", "--out", "out"])
    assert "now called 'digits-mlp-2x25'" in capsys.readouterr().err


def test_every_help_shows_defaults_and_numbers_print_plainly():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, child in sub.choices.items():
        text = child.format_help()
        for action in child._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert "default" in (action.help or "") or "(default:" in text, (name, action.dest)
        if "--seed" in child._option_string_actions:
            assert child._option_string_actions["--seed"].help
    assert _plain_numbers("got np.float64(0.25) and np.int64(3)") == "got 0.25 and 3"
    from cetopt.errors import BudgetError

    assert str(BudgetError(f"budget {np.float64(0.5)!r}")) == "budget 0.5"


def test_bad_group_sizes_is_a_one_line_error():
    from cetopt.cli import _parse_group_sizes
    from cetopt.errors import CommandLineError

    assert _parse_group_sizes("channel,128") == [None, 128]
    with pytest.raises(CommandLineError, match="--group-sizes"):
        _parse_group_sizes("channel,abc")
