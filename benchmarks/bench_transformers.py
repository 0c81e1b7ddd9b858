"""Transformers end to end: HF GPT-2 small, a Llama-style model (8 layers, hidden 512), BERT-base and
ViT-B/16, all built from their configs (random init, nothing downloaded).

For each model, in a fresh process (so every peak RSS is the model's own): build it; write its
float32 weights with ``safetensors.torch.save_file`` and time ``load_file`` of them; a cheap
``fisher`` sensitivity (one batch of two sequences or images); the allocation at ``"8x"``;
quantization (round to nearest, MSE clip search); ``cetopt.save``; ``cetopt.load`` onto a freshly
built architecture, with the unpacking of the codes timed on its own; and the reloaded model's
outputs against the quantized model's. The load ratio against ``load_file`` plus the unpacking is
given for the first (cold) load, in wall and CPU seconds, and warm (``warm_best_of_3``: the best
of three more of each, in the same process). Reported: the share of the Linear / Conv1D / Embedding /
attention weights quantized, the file size against the float32 file, save and load times, and CPU
seconds, wall seconds and peak RSS (``ru_maxrss``, the process's peak so far) after every step.

``python -m benchmarks.bench_transformers [--quick] [--models vit ...] [--merge]``: ``--quick`` runs
tiny configs and writes to ``benchmarks/results/quick/`` (git-ignored); the full run writes
``benchmarks/results/transformers.json``; ``--merge`` re-measures only ``--models`` and keeps the
other models' entries of the file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("gpt2", "llama", "bert", "vit")
BITS = (2, 3, 4, 8)
METHOD = "fisher"  # cheap: one batch of per-example gradients (measured costs rows × bits passes)
BUDGET = "8x"


def _configs(quick: bool) -> dict:
    import transformers as T

    if quick:
        return {
            "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, use_cache=False)),
            "llama": lambda: T.LlamaForCausalLM(
                T.LlamaConfig(
                    num_hidden_layers=2,
                    hidden_size=64,
                    intermediate_size=128,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    vocab_size=1000,
                    use_cache=False,
                )
            ),
            "bert": lambda: T.BertForMaskedLM(
                T.BertConfig(
                    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4
                )
            ),
            "vit": lambda: T.ViTForImageClassification(
                T.ViTConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)
            ),
        }
    return {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(use_cache=False)),  # GPT-2 small, 124M
        "llama": lambda: T.LlamaForCausalLM(
            T.LlamaConfig(
                num_hidden_layers=8,
                hidden_size=512,
                intermediate_size=1376,
                num_attention_heads=8,
                num_key_value_heads=8,
                vocab_size=32000,
                use_cache=False,
            )
        ),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig()),  # BERT-base
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig()),  # ViT-B/16 at 224
    }


def _data(name: str, model, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if name == "vit":
        x = torch.randn(2, 3, model.config.image_size, model.config.image_size, generator=g)
        return [(x, torch.randint(0, model.config.num_labels, (2,), generator=g))], None
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=g)
    if name == "bert":  # masked-LM logits against the tokens themselves

        def loss(out, y):
            return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())

        return [(ids, ids)], loss
    return [ids], "next_token"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Steps:
    def __init__(self):
        self.steps: dict[str, dict] = {}

    def run(self, name: str, fn):
        cpu, wall = time.process_time(), time.perf_counter()
        value = fn()
        self.steps[name] = {
            "cpu_s": round(time.process_time() - cpu, 3),
            "wall_s": round(time.perf_counter() - wall, 3),
            "peak_rss_mib": round(_rss_mib(), 1),
        }
        return value


def measure(name: str, quick: bool) -> dict:
    """Every step on one model (run in its own process by :func:`run`)."""
    import safetensors.torch as st
    import torch

    import cetopt
    from cetopt.quant.handlers import quant_targets
    from cetopt.quant.packing import unpack_codes
    from cetopt.serialization import file_tensor_bytes

    torch.set_num_threads(2)
    import transformers

    transformers.logging.set_verbosity_error()
    build = _configs(quick)[name]
    steps = _Steps()
    torch.manual_seed(0)
    model = steps.run("build", lambda: build().eval())
    data, loss_fn = _data(name, model, 16 if quick else 32)
    work = Path(tempfile.mkdtemp(prefix=f"cetopt-{name}-"))
    fp32_path, path = work / "fp32.safetensors", work / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    seen, unique = set(), {}
    for k, v in state.items():  # safetensors refuses shared tensors: keep each storage once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v
    steps.run("fp32_save_file", lambda: st.save_file(unique, fp32_path))
    loaded = steps.run("fp32_load_file", lambda: st.load_file(fp32_path))
    del loaded
    targets, kept = quant_targets(model)
    matrices = {
        id(p): p.numel()
        for _, m in model.named_modules()
        for p in m.parameters(recurse=False)
        if p.dim() >= 2
        and (
            isinstance(
                m, torch.nn.Linear | torch.nn.Embedding | torch.nn.Conv2d | torch.nn.MultiheadAttention
            )
            or type(m).__name__ == "Conv1D"
        )
    }
    quantized_params = sum(dict(model.named_parameters())[t.key].numel() for t in targets)
    table = steps.run(
        "sensitivity",
        lambda: cetopt.sensitivity(model, data, BITS, METHOD, loss_fn=loss_fn, progress=False),
    )
    plan = steps.run("allocation", lambda: cetopt.allocate(table, BUDGET))
    quantized = steps.run("quantize", lambda: cetopt.quantize(model, plan))
    saved = steps.run("save", lambda: cetopt.save(quantized, path))
    skeleton = steps.run("build_skeleton", lambda: build().eval())
    reloaded = steps.run("load", lambda: cetopt.load(path, model=skeleton))
    blob = path.read_bytes()
    tensors = st.load(blob)
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
    layers = json.loads(header["quantized"])

    def unpack_all():
        for layer, info in layers.items():
            unpack_codes(
                tensors[f"{layer}.weight_packed"].numpy(),
                tensors[f"{layer}.weight_bits"].numpy(),
                tuple(info["shape"]),
                getattr(torch, info["dtype"]),
            )

    steps.run("unpack_codes_alone", unpack_all)
    # warm: best of three more of each (the first load pays for first calls; a shared machine's
    # wall times swing), wall and CPU seconds
    warm = {"load": [], "fp32_load_file": [], "unpack_codes_alone": []}
    for _ in range(3):
        for what, fn in (
            ("load", lambda: cetopt.load(path, model=skeleton)),
            ("fp32_load_file", lambda: st.load_file(fp32_path)),
            ("unpack_codes_alone", unpack_all),
        ):
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            warm[what].append((time.perf_counter() - wall, time.process_time() - cpu))
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in warm.items()}
    x = data[0][0] if isinstance(data[0], tuple) else data[0]
    with torch.no_grad():
        a, b = quantized(x).logits, reloaded(x).logits
    fp32_bytes = os.path.getsize(fp32_path)
    load_s = steps.steps["load"]["wall_s"]
    reference = steps.steps["fp32_load_file"]["wall_s"] + steps.steps["unpack_codes_alone"]["wall_s"]
    stored = file_tensor_bytes(path)
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(targets),
        "tied": {t.name: list(t.tied) for t in targets if t.tied},
        "kept_float": kept,
        "share_of_matrix_weights_quantized": quantized_params / sum(matrices.values()),
        "plan": {
            "average_bits": plan.average_bits,
            "compression_ratio": plan.compression_ratio,
            "bits_used": sorted({int(v) for v in plan.bits.values()}),
        },
        "fp32_file_bytes": fp32_bytes,
        "file_bytes": saved.bytes_on_disk,
        "fp32_over_file": fp32_bytes / saved.bytes_on_disk,
        "target_fp32_over_file_at_least": 7.5,
        "quantized_bytes": saved.quantized_bytes,
        "other_bytes": saved.other_bytes,
        "tied_stored_once": all(  # the alias's codes, scales and bit widths are not in the file
            not any(f"{alias}.weight_{part}" in stored for part in ("packed", "scale", "bits"))
            for t in targets
            for alias in t.tied
        ),
        "load_over_load_file_plus_unpack": load_s / reference if reference else None,
        "load_over_load_file_plus_unpack_cpu": steps.steps["load"]["cpu_s"]
        / max(steps.steps["fp32_load_file"]["cpu_s"] + steps.steps["unpack_codes_alone"]["cpu_s"], 1e-9),
        "warm_best_of_3": {
            "load_wall_s": best["load"][0],
            "load_cpu_s": best["load"][1],
            "fp32_load_file_wall_s": best["fp32_load_file"][0],
            "unpack_codes_alone_wall_s": best["unpack_codes_alone"][0],
            "unpack_codes_alone_cpu_s": best["unpack_codes_alone"][1],
            "load_over_load_file_plus_unpack": best["load"][0]
            / (best["fp32_load_file"][0] + best["unpack_codes_alone"][0]),
            "load_over_load_file_plus_unpack_cpu": best["load"][1]
            / max(best["fp32_load_file"][1] + best["unpack_codes_alone"][1], 1e-9),
        },
        "target_load_over_load_file_plus_unpack_at_most": 2.0,
        "exact_reload": bool(torch.equal(a, b)),
        "max_abs_logit_change_quantized_vs_fp32": float((a - model(x).logits).abs().max()),
        "sensitivity": {"method": table.method, "bits": list(BITS), "examples": table.meta["examples"]},
        "steps": steps.steps,
    }
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    return result


def run(quick: bool = False, models=MODELS, partial_path: Path | None = None) -> dict:
    """Each model in its own process; a model that fails is recorded with its error. With
    ``partial_path`` the results so far are written there after every model."""
    out = {"budget": BUDGET, "bits": list(BITS), "sensitivity_method": METHOD, "models": {}}
    for name in models:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            dest = fh.name
        cmd = [sys.executable, "-m", "benchmarks.bench_transformers", "--one", name, "--to", dest]
        if quick:
            cmd.append("--quick")
        print(f"-- {name}", flush=True)
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
        if proc.returncode == 0:
            out["models"][name] = json.loads(Path(dest).read_text())
        else:
            out["models"][name] = {"error": proc.stderr[-2000:]}
        os.unlink(dest)
        print(json.dumps(out["models"][name])[:3000], flush=True)
        if partial_path is not None:
            from cetopt._io import atomic_write_json

            done = len(out["models"]) == len(models)
            atomic_write_json(partial_path, {"benchmark": "transformers", "partial": not done, **out})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one")
    parser.add_argument("--to")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--partial", help="also write the results so far here after every model")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="re-measure only --models and put them into the existing results file, keeping the other "
        "models' entries (a note records which models, when and at which commit)",
    )
    args = parser.parse_args(argv)
    if args.one:
        Path(args.to).write_text(json.dumps(measure(args.one, args.quick)))
        return 0
    from benchmarks.harness import machine_info
    from cetopt._io import atomic_write_json

    data = run(args.quick, args.models, Path(args.partial) if args.partial else None)
    path = RESULTS / "quick" / "transformers.json" if args.quick else RESULTS / "transformers.json"
    if args.merge and path.exists():
        merged = json.loads(path.read_text())
        machine = machine_info()
        merged["models"].update(data["models"])
        note = (
            f"{', '.join(data['models'])} re-measured with --merge at commit {machine.get('git_commit')} on "
            f"{machine.get('date')} (load average {os.getloadavg()[0]:.1f} at the end); the other models "
            "are from machine.git_commit"
        )
        merged["notes"] = [*merged.get("notes", []), note]
        atomic_write_json(path, merged)
    else:
        atomic_write_json(
            path, {"benchmark": "transformers", "quick": args.quick, "machine": machine_info(), **data}
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
