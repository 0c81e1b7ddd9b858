import pytest
import torch
from torch import nn

from cetopt.errors import DataShapeError, UntraceableModelError
from cetopt.graph import trace_model
from tests.graph.models import KINDS, example


@pytest.mark.parametrize("kind", KINDS)
def test_layer_names_match_named_modules(kind):
    model, x = example(kind)
    mg = trace_model(model, x)
    names = dict(model.named_modules())
    assert mg.layers() and all(layer in names for layer in mg.layers())
    assert all(type(mg.module.get_submodule(n)) is type(names[n]) for n in mg.layers())


def test_networkx_view_has_shapes_and_tensor_edges():
    model, x = example("cnn")
    g = trace_model(model, x).graph
    conv1 = next(n for n, a in g.nodes(data=True) if a["module"] == "conv1")
    assert g.nodes[conv1]["shape"] == (5, 8, 8, 8) and g.nodes[conv1]["type"] == "Conv2d"
    (succ,) = g.successors(conv1)
    assert g.nodes[succ]["module"] == "bn1" and g.edges[conv1, succ]["shape"] == (5, 8, 8, 8)


def test_containers_are_traced_through_and_layers_are_leaves():
    model, x = example("resnet")
    layers = trace_model(model, x).layers()
    assert "layer2.shortcut.0" in layers and "layer1.conv2" in layers


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.inner(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_names_the_module_and_fx_reason():
    with pytest.raises(UntraceableModelError, match=r"module 'inner' \(Branchy\).*control flow") as info:
        trace_model(DataDependent(), torch.randn(2, 4))
    assert info.value.module_name == "inner"


def test_leaf_types_make_a_module_opaque():
    mg = trace_model(DataDependent(), torch.randn(2, 4), leaf_types=(Branchy,))
    assert "fc" in mg.layers()


def test_wrong_example_shape_is_a_named_error():
    model, _ = example("mlp")
    with pytest.raises(DataShapeError, match=r"\(5, 3\)"):
        trace_model(model, torch.randn(5, 3))
