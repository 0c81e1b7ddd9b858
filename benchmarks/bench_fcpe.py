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
import json
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import SMALL_JOINT_MENU, forward_backward_seconds, peak_rss_mb

SR = 16000
DURATION = 0.4
EDGE = 3  # frames left out at each end of a tone
CENTS = 50.0
SNRS_DB = (-12.0, -15.0)  # tone power / white-noise power, in dB: the test set's noise levels
RANGE_HZ = (60.0, 1000.0)
GROUP_SIZES = (None, 128, 64, 32)
JOINT_BUDGETS = ("8x", "12x", "16x")
BOOTSTRAP = 2000
#: test tones per noise level, calibration tones (alternating noise levels), batch size
FULL = {"test_tones": 256, "calibration_tones": 32, "batch": 16}
QUICK = {"test_tones": 32, "calibration_tones": 16, "batch": 8}


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


def tones(frequencies: np.ndarray, seed: int, snr_db: float | np.ndarray) -> torch.Tensor:
    """Harmonic tones ``(n, samples, 1)``: five harmonics (amplitudes ``0.6^k``), phases from
    ``seed``, harmonics above 7.6 kHz left out, white noise at ``snr_db`` (one level, or one per
    tone), peak 0.5."""
    rng = np.random.default_rng(seed)
    snr = np.broadcast_to(np.asarray(snr_db, dtype=np.float64), (len(frequencies),))
    t = np.arange(int(SR * DURATION)) / SR
    out = np.zeros((len(frequencies), len(t)))
    for i, f in enumerate(frequencies):
        for k in range(5):
            if (k + 1) * f < 7600:
                out[i] += 0.6**k * np.sin(2 * np.pi * (k + 1) * f * t + rng.uniform(0, 2 * np.pi))
        noise = rng.standard_normal(len(t)) * np.sqrt(np.mean(out[i] ** 2) / 10 ** (snr[i] / 10))
        out[i] += noise
        out[i] *= 0.5 / np.abs(out[i]).max()
    return torch.from_numpy(out).float().unsqueeze(-1)


def grid(n: int, offset: float = 0.0) -> np.ndarray:
    """``n`` frequencies on a geometric grid of :data:`RANGE_HZ`, shifted by ``offset`` of a step."""
    lo, hi = math.log(RANGE_HZ[0]), math.log(RANGE_HZ[1])
    return np.exp(lo + (np.arange(n) + offset) * (hi - lo) / n)


def calibration_frequencies(test_tones: int, calibration_tones: int) -> np.ndarray:
    """``calibration_tones`` frequencies halfway between neighbouring test frequencies (of
    :func:`grid` ``(test_tones)``), spread evenly over the range: none is a test frequency."""
    if calibration_tones > test_tones:
        raise ValueError(f"{calibration_tones} calibration tones need at least as many test tones")
    index = np.floor((np.arange(calibration_tones) + 0.5) * test_tones / calibration_tones)
    u = (index + 0.5) / test_tones
    lo, hi = math.log(RANGE_HZ[0]), math.log(RANGE_HZ[1])
    return np.exp(lo + u * (hi - lo))


def pitch_targets(model, f0: np.ndarray, frames: int) -> torch.Tensor:
    """The model's training target for constant pitch ``f0``: Gaussian-blurred cent bins."""
    cents = model.f0_to_cent(torch.tensor(f0, dtype=torch.float32))[:, None, None].expand(-1, frames, 1)
    return model.gaussian_blurred_cent2latent(cents.contiguous())


def bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the 360 pitch-bin outputs against ``targets`` in [0, 1]: the model's
    training loss against the known pitch's blurred bins, or, against the float model's own
    outputs, a divergence from the float model (per-bin Bernoulli KL plus a constant)."""
    return F.binary_cross_entropy(outputs.clamp(1e-7, 1 - 1e-7), targets)


@torch.no_grad()
def tone_hits(model, mels: torch.Tensor, f0: np.ndarray, batch: int = 16) -> np.ndarray:
    """Per tone, the share of its frames (edges left out) predicted within 50 cents of its pitch
    (an unvoiced frame is a miss). Every tone has as many frames, so their mean is the RPA."""
    out = []
    for start in range(0, len(mels), batch):
        pred = model.infer(mels[start : start + batch], decoder="local_argmax", threshold=0.006)[..., 0]
        pred = pred[:, EDGE:-EDGE].double()
        true = torch.tensor(f0[start : start + batch], dtype=torch.float64)[:, None]
        cents = 1200 * torch.log2(pred.clamp_min(1e-6) / true)
        out.append(((pred > 0) & (cents.abs() <= CENTS)).double().mean(dim=1).numpy())
    return np.concatenate(out)


def raw_pitch_accuracy(model, mels: torch.Tensor, f0: np.ndarray, batch: int = 16) -> float:
    """Share of frames (edges left out) predicted within 50 cents of the tone's frequency."""
    return float(tone_hits(model, mels, f0, batch).mean())


def accuracy_row(hits: np.ndarray, base: np.ndarray, snr: np.ndarray) -> dict:
    """RPA of per-tone ``hits``, per noise level too, and its drop from ``base`` (the float
    model's per-tone hits on the same tones) with a 95% interval from a paired bootstrap over
    tones (tones, not frames, are the independent units: a tone's frames share its noise)."""
    diff = base - hits
    rng = np.random.default_rng(0)
    draws = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return {
        "rpa": float(hits.mean()),
        "rpa_by_snr_db": {f"{s:g}": float(hits[snr == s].mean()) for s in np.unique(snr)},
        "rpa_drop_pp": float(100 * diff.mean()),
        "rpa_drop_pp_ci95": [float(100 * lo), float(100 * hi)],
        "rpa_drop_pp_stderr": float(100 * diff.std(ddof=1) / math.sqrt(len(diff))),
        "tones_changed": int((diff != 0).sum()),
    }


def _plan_record(plan, layers: list[str]) -> dict:
    groups = getattr(plan, "groups", None) or {}
    return {
        "average_bits": float(plan.average_bits),
        "planned_bytes": float(plan.bytes),
        "budget_bytes": float(plan.budget_bytes),
        "bits": {n: int(plan.bits[n]) for n in layers},
        "groups": {n: int(groups[n]) for n in layers if n in groups and int(groups[n])},
    }


#: The configurations measured at 8×, in order: each adds one thing to the one before. Every row
#: is :func:`cetopt.compress` with these options (``"distill"``'s plan is allocated from the
#: per-channel columns of ``"distill_groups"``'s table, which are the same measurements, and
#: applied as ``compress`` applies it).
STEPS = {
    "cetopt_8x": {
        "what": "compress defaults, the model's training loss (BCE vs the known pitch's bins)",
        "targets": "truth",
        "options": {},
    },
    "cetopt_8x_distill": {
        "what": "loss: BCE vs the float model's own outputs (divergence from the float model)",
        "targets": "float",
        "options": {},
        "from_table_of": "cetopt_8x_distill_groups",
    },
    "cetopt_8x_distill_groups": {
        "what": "+ group-wise options: bits x group (per channel, 128, 64, 32), overhead counted",
        "targets": "float",
        "options": {"group_sizes": GROUP_SIZES},
    },
    "cetopt_8x_distill_groups_gptq_scored": {
        "what": "+ every option scored on its GPTQ-rounded weights (score_gptq=True)",
        "targets": "float",
        "options": {"group_sizes": GROUP_SIZES, "score_gptq": True},
    },
}
#: The steps a default run measures (all; scoring on GPTQ-rounded weights rounds every (bits,
#: group) option of every layer with GPTQ, the most expensive step: about 35 min on a shared CPU).
DEFAULT_STEPS = list(STEPS)
#: The configuration the joint menu's quantized options come from (its table's columns).
JOINT_STEP = "cetopt_8x_distill_groups"


def per_channel_columns(table):
    """``table``'s per-channel (``group None``) columns as a table of their own."""
    from dataclasses import replace

    if table.groups is None:
        return table
    keep = [j for j, g in enumerate(table.groups) if not g]
    return replace(
        table,
        bits=[table.bits[j] for j in keep],
        groups=None,
        values=table.values[:, keep],
        stderr=None if table.stderr is None else table.stderr[:, keep],
    )


def run(
    quick: bool = False,
    steps: list[str] | None = None,
    joint: bool = True,
    on_row=None,
    cache: Path | None = None,
) -> dict:
    """The measurements, or ``{"skipped": reason}`` without torchfcpe. ``on_row(result)`` is
    called with the result so far after every row (to save partial progress). With ``cache`` (a
    folder), each step's sensitivity table is saved there as JSON and a table found there is used
    instead of measuring it again (its plan then allocated and applied as ``compress`` does)."""
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
    n, b = sizes["test_tones"], sizes["batch"]
    test_f0 = np.concatenate([grid(n) for _ in SNRS_DB])
    test_snr = np.repeat(np.array(SNRS_DB), n)
    calib_f0 = calibration_frequencies(n, sizes["calibration_tones"])
    calib_snr = np.resize(np.array(SNRS_DB), len(calib_f0))
    with torch.no_grad():
        test_mel = torch.cat(
            [wav2mel(tones(grid(n), seed=1 + k, snr_db=s), SR) for k, s in enumerate(SNRS_DB)]
        )
        calib_mel = wav2mel(tones(calib_f0, seed=100, snr_db=calib_snr), SR)
        float_out = model(calib_mel)
    truth = pitch_targets(model, calib_f0, calib_mel.shape[1])
    calibration = {
        "truth": [(calib_mel[i : i + b], truth[i : i + b]) for i in range(0, len(calib_mel), b)],
        "float": [(calib_mel[i : i + b], float_out[i : i + b]) for i in range(0, len(calib_mel), b)],
    }
    layers = quantizable_layers(model)
    modules = dict(model.named_modules())
    fp32_bytes = 4.0 * sum(modules[name].weight.numel() for name in layers)
    result = {
        "model": "torchfcpe fcpe_c_v001 (CFNaiveMelPE, conv-only conformer)",
        "torchfcpe_stand_ins": stand_ins,
        "weights_file": weights.name,
        "config": {"mel": config["mel"], "model": config["model"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_layers": len(layers),
        "fp32_weight_bytes": fp32_bytes,
        "test": {
            "tones": len(test_f0),
            "tones_per_snr": n,
            "frames": len(test_f0) * (test_mel.shape[1] - 2 * EDGE),
            "frames_per_tone": test_mel.shape[1] - 2 * EDGE,
            "unit": "RPA is the share of frames; intervals are a paired bootstrap over tones "
            f"({BOOTSTRAP} draws)",
        },
        "calibration": {
            "tones": len(calib_f0),
            "frames": int(calib_mel.shape[0] * calib_mel.shape[1]),
            "frequencies": "halfway between neighbouring test frequencies (none is a test one); "
            "other phases and noise; noise levels alternate",
        },
        "tone": {
            "sample_rate": SR,
            "seconds": DURATION,
            "harmonics": 5,
            "range_hz": list(RANGE_HZ),
            "snr_db": list(SNRS_DB),
        },
        "load_cpu_seconds": time.process_time() - t0,
    }
    rows: dict[str, dict] = {}
    result["rows"] = rows
    t = time.process_time()
    base = tone_hits(model, test_mel, test_f0)
    rows["fp32"] = {**accuracy_row(base, base, test_snr), "cpu_seconds": time.process_time() - t}

    def score(q) -> dict:
        return accuracy_row(tone_hits(q, test_mel, test_f0), base, test_snr)

    def measure(name: str, q, t: float, **extra) -> None:
        rows[name] = {**score(q), "cpu_seconds": time.process_time() - t, **extra, **_saved(q, fp32_bytes)}
        rows[name]["within_0.5pp"] = rows[name]["rpa_drop_pp"] <= 0.5
        print(name, {k: rows[name][k] for k in ("rpa", "rpa_drop_pp", "rpa_drop_pp_ci95")}, flush=True)
        if on_row is not None:
            on_row(result)

    t = time.process_time()
    measure("rtn_4bit", cetopt.quantize(model, {name: 4 for name in layers}), t, what="uniform 4 bits RTN")
    data = calibration["float"]
    apply = _apply(data)
    t = time.process_time()
    measure(
        "gptq_4bit",
        cetopt.quantize(model, {name: 4 for name in layers}, **apply),
        t,
        what="uniform 4 bits per channel, GPTQ + bias correction (sequential, on the float "
        "model's outputs); above the 8x budget (scales)",
    )
    wanted = list(DEFAULT_STEPS) if steps is None else list(steps)
    tables = {}
    order = sorted(wanted, key=lambda k: "from_table_of" in STEPS[k])  # derived rows last
    for name in order:
        step = STEPS[name]
        t = time.process_time()
        source = step.get("from_table_of")
        if source is not None:
            if source not in tables:
                continue
            table = per_channel_columns(tables[source])
            plan = cetopt.allocate(table, "8x")
            q, method, seconds = cetopt.quantize(model, plan, **apply), table.method, None
        elif (cached := _read_table(cache, name, quick)) is not None:
            tables[name] = table = cached
            plan = cetopt.allocate(table, "8x")
            q, method, seconds = cetopt.quantize(model, plan, **apply), table.method, "cached"
        else:
            compressed = cetopt.compress(
                model, calibration[step["targets"]], "8x", loss_fn=bce, progress=False, **step["options"]
            )
            tables[name], plan, q = compressed.table, compressed.plan, compressed.model
            method, seconds = compressed.table.method, compressed.cpu_seconds.get("sensitivity")
            _write_table(cache, name, quick, compressed.table)
        measure(
            name,
            q,
            t,
            what=step["what"],
            method=method,
            sensitivity_cpu_seconds=seconds,
            **_plan_record(plan, layers),
        )
    result["rows"] = {k: rows[k] for k in [*rows.keys() - STEPS.keys(), *STEPS] if k in rows}
    rows = result["rows"]
    result["targets"] = {
        f"{k}_within_0.5pp": rows[k]["rpa_drop_pp"] <= 0.5
        and rows[k]["quantized_weight_bytes"] <= fp32_bytes / 8
        for k in STEPS
        if k in rows
    }
    if on_row is not None:
        on_row(result)
    if joint and JOINT_STEP not in tables:
        cached = _read_table(cache, JOINT_STEP, quick)
        if cached is not None:
            tables[JOINT_STEP] = cached
    if joint and JOINT_STEP in tables:
        result["joint"] = {}
        joint_rows(
            result["joint"],
            model,
            data,
            tables[JOINT_STEP],
            layers,
            fp32_bytes,
            score,
            lambda: on_row(result) if on_row is not None else None,
            progress=True,
        )
    result["total_cpu_seconds"] = time.process_time() - t0
    return result


def _table_path(cache: Path, name: str, quick: bool) -> Path:
    return cache / f"{name}.{'quick' if quick else 'full'}.json"


def _read_table(cache: Path | None, name: str, quick: bool):
    """A step's sensitivity table from ``cache`` (JSON, :meth:`SensitivityTable.to_dict`), or None."""
    from cetopt.analysis import SensitivityTable

    if cache is None or not _table_path(cache, name, quick).exists():
        return None
    return SensitivityTable.from_dict(json.loads(_table_path(cache, name, quick).read_text()))


def _write_table(cache: Path | None, name: str, quick: bool, table) -> None:
    from cetopt._io import atomic_write_json

    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_table_path(cache, name, quick), table.to_dict())


#: The joint menu's grids on FCPE: the menu is built and scored once, shared by the budgets.
JOINT_MENU = SMALL_JOINT_MENU


def joint_rows(
    out: dict,
    model,
    data,
    table,
    layers,
    fp32_bytes,
    score,
    saved,
    *,
    budgets=JOINT_BUDGETS,
    menu_options=None,
    refine: int = 1,
    loss_fn=None,
    progress: bool = False,
) -> None:
    """The joint menu (issue 20) at ``budgets`` via :func:`cetopt.lowrank.joint_compress` on every
    quantizable layer: ``score(model)`` (a dict with ``rpa_drop_pp``) of bits only as
    :func:`cetopt.compress` makes it (same table, calibrated on all the data) and of every plan
    the search measured, and which one it returned.

    The depthwise convolutions cannot be decomposed; the menu gives them quantization options
    only (:func:`cetopt.lowrank.build_menu`). The menu is built and scored once, at the first
    budget, and shared by the others. ``holdout=0``: plans are compared on the calibration loss
    (a check split would need the sensitivity table measured again on the fit split).
    """
    import cetopt
    from cetopt.errors import InfeasibleBudgetError
    from cetopt.lowrank import joint_compress, supported_layers

    loss_fn = bce if loss_fn is None else loss_fn
    menu_options = JOINT_MENU if menu_options is None else menu_options
    whole = set(supported_layers(model))
    out.update(
        budgets={},
        table_of=JOINT_STEP,
        quantized_only=[n for n in layers if n not in whole],
        holdout=0,
        refine=refine,
        menu_options={k: list(v) if isinstance(v, tuple) else v for k, v in menu_options.items()},
    )
    # the unit of the cost figures: one forward+backward pass over the same calibration data
    reference = forward_backward_seconds(model, data, loss_fn)
    out["forward_backward_seconds"] = reference
    menu = None
    for budget in budgets:
        t = time.process_time()
        cell: dict = {}
        try:
            plan = cetopt.allocate(table, budget)
        except InfeasibleBudgetError as exc:  # below 2 bits everywhere (scales included)
            cell["bits_only_as_compress"] = {"infeasible": str(exc)}
        else:
            bits_only = cetopt.quantize(model, plan, **_apply(data))
            cell["bits_only_as_compress"] = {
                **score(bits_only),
                **_plan_record(plan, layers),
                **_saved(bits_only, fp32_bytes),
            }
        bits_seconds = time.process_time() - t
        t = time.process_time()
        try:
            q, _, search = joint_compress(
                model,
                data,
                table,
                budget,
                loss_fn=loss_fn,
                progress=progress,
                keep_models=True,
                holdout=0,
                refine=refine,
                menu=menu,
                menu_options=menu_options,
            )
        except InfeasibleBudgetError as exc:  # below the smallest plan of the whole menu
            out["budgets"][budget] = {**cell, "joint_infeasible": str(exc)}
            saved()
            continue
        built_here, menu = menu is None, search.menu
        cell["candidates"] = {}
        for c in search.candidates:
            record = {
                "bytes": c.bytes,
                "predicted_loss": c.predicted_loss,
                "measured_loss": c.measured_loss,
                "kinds": _kinds(c.options),
            }
            if c.model is not None:
                record.update(score(c.model))
            cell["candidates"][c.name] = record
        cell["infeasible"] = dict(search.infeasible)
        cell["returned"] = {
            "chosen": search.chosen,
            "fell_back_to_bits": search.fell_back,
            **score(q),
            **_saved(q, fp32_bytes),
        }
        cell["rank_correlation"] = search.rank_correlation
        cell["cpu_seconds"] = {
            "bits_only": bits_seconds,
            "joint": time.process_time() - t,
            "joint_includes_menu": built_here,
        }
        kinds = ("joint",) if "infeasible" in cell["bits_only_as_compress"] else ("bits_only", "joint")
        passes = {k: cell["cpu_seconds"][k] / reference["cpu"] for k in kinds}
        cell["cost_in_forward_backward_passes"] = passes
        cell["peak_rss_mb"] = peak_rss_mb()
        out["budgets"][budget] = cell
        print(
            budget,
            {
                k: v.get("rpa_drop_pp")
                for k, v in [
                    ("bits_only_as_compress", cell["bits_only_as_compress"]),
                    ("returned", cell["returned"]),
                    *cell["candidates"].items(),
                ]
            },
            flush=True,
        )
        saved()


def _apply(data) -> dict:
    """How :func:`cetopt.compress` applies a plan: GPTQ and bias correction, sequentially."""
    return {"gptq": data, "bias_correction": data, "sequential": True}


def _kinds(options) -> dict:
    counts: dict[str, int] = {}
    for o in options.values():
        counts[o.kind] = counts.get(o.kind, 0) + 1
    return counts


def _kinds_plan(plan) -> dict:
    return {"float_layers": int(sum(int(v) == 32 for v in plan.bits.values()))}


def _plain(value) -> bool:
    return isinstance(value, (bool, int, float, str)) or value is None


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
    parser.add_argument(
        "--steps",
        nargs="*",
        choices=list(STEPS),
        help=f"compress rows to run (default: all, {' '.join(DEFAULT_STEPS)}; the GPTQ-scored "
        "one is the slowest)",
    )
    parser.add_argument("--no-joint", action="store_true", help="leave out the joint menu")
    parser.add_argument(
        "--merge-joint",
        action="store_true",
        help=f"measure only the joint menu (and the {JOINT_STEP} row its table comes from) and "
        "write its section into the existing result file, keeping the other rows",
    )
    parser.add_argument("--cache", type=Path, help="folder for the sensitivity tables (re-runs reuse them)")
    parser.add_argument("--out", help="result file (default benchmarks/results/[quick/]fcpe.json)")
    args = parser.parse_args()
    path = Path(args.out) if args.out else RESULTS / ("quick/fcpe.json" if args.quick else "fcpe.json")
    partial = path.with_name(path.stem + ".partial.json")

    def save_partial(result: dict) -> None:
        doc = {"benchmark": "fcpe", "quick": args.quick, "partial": True, **result}
        atomic_write_json(partial, doc)

    steps = [JOINT_STEP] if args.merge_joint else args.steps
    out = run(quick=args.quick, steps=steps, joint=not args.no_joint, on_row=save_partial, cache=args.cache)
    if args.merge_joint and "joint" in out:
        doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "fcpe", "quick": args.quick}
        doc["joint"] = {**out["joint"], "machine": machine_info()}
        atomic_write_json(path, doc)
    else:
        atomic_write_json(path, {"benchmark": "fcpe", "quick": args.quick, "machine": machine_info(), **out})
    print({k: v for k, v in out.items() if k in ("skipped", "targets")})
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")
