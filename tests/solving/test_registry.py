import importlib
import textwrap

import numpy as np
import pytest

import cetopt
from cetopt.errors import SolverRegistrationError, UnknownSolverError
from tests.solvers.scipy_user_solver import ScipyMilpSolver


def tiny_problem():
    return cetopt.MILP(c=[1.0], col_lower=[2.0], col_upper=[5.0], integrality=[True])


def test_builtins_register_through_entry_points():
    infos = {i.name: i for i in cetopt.available_solvers()}
    for name in ("highs", "cbc", "cvxpy"):
        assert infos[name].origin.startswith("entry point solvers.")


def test_register_then_use_by_name(clean_registry):
    cetopt.register_solver(ScipyMilpSolver)
    assert "scipy-milp" in {i.name for i in cetopt.available_solvers()}
    sol = cetopt.solve(tiny_problem(), "scipy-milp")
    assert sol.status == "optimal" and sol.objective == 2.0 and sol.solver == "scipy-milp"


def test_instance_and_class_work_without_registration():
    assert cetopt.solve(tiny_problem(), ScipyMilpSolver()).objective == 2.0
    assert cetopt.solve(tiny_problem(), ScipyMilpSolver).objective == 2.0


def test_taken_name_is_an_error_unless_replaced(clean_registry):
    class Impostor(ScipyMilpSolver):
        name = "highs"

    with pytest.raises(SolverRegistrationError, match="already registered"):
        cetopt.register_solver(Impostor)
    cetopt.register_solver(Impostor, replace=True)
    assert isinstance(cetopt.get_solver("highs"), Impostor)


def test_decorator_form(clean_registry):
    @cetopt.register_solver(name="decorated")
    class Decorated(ScipyMilpSolver):
        pass

    assert cetopt.get_solver("decorated").__class__ is Decorated


def test_non_solver_is_rejected(clean_registry):
    with pytest.raises(SolverRegistrationError, match="not a subclass"):
        cetopt.register_solver(object)

    class Nameless(cetopt.Solver):
        def solve(self, problem, time_limit=None, mip_gap=None):
            raise AssertionError

    with pytest.raises(SolverRegistrationError, match="name"):
        cetopt.register_solver(Nameless)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(UnknownSolverError, match=r"unknown solver 'gurobi'.*cbc.*cvxpy.*highs"):
        cetopt.solve(tiny_problem(), "gurobi")


def test_entry_point_plugin_is_discovered(clean_registry, tmp_path, monkeypatch):
    (tmp_path / "myplugin.py").write_text(
        textwrap.dedent("""
        from tests.solvers.scipy_user_solver import ScipyMilpSolver

        class PluginSolver(ScipyMilpSolver):
            name = "from-plugin"

        class Broken:
            pass
    """)
    )
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[cetopt.solvers]\nfrom-plugin = myplugin:PluginSolver\nbroken = myplugin:Broken\n"
        "missing = no_such_module:Solver\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    clean_registry._refresh_entry_points()
    infos = {i.name: i for i in cetopt.available_solvers()}
    assert infos["from-plugin"].available
    assert cetopt.solve(tiny_problem(), "from-plugin").objective == 2.0
    # Broken plugins are listed as unavailable with the reason, and never break the registry.
    assert not infos["broken"].available and "not a subclass" in infos["broken"].reason
    assert not infos["missing"].available and "no_such_module" in infos["missing"].reason
    with pytest.raises(UnknownSolverError, match="could not be loaded"):
        cetopt.solve(tiny_problem(), "missing")


def test_unregister(clean_registry):
    cetopt.register_solver(ScipyMilpSolver)
    cetopt.unregister_solver("scipy-milp")
    with pytest.raises(UnknownSolverError):
        cetopt.get_solver("scipy-milp")
    with pytest.raises(UnknownSolverError):
        cetopt.unregister_solver("scipy-milp")


def test_solution_x_is_float_array():
    sol = cetopt.solve(tiny_problem())
    assert isinstance(sol.x, np.ndarray) and sol.x.dtype == np.float64
