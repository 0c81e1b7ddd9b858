"""Issue 16, weak spots of the solving layer: entry-point clashes, solve_many, argument types."""

import importlib
import textwrap

import numpy as np
import pytest

import cetopt
from cetopt.errors import CallbackError, ProblemError, SolveArgumentError
from cetopt.testing.solver_contract import multiple_choice_knapsack


def small(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(1, 20, (5, 3)).astype(float)
    return multiple_choice_knapsack(rng.uniform(0, 10, (5, 3)), w, w.min(1).sum() + 8)


def test_an_entry_point_named_like_a_builtin_does_not_replace_it(
    clean_registry, tmp_path, monkeypatch, capsys
):
    (tmp_path / "evilplugin.py").write_text(
        textwrap.dedent("""
        from tests.solvers.scipy_user_solver import ScipyMilpSolver

        class Impostor(ScipyMilpSolver):
            name = "highs"

        class Twin(ScipyMilpSolver):
            name = "twin"
    """)
    )
    dist = tmp_path / "evilplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evilplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[cetopt.solvers]\nhighs = evilplugin:Impostor\ntwin = evilplugin:Twin\n"
    )
    other = tmp_path / "otherplugin-0.1.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: otherplugin\nVersion: 0.1\n")
    (other / "entry_points.txt").write_text("[cetopt.solvers]\ntwin = evilplugin:Impostor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    clean_registry._refresh_entry_points()
    infos = {i.name: i for i in cetopt.available_solvers()}
    assert infos["highs"].origin == "entry point solvers.highs:HighsSolver"
    assert infos["highs"].clashes == ("evilplugin:Impostor",)
    assert infos["twin"].clashes  # two plugins, one name: reported
    assert type(cetopt.get_solver("highs")).__module__ == "solvers.highs"
    from cetopt.cli import main

    main(["solvers"])
    assert "clash: entry point 'highs' = evilplugin:Impostor is ignored" in capsys.readouterr().out


def test_solve_many_keeps_every_result_when_one_problem_is_malformed():
    out = cetopt.solve_many([small(0), "not a problem", small(1)], workers=2)
    assert [s.status.value for s in out] == ["optimal", "error", "optimal"]
    assert "cetopt.MILP" in out[1].message


def test_solve_many_keeps_every_result_when_on_done_raises():
    seen = []

    def on_done(i, sol):
        seen.append(i)
        if i == 1:
            raise KeyError("progress bar broke")

    with pytest.raises(CallbackError, match="progress bar broke") as info:
        cetopt.solve_many([small(k) for k in range(4)], on_done=on_done, workers=2)
    assert len(info.value.results) == 4 and all(s.status == "optimal" for s in info.value.results)
    assert info.value.index == 1 and sorted(seen) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"time_limit": "10"}, "time_limit"),
        ({"time_limit": True}, "time_limit"),
        ({"time_limit": [1]}, "time_limit"),
        ({"mip_gap": "0.1"}, "mip_gap"),
        ({"options": [("threads", 1)]}, "options"),
        ({"start": ["a"] * 15}, "start"),
    ],
)
def test_wrong_argument_types_raise_a_named_error(kwargs, name):
    with pytest.raises((SolveArgumentError, ProblemError), match=name):
        cetopt.solve(small(), **kwargs)
    if "start" not in kwargs:
        with pytest.raises(SolveArgumentError, match=name):
            cetopt.solve_many([small()], **kwargs)


def test_the_named_argument_error_is_still_a_value_and_type_error():
    with pytest.raises(TypeError):
        cetopt.solve(small(), time_limit="10")
    with pytest.raises(ValueError):
        cetopt.solve(small(), time_limit=-1)
