"""GPTQ at bounded memory: chunked Gram accumulation, lazy block updates, grouped Grams, the
round-to-nearest fallback, and errors that name their true cause."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cetopt
from cetopt.errors import DataShapeError
from cetopt.nn.unfold import input_rows
from cetopt.quant import calibrate_sequentially, gptq_round
from cetopt.quant import gptq as gptq_module
from cetopt.quant._calibration import run_with_hooks
from cetopt.quant.gptq import _round_columns, gram_spans, input_gram


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 5),
    ).eval()


def _data(n=3):
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(n, 16, 1, 6, 6, generator=g)  # correlated input channels: GPTQ has work to do
    x = (shared + 0.3 * torch.randn(n, 16, 4, 6, 6, generator=g)).cumsum(-1)
    return [(x[i], torch.zeros(16, dtype=torch.long)) for i in range(n)]


def _codes(model):
    return {n: m.weight_q.clone() for n, m in model.named_modules() if hasattr(m, "weight_q")}


def test_chunked_gram_equals_the_gram_of_the_full_unfold(monkeypatch):
    model, data = _net(), _data()
    monkeypatch.setattr(gptq_module, "_ROW_CHUNK_ELEMENTS", 500)  # a few samples per chunk
    grams = input_gram(model, ["0", "3"], data, None)
    for name, module in (("0", model[0]), ("3", model[3])):
        inputs = []
        run_with_hooks(model, {name: lambda m, a, o, inputs=inputs: inputs.append(a[0])}, data)
        rows = torch.cat([input_rows(module, x).double() for x in inputs])
        torch.testing.assert_close(grams[name].blocks[0], rows.T @ rows, rtol=1e-12, atol=1e-10)


def test_lazy_block_updates_give_the_column_by_column_codes():
    torch.manual_seed(2)
    w, x = torch.randn(6, 40, dtype=torch.float64), torch.randn(300, 40, dtype=torch.float64)
    scale, qmax = w.abs().amax(1) / 3, torch.full((6,), 3.0, dtype=torch.float64)
    blocked = _round_columns(w, x.T @ x, scale, qmax, 0.01, block=8)
    one_by_one = _round_columns(w, x.T @ x, scale, qmax, 0.01, block=40)
    assert torch.equal(blocked, one_by_one)


def test_one_group_equals_the_full_gram_and_groups_stay_within_the_bound():
    model, data = _net(), _data()
    plain = cetopt.quantize(model, {"0": 2, "3": 2})
    full = _codes(gptq_round(model, plain, data))
    fan_in = 4 * 9
    exact = _codes(gptq_round(model, plain, data, max_gram_bytes=8 * fan_in**2 * 1000))
    assert all(torch.equal(full[k], exact[k]) for k in full)
    bound = 8 * fan_in * 9 * 2  # two input channels of the conv per group
    assert gram_spans(model[0], bound) == [(0, 18), (18, 36)]
    with pytest.warns(UserWarning, match=r"layer '0'.*2 groups of input channels"):
        grouped = gptq_round(model, plain, data, max_gram_bytes=bound)
    layer = dict(grouped.named_modules())["0"]
    x = torch.cat([x for x, _ in data])
    errors = {}
    for label, candidate in (("grouped", layer), ("rtn", dict(plain.named_modules())["0"])):
        errors[label] = float(((candidate(x) - model[0](x)) ** 2).sum().detach())
    assert errors["grouped"] < errors["rtn"]  # still better than round-to-nearest


def test_a_layer_whose_gram_cannot_fit_keeps_round_to_nearest_with_a_warning_naming_it():
    model, data = _net(), _data()
    plain = cetopt.quantize(model, {"0": 2, "3": 2}, bias_correction=data)
    bound = 8 * 36 * 9 - 1  # below one conv input channel (9 taps); the Linear goes one column a group
    with pytest.warns(UserWarning, match=r"round-to-nearest on layer '0'"):
        rounded = gptq_round(model, plain, data, max_gram_bytes=bound)
    assert torch.equal(_codes(rounded)["0"], _codes(plain)["0"])
    with pytest.warns(UserWarning, match=r"round-to-nearest on layer '0'"):
        calibrate_sequentially(model, plain, data, max_gram_bytes=bound, progress=False)


class _Exploding(nn.Module):
    def __init__(self, error: Exception):
        super().__init__()
        self.layer, self.error = nn.Linear(3, 2), error

    def forward(self, x):
        self.layer(x)
        raise self.error


def test_only_shape_and_dtype_mismatches_are_reported_as_data_errors():
    data = [(torch.randn(4, 3), torch.zeros(4))]
    with pytest.raises(DataShapeError, match="cannot run"):
        run_with_hooks(nn.Linear(5, 2), {}, data)
    with pytest.raises(DataShapeError, match="cannot run"):
        run_with_hooks(nn.Linear(3, 2).double(), {}, data)
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    for error in (MemoryError("34 GB"), oom, RuntimeError("a custom op failed")):
        with pytest.raises(type(error)) as info:
            run_with_hooks(_Exploding(error), {}, data)
        assert not isinstance(info.value, DataShapeError)


def test_an_error_in_a_hook_propagates_as_it_is():
    def hook(module, args, output):
        raise MemoryError("cannot hold the Gram matrix")

    with pytest.raises(MemoryError, match="Gram matrix"):
        run_with_hooks(nn.Linear(3, 2), {"": hook}, [(torch.randn(4, 3), None)])
