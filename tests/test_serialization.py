import os

import pytest
import torch

import cetopt
from cetopt.allocation import allocate
from cetopt.analysis import SensitivityTable
from cetopt.errors import CetoptError
from cetopt.graph import RemoveUnits
from cetopt.serialization import file_tensor_bytes
from tests.graph.models import KINDS, example, make_dead_units


def layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_reproduces_outputs_exactly(kind, tmp_path):
    model, x = example(kind)
    layer, units, constants, _ = make_dead_units(kind, model)
    pruned = cetopt.rewrite(model, [RemoveUnits(layer, units, constants)], x)
    quantized = cetopt.quantize(pruned, {name: 2 + i % 5 for i, name in enumerate(layer_names(pruned))})
    info = cetopt.save(quantized, tmp_path / "m.safetensors")
    assert info.bytes_on_disk == os.path.getsize(tmp_path / "m.safetensors")
    assert info.bytes_on_disk == info.quantized_bytes + info.other_bytes + info.header_bytes
    back = cetopt.load(tmp_path / "m.safetensors", model=model)
    with torch.no_grad():
        assert torch.equal(back(x), quantized(x))
    assert not any(p.name.startswith(".m.safetensors") for p in tmp_path.iterdir())  # no temp files left


def test_budget_holds_in_the_saved_file(tmp_path):
    model, _x = example("resnet")
    names = layer_names(model)
    params = [model.get_submodule(n).weight.numel() for n in names]
    channels = [model.get_submodule(n).weight.shape[0] for n in names]
    table = SensitivityTable(
        layers=names,
        bits=(2, 3, 4, 8),
        values=torch.rand(len(names), 4).sort(dim=1, descending=True).values.numpy(),
        params=params,
        channels=channels,
    )
    plan = allocate(table, "9x")
    info = cetopt.save(cetopt.quantize(model, plan), tmp_path / "m.safetensors")
    sizes = file_tensor_bytes(tmp_path / "m.safetensors")
    in_file = sum(sizes[f"{n}.weight_{k}"] for n in names for k in ("packed", "scale", "bits"))
    assert in_file == info.quantized_bytes == plan.bytes <= plan.budget_bytes


def test_import_source_needs_permission(tmp_path):
    model, x = example("mlp")
    cetopt.mark_source(model, "tests.graph.models:MLP")
    quantized = cetopt.quantize(model, {"fc1": 4})
    cetopt.save(quantized, tmp_path / "m.safetensors")
    with pytest.raises(CetoptError, match="allow_import=True"):
        cetopt.load(tmp_path / "m.safetensors")
    back = cetopt.load(tmp_path / "m.safetensors", allow_import=True)
    with torch.no_grad():
        assert torch.equal(back(x), quantized(x))


def test_not_a_cetopt_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CetoptError, match="not a cetopt file"):
        cetopt.load(tmp_path / "other.safetensors", model=torch.nn.Linear(2, 2))
