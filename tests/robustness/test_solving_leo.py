"""Issue 16, defect 2 (LEO): a plugin's false dual bound never makes LEO remove an unstable unit."""

import warnings

import numpy as np
import pytest
import torch

import cetopt
from cetopt.leo.exhaustive import exhaustive_states
from cetopt.leo.formulation import INACTIVE
from cetopt.leo.network import extract
from tests.leo.nets import tiny_mlp


class FalseInactiveProof(cetopt.Solver):
    """Answers every maximisation of a pre-activation with "stopped, max ≤ −1", and every
    minimisation with a useless but true bound, never with a point.

    No point is attached, so cetopt.solve has nothing to refute the bound with: LEO must.
    """

    name = "false-inactive-proof"
    capabilities = cetopt.Capabilities(mip=True, dual_bound=True)

    def solve(self, problem, time_limit=None, mip_gap=None):
        bound = -1.0 if problem.sense == "max" else -1e6
        return cetopt.Solution(status="stopped", bound=bound, solver=self.name)


class LiesNextToItsPoint(FalseInactiveProof):
    """The same lie, next to the solver's own (true) maximiser: cetopt.solve itself rejects it."""

    name = "lies-next-to-its-point"

    def solve(self, problem, time_limit=None, mip_gap=None):
        honest = cetopt.solve(problem, "highs", time_limit, 0.0)
        if problem.sense != "max" or honest.x is None or honest.objective <= 0:
            return honest
        return cetopt.Solution(
            status="optimal", x=honest.x, objective=honest.objective, bound=-1.0, solver=self.name
        )


@pytest.mark.parametrize("solver", [FalseInactiveProof, LiesNextToItsPoint])
def test_a_false_bound_never_removes_an_unstable_unit(solver):
    model = tiny_mlp(0)
    truth = exhaustive_states(extract(model, (2,)), np.full(2, -1.0), np.full(2, 1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = cetopt.find_stable_units(
            model, (-1.0, 1.0), solver=solver(), stages=("interval", "lp", "milp"), workers=1
        )
    for layer, true_state in zip(report.layers, truth):
        claimed = layer.state == INACTIVE
        assert (true_state[claimed] == INACTIVE).all(), (layer.name, layer.state, true_state)
    small = cetopt.remove_stable_units(model, report)
    x = torch.rand(4000, 2, dtype=torch.float32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
    if solver is FalseInactiveProof:  # the user hears that a solver's bound was refuted
        assert any("contradicted" in str(w.message) for w in caught)
