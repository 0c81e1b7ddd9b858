"""The byte-level GPT on the standard library's sources: deterministic data, traceable, learns."""

from __future__ import annotations

import math

import torch

from cetopt.zoo.data import STDLIB_CONTEXT, load_dataset, stdlib_files
from cetopt.zoo.models import StdlibGPT
from cetopt.zoo.training import task_loss


def test_corpus_is_the_stdlib_in_a_fixed_order_with_disjoint_splits():
    files = stdlib_files()
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert any(f.name == "inspect.py" for f in files)
    data = load_dataset("stdlib-bytes")
    assert data.x_train.shape[1] == STDLIB_CONTEXT and data.classes == 256
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    assert len(data.x_test) >= 512 and len(data.x_val) >= 512
    head = bytes(data.x_train[0].tolist())
    assert head in b"\n".join(f.read_bytes() for f in files[:3])  # the first file, as text


def test_gpt_is_fx_traceable_with_linear_layers_and_an_untied_head():
    model = StdlibGPT(layers=1, dim=32, heads=2, hidden=64, context=32).eval()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(graph(x), model(x))
    assert model.head.weight.data_ptr() != model.token.weight.data_ptr()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7  # q, k, v, proj, fc1, fc2, head


def test_gpt_trains_below_the_uniform_loss_on_a_tiny_slice():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_tiny()
    finally:
        torch.set_num_threads(threads)


def _train_tiny():
    torch.manual_seed(0)
    data = load_dataset("stdlib-bytes")
    x, y = data.x_train[:64, :32], data.y_train[:64, :32]
    model = StdlibGPT(layers=1, dim=32, heads=2, hidden=64, context=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        batch = slice((step % 4) * 16, (step % 4 + 1) * 16)
        loss = task_loss(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = task_loss(model(x), y).item()
    assert final < math.log(256) - 1.5  # well below the 5.55 nats of a uniform guess
