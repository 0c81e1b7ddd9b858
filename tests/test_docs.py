"""The docs as users read them: README code blocks run, docs/results.md is the JSON's, mkdocs builds."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: A README block preceded by this marker (within the two lines above its fence) is not run here.
SKIP = "<!-- skip-test"


def readme_blocks() -> list[tuple[int, str, str, bool]]:
    """``(line, language, code, skipped)`` of every fenced block in the README."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, language = i, fence.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        above = " ".join(lines[max(0, start - 2) : start])
        skipped = SKIP in above or "<!-- test-command -->" in above  # pytest must not run itself
        blocks.append((start + 1, language, "\n".join(body), skipped))
        i += 1
    return blocks


def test_readme_is_a_short_quickstart_with_the_ci_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 160
    command = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", text, re.S)
    assert (
        command and command.group(1) == 'pip install -c constraints.txt -e ".[test]" && python -m pytest -q'
    )
    assert (ROOT / "docs" / "reliability.md").exists()


def test_readme_code_blocks_run(tmp_path, monkeypatch):
    """Every python and bash block runs as written (an install prefix aside: this is installed)."""
    import torch

    blocks = [b for b in readme_blocks() if b[1] in ("python", "bash")]
    assert any(not skipped for _, lang, _, skipped in blocks if lang == "python")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    import cetopt

    registered = {info.name for info in cetopt.available_solvers()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, language, code, skipped in blocks:
            if skipped:
                continue
            if language == "python":
                exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_{line}"})
                continue
            for command in code.splitlines():
                command = command.split("#")[0].strip()
                if not command:
                    continue
                command = re.sub(r"^pip install [^&]*&&\s*", "", command)
                command = re.sub(r"^cetopt ", f"{sys.executable} -m cetopt ", command)
                command = re.sub(r"^python ", f"{sys.executable} ", command)
                done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True)
                assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stderr[-2000:]}"
    finally:
        torch.set_num_threads(threads)
        for info in cetopt.available_solvers():  # a solver a block registered must not leak
            if info.name not in registered:
                cetopt.unregister_solver(info.name)


def test_results_page_is_generated_from_the_json():
    from benchmarks.results_page import PAGE, render

    assert PAGE.read_text() == render(), "run python -m benchmarks.results_page and commit docs/results.md"


def test_results_page_renders_any_json_file(tmp_path, monkeypatch):
    """A new, odd, broken or reshaped JSON file never breaks the page."""
    import benchmarks.results_page as page

    files = {
        "brand_new.json": {
            "benchmark": "brand_new",
            "machine": {"date": "2026-12-02T00:00:00", "git_commit": "abc", "cores": 2, "cpu": "x"},
            "note": "a | pipe\nand a newline",
            "rows": [
                {"model": "m", "seed": s, "acc": 0.9 + s / 100, "deep": {"a": {"b": [1, 2]}}}
                for s in range(3)
            ],
            "summary": {"m": {"acc": {"mean": 0.91, "sd": 0.01, "n": 3}, "bytes": 1234.0}},
            "wide": {"only": {f"c{i}": i * 1.5 for i in range(40)}},
            "empty": {},
            "values": list(range(50)),
            "nested": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}},
        },
        "leo.json": [1, 2, 3],  # a known name whose file no longer has the expected shape
        "odd.partial.json": {"x": None, "y": float("nan"), "z": True},
        "broken.json": "{ not json",
    }
    for name, doc in files.items():
        (tmp_path / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))

    def boom(name, doc):
        raise KeyError("summary")

    monkeypatch.setitem(page.RENDERERS, "odd", boom)
    monkeypatch.setattr(page, "ROOT", tmp_path)
    text = page.render(tmp_path)
    for needle in (
        "## brand_new",
        "## LEO",
        "partial run",
        "could not be read",
        "renderer failed",
        "0.91 ± 0.01",
    ):
        assert needle in text, needle
    assert "a \\| pipe and a newline" in text
    assert text == page.render(tmp_path)  # deterministic


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_quick_benchmark_runs_write_to_the_untracked_folder(tmp_path, monkeypatch):
    import benchmarks.harness as harness

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    assert harness.write_result("knapsack", {"x": 1}, quick=True) == tmp_path / "quick" / "knapsack.json"
    assert harness.write_result("knapsack", {"x": 1}) == tmp_path / "knapsack.json"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/results/quick/knapsack.json"], cwd=ROOT
    ).returncode
    assert ignored == 0
