import pytest

from cetopt.cli import main


def test_solvers_command_lists_every_backend(capsys):
    assert main(["solvers", "--all"]) == 0
    out = capsys.readouterr().out
    for name in ("highs", "cbc", "cvxpy"):
        assert name in out
    assert "dual_bound" in out


def test_demo_solves_with_every_solver(capsys):
    assert main(["demo", "--layers", "30"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["highs"], ["cbc"], ["cvxpy"])]
    assert len(rows) == 3 and all(r[1] == "optimal" for r in rows)
    assert all(float(r[3]) <= 3.2 + 1e-9 for r in rows)  # average bits within the 10x budget


def test_compress_writes_model_and_report(tmp_path, capsys):
    import json

    import torch

    import cetopt
    from cetopt.zoo import load_dataset, load_model

    assert (
        main(
            [
                "compress",
                "--model",
                "digits-mlp-2x25",
                "--budget",
                "10x",
                "--out",
                str(tmp_path),
                "--probes",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test accuracy: fp32" in printed and "bits" in printed
    assert "sensitivity method (auto): measured" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sensitivity_method"] == report["sensitivity_method_choice"]["chose"] == "measured"
    assert set(report["step_seconds"]) == {"sensitivity", "allocation", "quantization", "total"}
    assert report["solver_status"] == "optimal"
    assert report["bytes_on_disk"] == (tmp_path / "model.safetensors").stat().st_size
    assert report["quantized_weight_bytes"] <= report["plan"]["budget_bytes"]
    assert report["plan"]["compression_ratio"] >= 10
    assert set(report["bits"]) == {"layers.1", "layers.3", "layers.5"}
    restored = cetopt.load(tmp_path / "model.safetensors")
    x = load_dataset("digits").x_test
    acc = (restored(x).argmax(1) == load_dataset("digits").y_test).float().mean().item()
    assert acc == pytest.approx(report["accuracy_compressed"])
    assert not torch.equal(restored(x), load_model("digits-mlp-2x25", progress=False)(x))


@pytest.mark.parametrize("flag, sequential", [([], True), (["--no-sequential"], False)])
def test_compress_calibrates_sequentially_by_default_and_reloads(tmp_path, capsys, flag, sequential):
    import json

    import cetopt
    from cetopt.zoo import load_dataset

    args = ["compress", "--model", "digits-mlp-2x25", "--budget", "10x", "--out", str(tmp_path)]
    assert main([*args, "--probes", "4", *flag]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sequential_calibration"] is sequential
    data = load_dataset("digits")
    restored = cetopt.load(tmp_path / "model.safetensors")
    acc = (restored(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(report["accuracy_compressed"])


def test_compress_reports_an_infeasible_budget(tmp_path, capsys):
    assert (
        main(
            [
                "compress",
                "--model",
                "digits-mlp-2x25",
                "--budget",
                "40x",
                "--out",
                str(tmp_path),
                "--bits",
                "4,8",
                "--method",
                "fisher",
            ]
        )
        == 2
    )
    assert "smallest" in capsys.readouterr().err


def test_decompose_command_chooses_a_menu_plan(tmp_path, capsys):
    import json

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ["decompose", "--model", "digits-mlp-2x25", "--params-ratio", "3", "--kinds", "svd,prune"]
    try:
        assert main([*args, "--calibration-size", "128", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "test accuracy: fp32" in printed and "layers.1" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params"] <= report["budget"]
    assert (tmp_path / "model.safetensors").exists()
    assert main(["decompose", "--model", "digits-mlp-2x25", "--params-ratio", "1000", "--kinds", "svd"]) == 2
    assert "budget" in capsys.readouterr().err


def test_self_compress_writes_a_packed_model_and_report(tmp_path, capsys):
    import json

    import cetopt
    from cetopt.zoo import load_dataset

    code = main(
        [
            "self-compress",
            "--model",
            "digits-mlp-2x25",
            "--out",
            str(tmp_path),
            "--steps",
            "40",
            "--bit-lr",
            "0.2",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantized_weight_bytes"] == report["size_term_bytes"]
    assert report["bytes_on_disk"] < report["fp32_bytes_on_disk"]
    assert set(report["preservation"]) == {"uncertainty", "diversity", "saliency"}
    restored = cetopt.load(tmp_path / "model.safetensors")
    data = load_dataset("digits")
    acc = (restored(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(report["accuracy_compressed"])
    assert "self-compressed" in capsys.readouterr().out


def test_leo_finds_and_removes_stable_units(tmp_path, capsys):
    import json

    out = tmp_path / "leo.json"
    assert main(["leo", "--model", "digits-2x25", "--l1", "1e-3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "inactive" in printed and "parameters" in printed
    report = json.loads(out.read_text())
    assert report["removal"]["params_after"] < report["removal"]["params_before"]
    assert report["max_diff_test"] <= 1e-5
    assert sum(layer["inactive"] for layer in report["layers"]) > 0


def test_compress_joint_writes_the_bit_allocation_report_and_the_search(tmp_path, capsys):
    import json

    import torch

    import cetopt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ["compress", "--model", "digits-mlp-2x25", "--budget", "8x", "--out", str(tmp_path), "--joint"]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "test accuracy: fp32" in printed and "joint menu: chose" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["step_seconds"]) == {"sensitivity", "joint", "total"}
    assert report["plan"]["bytes"] <= report["plan"]["budget_bytes"]
    joint = report["joint"]
    names = [c["name"] for c in joint["candidates"]]
    assert "bits" in names and "joint" in names and joint["chosen"] in names
    # chosen on the held-out check split: never above bits only there
    losses = {c["name"]: c["check_loss"] for c in joint["candidates"]}
    assert losses[joint["chosen"]] <= losses["bits"]
    assert joint["selection"]["champion"] in names and joint["selection"]["check_examples"] > 0
    assert joint["fell_back_to_bits"] == (joint["chosen"] == "bits") == (not joint["selection"]["prefer"])
    restored = cetopt.load(tmp_path / "model.safetensors")
    from cetopt.zoo import load_dataset

    data = load_dataset("digits")
    acc = (restored(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(report["accuracy_compressed"])
