"""A pretrained pitch model nobody here wrote: FCPE's conformer at fp32 and at 8× fewer weight bytes.

``torchfcpe`` (optional, never a test dependency) ships a pretrained model in its wheel,
``torchfcpe/assets/fcpe_c_v001.pt``: ``CFNaiveMelPE``, a mel spectrogram → 360 pitch bins
network (two input convolutions, six conv-only conformer layers — a pointwise convolution, a
depthwise convolution of width 31, a pointwise convolution —, a weight-normalised output Linear;
10.8M weights). Its package imports ``torchaudio`` (resampling, unused at 16 kHz) and
``local_attention`` (attention, unused by this conv-only model); when either fails to import, a
stand-in module that raises on use takes its place, so only the model definition, its mel
front end (with the package's own librosa-free mel filters) and the weights are used. The weights
are read with ``torch.load(..., weights_only=True)``; the output layer's weight norm is folded
into a plain weight before compression (the same function).

Evaluation (deterministic, no audio files): harmonic tones of known frequency (five harmonics,
amplitudes ``0.6^k``, fixed phases) in white noise at -12 dB SNR (the model tracks clean tones,
and tones down to -10 dB, at 99.5-100%, which would hide any loss), 16 kHz, 0.4 s each, on a
geometric grid of frequencies in 60–1000 Hz; raw pitch accuracy (RPA) is the share of frames
whose predicted pitch is within 50 cents of the tone's (an unvoiced prediction counts as a miss;
the first and last 3 frames of each tone are left out). Calibration tones lie on a disjoint,
interleaved grid with other phases and noise.

Compression: :func:`cetopt.compress` at ``"8x"`` (float32 weight bytes / 8) with its defaults
(``auto`` sensitivities, GPTQ, bias correction, sequential calibration), the loss being the
model's own training loss (binary cross-entropy against the Gaussian-blurred pitch bins of the
known frequency); no fine-tuning. Uniform 4-bit round-to-nearest is shown for reference.

Target (issue 17): RPA within 0.5 percentage points of fp32. Without ``torchfcpe`` the result
records why it was skipped. ``python -m benchmarks.bench_fcpe [--quick]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SR = 16000
DURATION = 0.4
EDGE = 3  # frames left out at each end of a tone
CENTS = 50.0
SNR_DB = -12.0  # tone power / white-noise power, in dB
FULL = {"test_tones": 64, "calibration_tones": 16, "batch": 16}
QUICK = {"test_tones": 24, "calibration_tones": 8, "batch": 8}


def _stand_in(name: str, attrs: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _unavailable(what: str):
    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{what} is not available here (a stand-in module was imported)")

    return Unavailable


def import_fcpe() -> tuple[types.ModuleType, types.ModuleType, Path, list[str]] | str:
    """``(models, mel_extractor, weights path, stand-ins)`` of torchfcpe, or why it is unavailable.

    The package's ``__init__`` is not run (it imports ``torchaudio``); its modules are imported
    one by one, with stand-ins for ``torchaudio`` and ``local_attention`` if they fail to import.
    """
    spec = importlib.util.find_spec("torchfcpe")
    if spec is None or not spec.submodule_search_locations:
        return "torchfcpe is not installed (pip install --no-deps torchfcpe einops)"
    root = Path(next(iter(spec.submodule_search_locations)))
    weights = root / "assets" / "fcpe_c_v001.pt"
    if not weights.exists():
        return f"torchfcpe has no bundled weights at {weights}"
    stand_ins = []
    try:
        importlib.import_module("torchaudio.transforms")
    except Exception:
        transforms = _stand_in("torchaudio.transforms", {"Resample": _unavailable("torchaudio.Resample")})
        sys.modules["torchaudio"] = _stand_in("torchaudio", {"transforms": transforms})
        sys.modules["torchaudio.transforms"] = transforms
        stand_ins.append("torchaudio")
    try:
        importlib.import_module("local_attention")
    except Exception:
        sys.modules["local_attention"] = _stand_in(
            "local_attention", {"LocalAttention": _unavailable("local_attention.LocalAttention")}
        )
        stand_ins.append("local_attention")
    try:
        importlib.import_module("einops")
    except ImportError:
        return "einops (imported by torchfcpe's model definition) is not installed"
    if "torchfcpe" not in sys.modules:
        package = types.ModuleType("torchfcpe")
        package.__path__ = [str(root)]
        package.__spec__ = spec
        sys.modules["torchfcpe"] = package
    models = importlib.import_module("torchfcpe.models")
    mel = importlib.import_module("torchfcpe.mel_extractor")
    return models, mel, weights, stand_ins


def load_fcpe(models, mel_module, weights: Path):
    """The pretrained ``CFNaiveMelPE`` (weight norm folded, eval mode), its mel front end, config."""
    from torch.nn.utils import parametrize

    saved = torch.load(weights, map_location="cpu", weights_only=True)
    config = saved["config_dict"]
    m, c = config["model"], config["mel"]
    model = models.CFNaiveMelPE(
        input_channels=c["num_mels"],
        out_dims=m["out_dims"],
        hidden_dims=m["hidden_dims"],
        n_layers=m["n_layers"],
        n_heads=m["n_heads"],
        f0_max=m["f0_max"],
        f0_min=m["f0_min"],
        use_fa_norm=m["use_fa_norm"],
        conv_only=m["conv_only"],
    )
    model.load_state_dict(saved["model"])
    if parametrize.is_parametrized(model.output_proj, "weight"):
        parametrize.remove_parametrizations(model.output_proj, "weight", leave_parametrized=True)
    wav2mel = mel_module.Wav2MelModule(
        sr=c["sr"],
        n_mels=c["num_mels"],
        n_fft=c["n_fft"],
        win_size=c["win_size"],
        hop_length=c["hop_size"],
        fmin=c["fmin"],
        fmax=c["fmax"],
        clip_val=1e-5,
    )
    return model.eval(), wav2mel, config


def tones(frequencies: np.ndarray, seed: int) -> torch.Tensor:
    """Harmonic tones ``(n, samples, 1)``: five harmonics (amplitudes ``0.6^k``), phases from
    ``seed``, harmonics above 7.6 kHz left out, white noise at :data:`SNR_DB`, peak 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * DURATION)) / SR
    out = np.zeros((len(frequencies), len(t)))
    for i, f in enumerate(frequencies):
        for k in range(5):
            if (k + 1) * f < 7600:
                out[i] += 0.6**k * np.sin(2 * np.pi * (k + 1) * f * t + rng.uniform(0, 2 * np.pi))
        noise = rng.standard_normal(len(t)) * np.sqrt(np.mean(out[i] ** 2) / 10 ** (SNR_DB / 10))
        out[i] += noise
        out[i] *= 0.5 / np.abs(out[i]).max()
    return torch.from_numpy(out).float().unsqueeze(-1)


def grid(n: int, offset: float = 0.0) -> np.ndarray:
    """``n`` frequencies on a geometric grid of 60–1000 Hz, shifted by ``offset`` of a step."""
    lo, hi = math.log(60.0), math.log(1000.0)
    return np.exp(lo + (np.arange(n) + offset) * (hi - lo) / n)


def pitch_targets(model, f0: np.ndarray, frames: int) -> torch.Tensor:
    """The model's training target for constant pitch ``f0``: Gaussian-blurred cent bins."""
    cents = model.f0_to_cent(torch.tensor(f0, dtype=torch.float32))[:, None, None].expand(-1, frames, 1)
    return model.gaussian_blurred_cent2latent(cents.contiguous())


def bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(outputs.clamp(1e-7, 1 - 1e-7), targets)


@torch.no_grad()
def raw_pitch_accuracy(model, mels: torch.Tensor, f0: np.ndarray, batch: int = 16) -> float:
    """Share of frames (edges left out) predicted within 50 cents of the tone's frequency."""
    hits = total = 0
    for start in range(0, len(mels), batch):
        pred = model.infer(mels[start : start + batch], decoder="local_argmax", threshold=0.006)[..., 0]
        pred = pred[:, EDGE:-EDGE].double()
        true = torch.tensor(f0[start : start + batch], dtype=torch.float64)[:, None]
        cents = 1200 * torch.log2(pred.clamp_min(1e-6) / true)
        hits += int(((pred > 0) & (cents.abs() <= CENTS)).sum())
        total += pred.numel()
    return hits / total


def run(quick: bool = False) -> dict:
    """The measurements, or ``{"skipped": reason}`` without torchfcpe."""
    sizes = QUICK if quick else FULL
    found = import_fcpe()
    if isinstance(found, str):
        return {"skipped": found}
    models, mel_module, weights, stand_ins = found
    import cetopt
    from cetopt.analysis import quantizable_layers

    torch.set_num_threads(1)
    t0 = time.process_time()
    model, wav2mel, config = load_fcpe(models, mel_module, weights)
    test_f0 = grid(sizes["test_tones"])
    calib_f0 = grid(sizes["calibration_tones"], offset=0.5)
    with torch.no_grad():
        test_mel = wav2mel(tones(test_f0, seed=1), SR)
        calib_mel = wav2mel(tones(calib_f0, seed=2), SR)
    b = sizes["batch"]
    targets = pitch_targets(model, calib_f0, calib_mel.shape[1])
    calib = [(calib_mel[i : i + b], targets[i : i + b]) for i in range(0, len(calib_mel), b)]
    layers = quantizable_layers(model)
    modules = dict(model.named_modules())
    fp32_bytes = 4.0 * sum(modules[n].weight.numel() for n in layers)
    result = {
        "model": "torchfcpe fcpe_c_v001 (CFNaiveMelPE, conv-only conformer)",
        "torchfcpe_stand_ins": stand_ins,
        "weights_file": weights.name,
        "config": {"mel": config["mel"], "model": config["model"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_layers": len(layers),
        "fp32_weight_bytes": fp32_bytes,
        "test": {"tones": len(test_f0), "frames": len(test_f0) * (test_mel.shape[1] - 2 * EDGE)},
        "calibration": {"tones": len(calib_f0), "frames": int(calib_mel.shape[0] * calib_mel.shape[1])},
        "tone": {
            "sample_rate": SR,
            "seconds": DURATION,
            "harmonics": 5,
            "range_hz": [60, 1000],
            "snr_db": SNR_DB,
        },
        "load_cpu_seconds": time.process_time() - t0,
    }
    rows = {}
    t = time.process_time()
    rows["fp32"] = {
        "rpa": raw_pitch_accuracy(model, test_mel, test_f0),
        "cpu_seconds": time.process_time() - t,
    }
    t = time.process_time()
    q = cetopt.quantize(model, {n: 4 for n in layers})
    rows["rtn_4bit"] = {
        "rpa": raw_pitch_accuracy(q, test_mel, test_f0),
        "cpu_seconds": time.process_time() - t,
    }
    rows["rtn_4bit"].update(_saved(q, fp32_bytes))
    t = time.process_time()
    compressed = cetopt.compress(model, calib, "8x", loss_fn=bce, progress=False)
    rows["cetopt_8x"] = {
        "rpa": raw_pitch_accuracy(compressed.model, test_mel, test_f0),
        "cpu_seconds": time.process_time() - t,
        "method": compressed.table.method,
        "average_bits": compressed.plan.average_bits,
        "planned_bytes": compressed.plan.bytes,
        "budget_bytes": compressed.plan.budget_bytes,
        "bits": {n: int(compressed.plan.bits[n]) for n in layers},
        **_saved(compressed.model, fp32_bytes),
    }
    for row in rows.values():
        row["rpa_drop_pp"] = 100 * (rows["fp32"]["rpa"] - row["rpa"])
    result["rows"] = rows
    result["targets"] = {
        "cetopt_8x_within_0.5pp": rows["cetopt_8x"]["rpa_drop_pp"] <= 0.5,
        "cetopt_8x_weight_bytes_at_most_fp32_over_8": rows["cetopt_8x"]["quantized_weight_bytes"]
        <= fp32_bytes / 8,
    }
    result["total_cpu_seconds"] = time.process_time() - t0
    return result


def _saved(model, fp32_bytes: float) -> dict:
    import cetopt

    with tempfile.TemporaryDirectory() as tmp:
        saved = cetopt.save(model, Path(tmp) / "m.safetensors")
    return {
        "quantized_weight_bytes": saved.quantized_bytes,
        "bytes_on_disk": saved.bytes_on_disk,
        "compression_vs_fp32": fp32_bytes / saved.quantized_bytes,
    }


if __name__ == "__main__":
    import argparse

    from benchmarks.harness import RESULTS, machine_info
    from cetopt._io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    path = RESULTS / ("quick/fcpe.json" if args.quick else "fcpe.json")
    out = run(quick=args.quick)
    atomic_write_json(path, {"benchmark": "fcpe", "quick": args.quick, "machine": machine_info(), **out})
    print({k: v for k, v in out.items() if k in ("skipped", "rows", "targets")})
    print(f"wrote {path}")
