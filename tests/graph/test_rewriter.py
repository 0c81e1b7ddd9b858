import copy

import pytest
import torch
from torch import fx, nn

from cetopt.errors import DataShapeError, RewriteError, UntraceableModelError
from cetopt.graph import FoldBatchNorm, Quantize, RemoveUnits, rewrite
from tests.graph.models import example, make_dead_units
from tests.graph.test_trace import DataDependent


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
        copy.deepcopy([type(m) for m in model.modules()]),
    )


def test_input_model_is_never_modified():
    model, x = example("resnet")
    layer, units, _, _ = make_dead_units("resnet", model)
    state, mode, types = snapshot(model)
    rewrite(model, [RemoveUnits(layer, units), FoldBatchNorm("bn"), Quantize("fc", 4)], x)
    after, mode_after, types_after = snapshot(model)
    assert mode == mode_after and types == types_after and state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_graph_plans_return_a_graph_module_with_the_original_names():
    model, x = example("cnn")
    new = rewrite(model, [FoldBatchNorm("bn1")], x)
    assert isinstance(new, fx.GraphModule)
    assert set(new.state_dict()) == set(model.state_dict()) - {
        k for k in model.state_dict() if k.startswith("bn1.")
    }
    torch.save(new.state_dict(), "/dev/null")  # a plain state_dict, savable as any


def test_training_mode_is_kept():
    model, _x = example("cnn")
    model.train()
    assert rewrite(model, [Quantize("conv1", 8)]).training


def test_graph_plan_needs_example_inputs():
    model, _ = example("cnn")
    with pytest.raises(DataShapeError, match="example_inputs"):
        rewrite(model, [FoldBatchNorm("bn1")])


def test_untraceable_model_works_for_leaf_swaps_and_fails_clearly_otherwise():
    model = DataDependent()
    new = rewrite(model, [Quantize("fc", 8)])
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-2, atol=1e-2)
    with pytest.raises(UntraceableModelError, match="'inner'"):
        rewrite(model, [RemoveUnits("fc", [0])], x)


def test_unknown_layer_names_the_decision():
    model, x = example("mlp")
    with pytest.raises(RewriteError, match=r"RemoveUnits\('nope'\).*no layer named 'nope'"):
        rewrite(model, [RemoveUnits("nope", [0])], x)


def test_not_a_decision():
    with pytest.raises(TypeError, match="decisions"):
        rewrite(nn.Linear(2, 2), [("fc", 4)])
