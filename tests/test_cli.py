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
