"""Save/load speed and file size of a Llama-style model (8 layers, hidden 512, 58M parameters) at a
uniform 4 bits (round to nearest, no clip search): the cheap check of the load-speed target, run
when the full ``bench_transformers`` run could not finish. ``python benchmarks/transformers_load_check.py``
writes ``benchmarks/results/transformers_load_check.json``."""

import json
import os
import resource
import time
from pathlib import Path

import safetensors.torch as st
import torch
import transformers

import cetopt
from benchmarks.harness import machine_info
from cetopt._io import atomic_write_json
from cetopt.quant.handlers import quant_targets
from cetopt.quant.packing import unpack_codes

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)
steps: dict = {}


def build():
    from benchmarks.bench_transformers import _configs

    return _configs(quick=False)["llama"]().eval()  # the transformers benchmark's Llama-style 8x512


def step(name, fn):
    c, w = time.process_time(), time.perf_counter()
    v = fn()
    steps[name] = {
        "cpu_s": round(time.process_time() - c, 3),
        "wall_s": round(time.perf_counter() - w, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return v


def main() -> None:
    steps.clear()
    torch.manual_seed(0)
    model = step("build", build)
    targets, kept = quant_targets(model)
    d = "/tmp/loadcheck"
    os.makedirs(d, exist_ok=True)
    step(
        "fp32_save_file",
        lambda: st.save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, f"{d}/fp32.safetensors"
        ),
    )
    step("fp32_load_file", lambda: st.load_file(f"{d}/fp32.safetensors"))
    q = step(
        "quantize_uniform_4bit_no_clip_search",
        lambda: cetopt.quantize(model, {t.name: 4 for t in targets}, clip_search=False),
    )
    saved = step("save", lambda: cetopt.save(q, f"{d}/m.safetensors"))
    skel = step("build_skeleton", build)
    again = step("load", lambda: cetopt.load(f"{d}/m.safetensors", model=skel))
    blob = Path(f"{d}/m.safetensors").read_bytes()
    tensors = st.load(blob)
    layers = json.loads(
        json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])["__metadata__"]["quantized"]
    )
    step(
        "unpack_codes_alone",
        lambda: [
            unpack_codes(
                tensors[f"{n}.weight_packed"].numpy(),
                tensors[f"{n}.weight_bits"].numpy(),
                tuple(i["shape"]),
                getattr(torch, i["dtype"]),
            )
            for n, i in layers.items()
        ],
    )
    x = torch.randint(0, 32000, (1, 32))
    with torch.no_grad():
        exact = bool(torch.equal(again(x).logits, q(x).logits))
    ref = steps["fp32_load_file"]["cpu_s"] + steps["unpack_codes_alone"]["cpu_s"]
    out = {
        "benchmark": "transformers_load_check",
        "partial": False,
        "what": "Llama-style 8 layers, hidden 512 (58M params), every row at a uniform 4 bits, round to "
        "nearest without clip search: a check of save/load speed and file size only "
        "(not the allocation benchmark)",
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(targets),
        "kept_float": kept,
        "fp32_file_bytes": os.path.getsize(f"{d}/fp32.safetensors"),
        "file_bytes": saved.bytes_on_disk,
        "fp32_over_file": os.path.getsize(f"{d}/fp32.safetensors") / saved.bytes_on_disk,
        "load_cpu_over_load_file_plus_unpack_cpu": steps["load"]["cpu_s"] / ref,
        "load_wall_over_load_file_plus_unpack_wall": steps["load"]["wall_s"]
        / (steps["fp32_load_file"]["wall_s"] + steps["unpack_codes_alone"]["wall_s"]),
        "target_at_most": 2.0,
        "exact_reload": exact,
        "steps": steps,
        "machine": machine_info(),
    }
    atomic_write_json(Path(__file__).resolve().parent / "results" / "transformers_load_check.json", out)
    print(json.dumps(out, indent=1))
    for f in os.listdir(d):
        os.unlink(f"{d}/{f}")


if __name__ == "__main__":
    main()
