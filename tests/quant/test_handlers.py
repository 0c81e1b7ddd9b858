"""Quantization handlers: attention, embeddings, HF Conv1D, grouped convolutions and a user's own type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cetopt
from cetopt.nn.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedMultiheadAttention
from cetopt.quant import gptq_round
from cetopt.quant import handlers as H
from cetopt.quant.packing import _layout, pack_codes, packed_size, unpack_codes


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def _tokens(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 40, (8, 6), generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _out_proj_inputs(model, data):
    """The heads' outputs that ``attn.out_proj`` multiplies (torch's attention, projection removed)."""
    rows = []
    with torch.no_grad():
        for x, _ in data:
            h = model.emb(x)
            shell = H._identity_out(model.attn)
            rows.append(nn.MultiheadAttention.forward(shell, h, h, h, need_weights=False)[0].reshape(-1, 16))
    return torch.cat(rows)


def test_attention_in_and_out_projections_are_quantized_scored_and_rounded(tmp_path):
    model, data = _Attention().eval(), _tokens()
    targets, kept = H.quant_targets(model)
    assert [t.name for t in targets] == ["emb", "attn", "attn.out_proj", "head"] and kept == []
    assert targets[2].uses[0].runs_in == "attn"  # the attention reads out_proj.weight itself
    table = cetopt.sensitivity(model, data, bits=(2, 8), method="measured", progress=False)
    assert (np.abs(table.values[:, 0]) > 0).all()  # every row's quantization moves the loss
    plain = cetopt.quantize(model, {t.name: 2 for t in targets})
    assert isinstance(plain.attn, QuantizedMultiheadAttention) and isinstance(
        plain.attn.out_proj, QuantizedLinear
    )
    assert "in_proj_weight" not in dict(plain.named_parameters()) and plain.attn.weight_q.shape == (48, 16)
    rounded = gptq_round(model, plain, data)  # used to crash: the out_proj hook never fires
    x = _out_proj_inputs(model, data)
    w = model.attn.out_proj.weight
    error = {
        m: float(((x @ (q.attn.out_proj.weight - w.detach()).T) ** 2).sum())
        for m, q in (("rtn", plain), ("gptq", rounded))
    }
    assert error["gptq"] < error["rtn"]
    assert not torch.equal(rounded.attn.weight_q, plain.attn.weight_q)
    cetopt.save(rounded, tmp_path / "m.safetensors")
    again = cetopt.load(tmp_path / "m.safetensors", model=model)
    assert torch.equal(again(data[0][0]), rounded(data[0][0]))


def test_embedding_rows_have_their_own_scales_and_keep_padding():
    model = _Attention().eval()
    q = cetopt.quantize(model, {"emb": 4})
    assert isinstance(q.emb, QuantizedEmbedding) and q.emb.weight_scale.shape == (40,)
    assert q.emb.padding_idx == 0
    x = torch.tensor([[0, 3, 39]])
    expected = cetopt.quant.fake_quantize(model.emb.weight.detach(), 4)[x]
    assert torch.equal(q.emb(x), expected)


def test_hf_conv1d_is_quantized_in_its_transposed_layout():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(12, 8), nn.ReLU(), conv1d(3, 12)).eval()  # Conv1D(nf, nx): weight (nx, nf)
    data = [(torch.randn(16, 5, 8).cumsum(-1), torch.zeros(16)) for _ in range(2)]  # correlated inputs
    q = cetopt.quantize(model, {"0": 3, "2": 3})
    assert q[0].weight_q.shape == (12, 8) and q[0].weight_scale.shape == (12,)  # one scale per output
    expected = cetopt.quant.fake_quantize(model[0].weight.detach().T, 3)
    x = data[0][0]
    assert torch.allclose(q[0](x), F.linear(x, expected, model[0].bias), atol=1e-6)
    rounded = gptq_round(model, q, data)
    rows = torch.cat([b.reshape(-1, 8) for b, _ in data])
    error = {
        k: float(((rows @ (m[0].weight.T - model[0].weight)) ** 2).sum())
        for k, m in (("rtn", q), ("gptq", rounded))
    }
    assert error["gptq"] < error["rtn"]


def test_grouped_and_depthwise_convs_are_scored_and_rounded():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=8)
    ).eval()
    data = [(torch.randn(8, 4, 10).cumsum(-1), torch.zeros(8)) for _ in range(2)]
    q = cetopt.quantize(model, {"0": 2, "2": 2})
    rounded = gptq_round(model, q, data)
    for name in ("0", "2"):
        assert not torch.equal(
            dict(rounded.named_modules())[name].weight_q, dict(q.named_modules())[name].weight_q
        )
    out = torch.cat([model(x) for x, _ in data])
    error = {
        k: float(((torch.cat([m(x) for x, _ in data]) - out) ** 2).sum())
        for k, m in (("rtn", q), ("gptq", rounded))
    }
    assert error["gptq"] < error["rtn"]


class _Scaled(nn.Module):
    """A user's layer: a Linear with a learned output gain, weight named ``kernel``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_out, n_in) * 0.3)
        self.gain = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return F.linear(x, self.kernel) * self.gain


class _QuantizedScaled(cetopt.nn.QuantizedLinear):
    def __init__(self, n_in, n_out, gain, bits):
        super().__init__(n_in, n_out, bits=bits, bias=False)
        self.gain = nn.Parameter(gain.detach().clone())

    def forward(self, x):
        return super().forward(x) * self.gain


class _ScaledHandler(H.LinearHandler):
    param = "kernel"

    def quantized(self, module, qw, *, add_bias=False):
        new = _QuantizedScaled(module.kernel.shape[1], module.kernel.shape[0], module.gain, qw.max_bits)
        new.set_quantized(qw)
        return new

    def input_rows(self, module, args, kwargs):
        return iter([(0, module.kernel.shape[0], args[0].reshape(-1, module.kernel.shape[1]))])


def test_a_user_registered_handler_plugs_into_every_step(monkeypatch, tmp_path):
    monkeypatch.setitem(H._HANDLERS, _Scaled, _ScaledHandler())
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    model.register_parameter("stray", nn.Parameter(torch.randn(3, 3)))  # no handler covers it
    data = [(torch.randn(16, 6).cumsum(-1), torch.randint(0, 3, (16,))) for _ in range(2)]
    table = cetopt.sensitivity(model, data, bits=(2, 3), method="fisher", progress=False)
    assert list(table.layers) == ["0", "2"]
    plan = cetopt.allocate(table, "3x")
    assert plan.kept_float == ("stray",) and "kept in float" in plan.summary()
    q = cetopt.quantize(model, plan, gptq=data)
    assert isinstance(q[0], _QuantizedScaled)
    rtn = cetopt.quantize(model, plan)
    assert not torch.equal(q[0].weight_q, rtn[0].weight_q)
    cetopt.save(q, tmp_path / "m.safetensors")
    assert torch.equal(cetopt.load(tmp_path / "m.safetensors", model=model)(data[0][0]), q(data[0][0]))


def test_byte_aligned_packing_writes_the_same_stream_as_the_general_path():
    rng = np.random.default_rng(0)
    bits = rng.integers(2, 17, size=12)
    per_channel = 16
    codes = np.stack([rng.integers(-(2 ** (b - 1)), 2 ** (b - 1), size=per_channel) for b in bits])
    value_bits, offsets = _layout(per_channel, bits)
    unsigned = codes.reshape(-1) & ((1 << value_bits) - 1)
    stream = np.zeros(packed_size(per_channel, bits) * 8, dtype=np.uint8)
    for j in range(int(bits.max())):
        has = value_bits > j
        stream[offsets[has] + j] = (unsigned[has] >> j) & 1
    packed = pack_codes(torch.from_numpy(codes), bits)
    assert np.array_equal(packed, np.packbits(stream, bitorder="little"))
    back = unpack_codes(packed, bits, codes.shape, torch.int32)
    assert torch.equal(back, torch.from_numpy(codes).to(torch.int32))
