"""Real transformer architectures (HF GPT-2, Llama, BERT at 2 layers, hidden 64, random init): every
weight type quantized, ties kept through save/load, exact reload, no graph needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cetopt
from cetopt.errors import NoQuantizableLayerError, UntraceableModelError
from cetopt.graph.decisions import RemoveUnits
from cetopt.nn.quantized import QuantizedMixin
from cetopt.quant import handlers as H
from cetopt.quant import sequential

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, use_cache=False
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _llama():
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _bert():
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.BertForMaskedLM(config).eval()


BUILDERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}


def _build(name):
    torch.manual_seed(0)
    return BUILDERS[name]()


def _tokens(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(n)]


def _matrices(model):
    """Every Linear / Conv1D / Embedding weight of the model (by module name)."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding) or type(m).__name__ == "Conv1D"
    ]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_weight_is_quantized_ties_survive_and_the_reload_is_exact(name, tmp_path):
    model, data = _build(name), _tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets, kept = H.quant_targets(model)
    assert kept == []
    rows = {t.name for t in targets} | {alias for t in targets for alias in t.tied}
    assert rows == set(_matrices(model))
    quantized = cetopt.quantize(model, {t.name: 4 for t in targets}, gptq=data)
    assert all(isinstance(dict(quantized.named_modules())[n], QuantizedMixin) for n in _matrices(model))
    assert all(v.dtype != torch.float32 or v.dim() < 2 for v in quantized.state_dict().values())
    saved = cetopt.save(quantized, tmp_path / "m.safetensors")
    assert saved.bytes_on_disk < sum(p.numel() for p in model.parameters()) * 4 / 4
    again = cetopt.load(tmp_path / "m.safetensors", model=model)
    x = data[0]
    assert torch.equal(again(x).logits, quantized(x).logits)
    tied = [t for t in targets if t.tied]
    assert bool(tied) == (name != "llama")  # GPT-2 and BERT tie their LM head to the token embedding
    for t in tied:
        owner, alias = dict(again.named_modules())[t.name], dict(again.named_modules())[t.tied[0]]
        assert alias.weight_q is owner.weight_q and alias.weight_scale is owner.weight_scale
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_bias_shared_with_another_module_stays_shared(tmp_path):
    model = _build("bert")
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    quantized = cetopt.quantize(model, {"bert.embeddings.word_embeddings": 4})
    assert quantized.cls.predictions.decoder.bias is quantized.cls.predictions.bias
    cetopt.save(quantized, tmp_path / "m.safetensors")
    from cetopt.serialization import file_tensor_bytes

    stored = file_tensor_bytes(tmp_path / "m.safetensors")
    assert len({"cls.predictions.bias", "cls.predictions.decoder.bias"} & set(stored)) == 1
    again = cetopt.load(tmp_path / "m.safetensors", model=model)
    assert again.cls.predictions.decoder.bias is again.cls.predictions.bias
    x = _tokens(1)[0]
    assert torch.equal(again(x).logits, quantized(x).logits)
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def test_a_tied_weight_is_one_row_and_stored_once(tmp_path):
    model = _build("gpt2")
    table = cetopt.sensitivity(
        model, _tokens(1), bits=(4, 8), method="measured", loss_fn="next_token", progress=False
    )
    assert "lm_head" not in table.layers and table.meta["tied"] == {"transformer.wte": ["lm_head"]}
    assert sum(table.params) == sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    with pytest.raises(NoQuantizableLayerError, match="shares its weight"):
        cetopt.sensitivity(
            model, _tokens(1), bits=(4,), layers=["lm_head"], loss_fn="next_token", progress=False
        )
    quantized = cetopt.quantize(model, {"transformer.wte": 4})
    assert quantized.lm_head.weight_q is quantized.transformer.wte.weight_q
    cetopt.save(quantized, tmp_path / "m.safetensors")
    from cetopt.serialization import file_tensor_bytes

    stored = file_tensor_bytes(tmp_path / "m.safetensors")
    assert "transformer.wte.weight_packed" in stored and not any(k.startswith("lm_head.") for k in stored)


def test_cet_runs_through_the_attention_kernels_and_matches_measured_on_llama():
    model, data = _build("llama"), _tokens(1)
    assert model.config._attn_implementation == "sdpa"
    rows = [n for n in H.quant_targets(model)[0] if n.name.startswith("model.layers.0.")]
    options = {"bits": (2,), "loss_fn": "next_token", "progress": False, "layers": [t.name for t in rows]}
    cet = cetopt.sensitivity(model, data, method="cet", probes=8, rounds=1, **options)  # exact: 7 rows
    measured = cetopt.sensitivity(model, data, method="measured", **options)
    assert cet.meta["exact"] and np.isfinite(cet.values).all()
    assert np.corrcoef(cet.values[:, 0], measured.values[:, 0])[0, 1] > 0.9


def test_next_token_loss_and_dict_outputs_need_no_wrapper():
    model, data = _build("gpt2"), _tokens(1)
    from cetopt.analysis.objective import LossObjective, next_token_loss

    logits = model(data[0]).logits
    manual = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), data[0][:, 1:].reshape(-1))
    assert torch.allclose(next_token_loss(model(data[0]), data[0]), manual)
    objective = LossObjective(model, data, ["transformer.h.0.mlp.c_fc"], loss_fn="next_token")
    assert objective.loss() == pytest.approx(float(manual), rel=1e-5)

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x)}

    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    table = cetopt.sensitivity(DictNet(), batches, bits=(2, 4), method="fisher", progress=False)
    assert np.isfinite(table.values).all()


def test_sequential_calibration_goes_block_by_block(monkeypatch):
    model, data = _build("llama"), _tokens()
    captured = []
    original = sequential._block_inputs

    def spy(m, block, d, max_batches):
        out = original(m, block, d, max_batches)
        captured.append((block, len(out)))
        return out

    monkeypatch.setattr(sequential, "_block_inputs", spy)
    bits = {t.name: 3 for t in H.quant_targets(model)[0]}
    calibrated = cetopt.quantize(
        model, bits, gptq=data, bias_correction=data, sequential=True, progress=False
    )
    assert captured == [("model.layers.0", 2), ("model.layers.1", 2)]  # one block's inputs at a time
    rtn = cetopt.quantize(model, bits)
    x = torch.cat(data)
    error = {
        k: float(((m(x).logits - model(x).logits) ** 2).mean())
        for k, m in (("rtn", rtn), ("seq", calibrated))
    }
    assert error["seq"] < error["rtn"]


def test_what_needs_the_graph_says_so():
    model = _build("gpt2")
    with pytest.raises(UntraceableModelError, match="needs the model's graph"):
        cetopt.rewrite(model, [RemoveUnits("transformer.h.0.mlp.c_fc", [0])], _tokens(1)[0])
