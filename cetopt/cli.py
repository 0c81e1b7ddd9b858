"""The ``cetopt`` command line. Each subcommand is one small function registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

import numpy as np

from cetopt.errors import _plain_numbers

COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
] = {}


def command(name: str, help_text: str):
    """Register ``configure(parser)`` / ``run(args)`` as subcommand ``name``."""

    def wrap(configure):
        def with_run(run):
            COMMANDS[name] = (configure, run, help_text)
            return run

        return with_run

    return wrap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every default shown, unless the help text already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


class Stages:
    """Stage lines on stderr (``[2/5] sensitivity: ...``); silent under ``--quiet``."""

    def __init__(self, command: str, total: int, quiet: bool):
        self.command, self.total, self.quiet, self.done = command, total, quiet, 0

    def __call__(self, text: str) -> None:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)


def _ratio_line(what: str, small: float, large: float) -> str:
    """``what: 15144 of 151360 bytes = 9.99x smaller (10.0% of fp32)``: the ratio both ways."""
    share = 100 * small / large
    factor = f"{large / small:.2f}x smaller" if small <= large else f"{small / large:.2f}x larger"
    return f"{what}: {small:.0f} of {large:.0f} bytes = {factor} ({share:.1f}% of fp32)"


OTHER_TENSORS = "biases, BatchNorm, layers kept in float32"


def _size_lines(
    saved,
    fp32_weight_bytes: float | None,
    fp32_file_bytes: int,
    budget_note: str = "",
    other: str = OTHER_TENSORS,
) -> list[str]:
    """What the file's bytes are, and the compression ratio both ways."""
    lines = [
        f"size on disk: {saved.bytes_on_disk} bytes = {saved.quantized_bytes} quantized weights "
        "(packed codes + a float32 scale and a uint8 bit width per output channel) + "
        f"{saved.other_bytes} other tensors ({other}) + {saved.header_bytes} header (safetensors "
        "header and metadata)"
    ]
    if fp32_weight_bytes:
        lines.append(
            _ratio_line(
                "quantized weights vs the same weights in fp32", saved.quantized_bytes, fp32_weight_bytes
            )
        )
    lines.append(_ratio_line("whole file vs the fp32 model's file", saved.bytes_on_disk, fp32_file_bytes))
    if budget_note:
        lines.append(budget_note)
    return lines


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def _configure_solvers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="also show why unavailable solvers cannot run")


@command("solvers", "list registered solvers and whether each can run here")(_configure_solvers)
def run_solvers(args: argparse.Namespace) -> int:
    from cetopt.solving import available_solvers

    rows, infos = [], available_solvers()
    for info in infos:
        caps = info.capabilities
        flags = (
            ""
            if caps is None
            else ", ".join(
                flag
                for flag in ("mip", "time_limit", "dual_bound", "warm_start", "options")
                if getattr(caps, flag)
            )
        )
        rows.append(
            [info.name, "yes" if info.available else "no", flags, info.origin]
            + ([info.reason] if args.all else [])
        )
    _print_table(
        ["solver", "available", "capabilities", "registered by"] + (["reason"] if args.all else []), rows
    )
    for info in infos:
        for target in info.clashes:
            print(
                f"clash: entry point {info.name!r} = {target} is ignored, {info.name!r} stays "
                f"{info.origin}; register it with replace=True to use it"
            )
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=50, help="layers in the synthetic allocation problem")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random layer sizes and sensitivities"
    )


@command("demo", "solve a synthetic bit-allocation problem with every available solver")(_configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    from cetopt.solving import available_solvers, solve
    from cetopt.testing.solver_contract import multiple_choice_knapsack

    rng = np.random.default_rng(args.seed)
    bits = np.array([2, 3, 4, 5, 6, 8])
    params = rng.integers(1_000, 200_000, args.layers)
    scale = rng.lognormal(0, 1.5, args.layers)
    loss = scale[:, None] * 4.0 ** (-bits[None, :])  # quantization noise falls ~4x per extra bit
    size = params[:, None] * bits[None, :] / 8.0
    budget = float(params.sum() * 4 / 10)  # 10x smaller than fp32
    problem = multiple_choice_knapsack(loss, size, budget, sense="min")
    print(
        f"{args.layers} layers x {len(bits)} bit widths, budget {budget / 1e6:.3f} MB (10x smaller than fp32)"
    )
    rows = []
    for info in available_solvers():
        if not info.available:
            rows.append([info.name, "unavailable", "", "", ""])
            continue
        sol = solve(problem, info.name, time_limit=30)
        avg = (
            ""
            if sol.x is None
            else f"{(sol.x.reshape(args.layers, -1) @ bits * params).sum() / params.sum():.3f}"
        )
        rows.append(
            [
                info.name,
                sol.status.value,
                f"{sol.objective:.6g}" if sol.objective is not None else "",
                avg,
                f"{sol.time:.3f}",
            ]
        )
    _print_table(["solver", "status", "predicted loss", "avg bits", "seconds"], rows)
    return 0


MODEL_HELP = (
    "a zoo name (see `cetopt zoo`) or module:attr: an nn.Module, or a function returning one, "
    "importable from the current folder; it must be trained (or pass --checkpoint)"
)
DATA_HELP = (
    "a zoo dataset (digits, mnist1d, pydoc-text), a .npz or .safetensors file of arrays x and y "
    "(optionally x_val/y_val, x_test/y_test; else split 60/20/20), or module:attr returning (x, y) "
    "or a DataLoader (default: the zoo model's dataset; required for module:attr)"
)
CHECKPOINT_HELP = "trained weights: a safetensors file of the architecture's state_dict, loaded strictly"


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--data``, ``--checkpoint`` (and the old ``--allow-import``)."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--data", help=DATA_HELP)
    parser.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument(
        "--allow-import",
        action="store_true",
        help="accepted for older scripts; naming module:attr on the command line is permission enough",
    )


def _add_quiet(parser: argparse.ArgumentParser, progress_flag: bool = False) -> None:
    parser.add_argument("--quiet", action="store_true", help="no stage lines or progress bars on stderr")
    if progress_flag:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines stay)")


def _configure_compress(parser: argparse.ArgumentParser) -> None:
    _add_inputs(parser)
    parser.add_argument(
        "--budget",
        required=True,
        help="size of the quantized weights (codes + a scale and bit width per channel; biases, BatchNorm "
        'and the file header come on top): bytes ("120kb"), "10x" smaller than their fp32 size, or '
        '"3.2bits" average code width (the per-channel scales are added to that)',
    )
    parser.add_argument("--out", required=True, help="directory for model.safetensors and report.json")
    parser.set_defaults(out_kind="dir")
    parser.add_argument(
        "--method",
        default="auto",
        help="sensitivity: auto (default: the cheaper of measured and cet, printed), cet, hutchinson, "
        "fisher, measured (per channel: auto, cet, measured)",
    )
    parser.add_argument("--bits", default="2,3,4,5,6,8", help="candidate bit widths, comma-separated")
    parser.add_argument(
        "--group-sizes",
        default=None,
        help='scale granularities the ILP may choose per layer, e.g. "channel,128,64,32" '
        "(default: per channel only)",
    )
    parser.add_argument("--solver", default="highs", help="any registered solver (`cetopt solvers`)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the allocation MILP")
    parser.add_argument(
        "--probes", type=int, default=None, help="HVP probes per bit width (cet; default 16, 64 per channel)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sensitivity probes (same seed, same plan)"
    )
    parser.add_argument(
        "--calibration",
        default="train",
        choices=["train", "val"],
        help="split the sensitivities and the calibration are measured on",
    )
    parser.add_argument(
        "--no-bias-correction", action="store_true", help="keep the biases (no mean-shift correction)"
    )
    parser.add_argument(
        "--no-gptq", action="store_true", help="round to nearest (no error-compensating GPTQ rounding)"
    )
    parser.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="calibrate (GPTQ, bias correction) layer by layer on the quantized model's own inputs "
        "(default); --no-sequential calibrates all layers at once on the float model's inputs",
    )
    parser.add_argument(
        "--per-channel", action="store_true", help="a bit width per output channel (--method cet or measured)"
    )
    parser.add_argument(
        "--joint",
        action="store_true",
        help="choose per layer among bits, low rank and sparsity (one knapsack in loss units); "
        "never worse on the calibration loss than bits alone",
    )
    parser.add_argument(
        "--activations",
        type=int,
        choices=[4, 8],
        help="also quantize activations at these bits (calibrated on the calibration split); "
        "reports the accuracy and writes activations.json",
    )
    parser.add_argument(
        "--activation-method", default="minmax", choices=["minmax", "percentile", "mse"], help="range rule"
    )
    parser.add_argument(
        "--export", choices=["onnx"], help="also write model.onnx (QDQ, static int8 activations)"
    )
    _add_quiet(parser)


def _parse_group_sizes(text: str | None) -> list[int | None] | None:
    """``--group-sizes`` as a list (``channel``/``none``/``0``: a scale per output channel)."""
    from cetopt.errors import CommandLineError

    if not text:
        return None
    sizes: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part in ("channel", "none", "0"):
            sizes.append(None)
        elif part.isdigit() and int(part) > 0:
            sizes.append(int(part))
        else:
            raise CommandLineError(
                f"--group-sizes {text!r}: {part!r} is not a positive integer or 'channel' "
                "(e.g. channel,128,64,32)"
            )
    return sizes


def _parse_bits(text: str) -> list[int]:
    from cetopt.errors import CommandLineError

    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise CommandLineError(
            f"--bits {text!r}: expected whole numbers separated by commas, e.g. 2,4,8"
        ) from None
    if not bits or any(b < 2 or b > 16 for b in bits):
        raise CommandLineError(f"--bits {text!r}: each width must lie in 2..16")
    return sorted(set(bits))


def _resolve_model(args: argparse.Namespace, stages: Stages | None = None):
    """``(model, data, source)`` from ``--model``/``--data``/``--checkpoint``, every argument checked first.

    Files and arguments are checked before the model is imported, built or trained; the model is
    then run on two examples so a model that does not fit the data fails in one line too.
    """
    from cetopt import cli_inputs as inputs
    from cetopt.errors import CetoptError, CommandLineError
    from cetopt.zoo import build_model, load_dataset, load_model, zoo_entry

    quiet = getattr(args, "quiet", False)
    spec = args.model
    user_code = ":" in spec and not spec.startswith("zoo:")
    entry = None
    if not user_code:
        name, hint = inputs.canonical_model_name(spec.removeprefix("zoo:"))
        try:
            entry = zoo_entry(name)
        except CetoptError as exc:
            raise inputs.zoo_error(exc, spec) from None
        if hint and not quiet:
            print(hint, file=sys.stderr)
        spec = name
    elif not args.data:
        raise CommandLineError(f"--model {spec!r} is your own model, so --data is needed (see --help)")
    state = inputs.check_checkpoint(args.checkpoint) if args.checkpoint else None
    data = inputs.load_data(args.data) if args.data else load_dataset(entry.dataset)
    if stages is not None:
        stages(f"loading model {spec}" + (f" with weights from {args.checkpoint}" if state else ""))
    if user_code:
        model, source = inputs.build_user_model(spec), spec
    else:
        model = build_model(spec) if state is not None else load_model(spec, progress=not quiet)
        source = f"zoo:{spec}"
    if state is not None:
        model = inputs.load_checkpoint(model, state, args.checkpoint)
    inputs.check_fits(model, data, spec)
    return model.eval(), data, source


@command("compress", "mixed-precision quantization of a model within a size budget")(_configure_compress)
def run_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cetopt._io import atomic_write_json
    from cetopt.allocation.costs import check_budget
    from cetopt.errors import CommandLineError
    from cetopt.pipeline import compress
    from cetopt.serialization import save, saved_size
    from cetopt.zoo import accuracy

    try:
        check_budget(args.budget, "--budget")
    except Exception as exc:
        raise CommandLineError(str(exc)) from None
    bits = _parse_bits(args.bits)
    group_sizes = _parse_group_sizes(args.group_sizes)
    stages = Stages("compress", 5, args.quiet)
    model, data, source = _resolve_model(args, stages)
    calibration = data.loader(args.calibration, batch_size=512)
    texts = {
        "sensitivity": f"sensitivity ({args.method}): how much the loss rises when each layer is quantized "
        f"at each of {len(bits)} widths; the longest step, a bar counts its passes",
        "allocation": f"allocation: the integer program picks one width per "
        f"{'channel' if args.per_channel else 'layer'} within the budget {args.budget}",
        "quantization": "quantization: codes"
        + ("" if args.no_gptq else ", GPTQ rounding")
        + ("" if args.no_bias_correction else ", bias correction")
        + (", layer by layer" if args.sequential and not (args.no_gptq and args.no_bias_correction) else ""),
    }
    result = compress(
        model,
        calibration,
        args.budget,
        method=args.method,
        bits=bits,
        solver=args.solver,
        time_limit=args.time_limit,
        probes=args.probes,
        seed=args.seed,
        per_channel=args.per_channel,
        gptq=not args.no_gptq,
        bias_correction=not args.no_bias_correction,
        sequential=args.sequential,
        group_sizes=group_sizes,
        progress=not args.quiet,
        on_step=lambda step: stages(texts[step]),
        joint=args.joint,
    )
    choice = result.table.meta.get("auto")
    if choice is not None:
        print(f"sensitivity method (auto): {choice['reason']}")
    plan = result.plan
    print(plan.summary())
    if result.joint is not None:
        print(result.joint.summary())
    print(
        "  bits: one width per layer"
        + ("; per channel, `2×3 3×10` = 3 channels at 2 bits and 10 at 3" if args.per_channel else "")
        + ". bytes: packed codes + a float32 scale and a uint8 bit width per output channel (what the "
        "budget counts). predicted Δloss: the sum of the measured sensitivities of the chosen widths."
    )
    stages("evaluating on the test split and writing " + str(Path(args.out)))
    before = accuracy(model, data.x_test, data.y_test)
    after = accuracy(result.model, data.x_test, data.y_test)
    out = Path(args.out)
    saved = save(result.model, out / "model.safetensors", source=source)
    fp32_file = saved_size(model, source=source)  # in memory: nothing of the user's is written
    print(f"\ntest accuracy: fp32 {100 * before:.2f}%  ->  compressed {100 * after:.2f}%")
    budget_note = (
        f"the budget {args.budget} = {plan.budget_bytes:.0f} bytes for the quantized weights; biases, "
        "BatchNorm, float-kept layers and the header come on top"
    )
    for line in _size_lines(saved, plan.fp32_bytes, fp32_file, budget_note):
        print(line)
    report = {
        "model": source,
        "data": args.data or data.name,
        "checkpoint": args.checkpoint,
        "budget": args.budget,
        "per_channel": args.per_channel,
        "accuracy_fp32": before,
        "accuracy_compressed": after,
        "bytes_on_disk": saved.bytes_on_disk,
        "quantized_weight_bytes": saved.quantized_bytes,
        "other_bytes": saved.other_bytes,
        "header_bytes": saved.header_bytes,
        "fp32_weight_bytes": plan.fp32_bytes,
        "fp32_file_bytes": fp32_file,
        "weight_compression_ratio": plan.fp32_bytes / saved.quantized_bytes,
        "file_compression_ratio": fp32_file / saved.bytes_on_disk,
        "bits": plan.bits,
        "groups": dict(plan.groups.items()),
        "plan": plan.to_dict(),
        "solver_status": plan.status,
        "sensitivity_method": result.table.method,
        "sensitivity_method_choice": choice,
        "step_seconds": result.seconds,
        "step_cpu_seconds": result.cpu_seconds,
        "gptq": not args.no_gptq,
        "bias_correction": not args.no_bias_correction,
        "sequential_calibration": args.sequential and not (args.no_gptq and args.no_bias_correction),
        "sensitivity_seconds": result.table.meta.get("seconds"),
    }
    if result.joint is not None:
        report["joint"] = result.joint.to_dict()
    if args.activations or args.export:
        report.update(_deploy_outputs(args, result.model, data, out))
    atomic_write_json(out / "report.json", report)
    print(f"wrote {saved.path} and {out / 'report.json'}")
    return 0


def _deploy_outputs(args: argparse.Namespace, model, data, out) -> dict:
    """Activation ranges, accuracy with activations quantized, and the ONNX file (compress options)."""
    import warnings

    from cetopt._io import atomic_write_json
    from cetopt.deploy import calibrate_activations, export_onnx, runtime
    from cetopt.zoo import accuracy

    bits = args.activations or 8
    calibration = data.loader(args.calibration, batch_size=512)
    ranges = calibrate_activations(model, calibration, method=args.activation_method, bits=bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fake_model = runtime(model, "fake-int8", activations=ranges)
        fake = accuracy(fake_model, data.x_test, data.y_test)
    ranges = fake_model.activation_ranges  # resolved: each layer's reduced / full range, shared grids
    atomic_write_json(out / "activations.json", ranges.to_dict())
    print(f"activations at {bits} bits ({args.activation_method}): test accuracy {100 * fake:.2f}%")
    report = {
        "activation_bits": bits,
        "activation_method": args.activation_method,
        "accuracy_activations": fake,
    }
    if args.export == "onnx":
        exported = export_onnx(model, out / "model.onnx", data.x_val[:8], activations=ranges)
        print(f"wrote {exported.path} (onnxruntime vs PyTorch: max |diff| {exported.max_abs_diff})")
        report["onnx"] = {"path": exported.path, "max_abs_diff": exported.max_abs_diff}
    return report


def _configure_bench_latency(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a file written by cetopt compress / cetopt.save")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per mode and batch size")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--allow-import", action="store_true", help="allow importing the file's module:attr")


@command("bench-latency", "time a compressed model in fp32 and every execution mode")(
    _configure_bench_latency
)
def run_bench_latency(args: argparse.Namespace) -> int:
    import warnings

    from cetopt.deploy.latency import measure_latency
    from cetopt.deploy.runtime import MODES, runtime
    from cetopt.serialization import _build_architecture, load

    if args.allow_import and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the file's module:attr, from the current folder
    model = load(args.model, allow_import=args.allow_import)
    fp32 = _build_architecture(getattr(model, "_cetopt_source", None), args.allow_import).eval()
    make_input = _latency_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibration = [make_input(8)]
        modes = {m: runtime(model, m, calibration=calibration if "int8" in m else None) for m in MODES}
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        x = make_input(batch)
        fns = {"fp32": lambda x=x: fp32(x), **{k: (lambda m=m, x=x: m(x)) for k, m in modes.items()}}
        timed = measure_latency(fns, runs=args.runs, baseline="fp32", min_sample_s=0.01)
        for name, r in timed.items():
            rows.append(
                [
                    str(batch),
                    name,
                    f"{1e3 * r['median_s']:.2f}",
                    f"{1e3 * r['p25_s']:.2f}..{1e3 * r['p75_s']:.2f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['cpu_speedup']:.2f}x",
                ]
            )
    # speed-ups: medians of per-round ratios (rounds interleave the modes), wall clock and CPU time
    _print_table(["batch", "mode", "median ms", "p25..p75 ms", "vs fp32", "vs fp32 (CPU time)"], rows)
    return 0


def _latency_inputs(model):
    """Inputs of any batch size: the zoo dataset's, else random ones of the recorded shape."""
    import torch

    from cetopt.errors import CetoptError
    from cetopt.graph.rewriter import history

    source = getattr(model, "_cetopt_source", None) or ""
    if source.startswith("zoo:"):
        from cetopt.zoo import load_dataset, zoo_entry

        x = load_dataset(zoo_entry(source.removeprefix("zoo:")).dataset).x_val
        return lambda b: x[:b]
    spec = history(model).get("example_inputs")
    if not spec:
        raise CetoptError("the file records neither a zoo model nor example input shapes")
    shape, dtype = spec[0]["shape"][1:], getattr(torch, spec[0]["dtype"])
    if dtype.is_floating_point:
        return lambda b: torch.randn(b, *shape)
    return lambda b: torch.zeros(b, *shape, dtype=dtype)


def _configure_zoo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", action="store_true", help="train (or load from the cache) each model")
    _add_quiet(parser)


@command("zoo", "list the demo models (trained offline, cached)")(_configure_zoo)
def run_zoo(args: argparse.Namespace) -> int:
    from cetopt.zoo import load_model, model_names, zoo_entry

    rows = []
    names = model_names()
    stages = Stages("zoo", len(names), args.quiet or not args.train)
    for name in names:
        entry = zoo_entry(name)
        row = [name, entry.dataset, entry.description]
        if args.train:
            stages(f"training or loading {name}")
            info = load_model(name, progress=not args.quiet).zoo_info
            row.append(f"{100 * info['test_accuracy']:.2f}%")
        rows.append(row)
    _print_table(["model", "dataset", "architecture"] + (["test accuracy"] if args.train else []), rows)
    print("MLPs of any size: <digits|mnist1d>-mlp-<depth>x<width>, e.g. digits-mlp-2x100")
    return 0


def _ratio(text: str) -> float:
    """A ``--params-ratio``/``--bytes-ratio`` value: a number of at least 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a ratio must be a finite number of at least 1")
    return value


def _configure_decompose(parser: argparse.ArgumentParser) -> None:
    _add_inputs(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--params-ratio", type=_ratio, help="keep 1/ratio of the layers' weight values")
    budget.add_argument("--bytes-ratio", type=_ratio, help="keep 1/ratio of the layers' float32 weight bytes")
    parser.add_argument(
        "--kinds",
        default="quant,svd,prune,weight_space,admm",
        help="menu kinds, comma-separated (dense is always on the menu)",
    )
    parser.add_argument("--calibration-size", type=int, default=512, help="training examples to fit on")
    parser.add_argument(
        "--iterations", type=int, default=20, help="most ADMM iterations per option (stopped by residuals)"
    )
    parser.add_argument("--solver", default="highs", help="any registered solver (`cetopt solvers`)")
    parser.add_argument("--out", help="directory for model.safetensors and report.json")
    parser.set_defaults(out_kind="dir")
    _add_quiet(parser, progress_flag=True)


@command("decompose", "low-rank + sparse / quantization menu chosen by one MILP")(_configure_decompose)
def run_decompose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cetopt._io import atomic_write_json
    from cetopt.errors import CommandLineError
    from cetopt.lowrank import build_menu
    from cetopt.serialization import save, saved_size
    from cetopt.zoo import accuracy

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    known = {"quant", "svd", "prune", "weight_space", "admm", "dense"}
    if not kinds or set(kinds) - known:
        raise CommandLineError(f"--kinds {args.kinds!r}: choose from {', '.join(sorted(known - {'dense'}))}")
    stages = Stages("decompose", 4 + bool(args.out), args.quiet)
    model, data, source = _resolve_model(args, stages)
    stages(
        f"menu: fitting {', '.join(kinds)} options for every layer on {args.calibration_size} examples "
        "and measuring each option's output error (the longest step; bars per layer and fit)"
    )
    menu = build_menu(
        model,
        data.x_train[: args.calibration_size],
        kinds=kinds,
        iterations=args.iterations,
        progress=not (args.no_progress or args.quiet),
    )
    resource = "params" if args.params_ratio is not None else "bytes"
    ratio = args.params_ratio if args.params_ratio is not None else args.bytes_ratio
    stages(f"choice: one option per layer by the knapsack MILP, {resource} at most 1/{ratio:g} of dense")
    if args.params_ratio is not None:
        plan = menu.choose(menu.dense_params / args.params_ratio, kinds=kinds, solver=args.solver)
    else:
        plan = menu.choose(
            menu.dense_bytes / args.bytes_ratio, resource="bytes", kinds=kinds, solver=args.solver
        )
    new = menu.apply(model, plan)
    rows = [
        [name, o.label, str(o.params), str(o.bytes), f"{o.output_error:.2e}"]
        for name, o in plan.options.items()
    ]
    _print_table(["layer", "choice", "params", "bytes", "output error"], rows)
    print(
        "  choice: dense, qN (N-bit codes), svd-rR (rank R), prune-D (density D), ... as built by the "
        "menu; output error: the network output's relative error with only that layer changed"
    )
    stages("evaluating on the test split")
    before = accuracy(model, data.x_test, data.y_test)
    after = accuracy(new, data.x_test, data.y_test)
    print(
        f"\nparams {menu.dense_params} -> {plan.params} ({menu.dense_params / plan.params:.2f}x fewer, "
        f"{100 * plan.params / menu.dense_params:.1f}% kept), bytes {menu.dense_bytes} -> {plan.bytes} "
        f"({menu.dense_bytes / plan.bytes:.2f}x smaller, {100 * plan.bytes / menu.dense_bytes:.1f}%), "
        f"solver {plan.solver} ({plan.status}); the budget counts the chosen layers' weights only"
    )
    print(f"test accuracy: fp32 {100 * before:.2f}%  ->  compressed {100 * after:.2f}% (no fine-tune)")
    if args.out:
        stages(f"writing {args.out}")
        out = Path(args.out)
        saved = save(new, out / "model.safetensors", source=source)
        fp32_file = saved_size(model, source=source)
        other = "factors, sparse values and their int64 positions, float layers, biases, BatchNorm"
        for line in _size_lines(saved, None, fp32_file, other=other):
            print(line)
        report = {"model": source, "accuracy_fp32": before, "accuracy_compressed": after, **plan.to_dict()}
        report.update(
            bytes_on_disk=saved.bytes_on_disk,
            quantized_weight_bytes=saved.quantized_bytes,
            other_bytes=saved.other_bytes,
            header_bytes=saved.header_bytes,
            fp32_file_bytes=fp32_file,
            file_compression_ratio=fp32_file / saved.bytes_on_disk,
        )
        atomic_write_json(out / "report.json", report)
        print(f"wrote {saved.path} and {out / 'report.json'}")
    return 0


def _configure_self_compress(parser: argparse.ArgumentParser) -> None:
    _add_inputs(parser)
    parser.add_argument("--out", required=True, help="directory for model.safetensors and report.json")
    parser.set_defaults(out_kind="dir")
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--size-weight", type=float, default=0.1, help="weight of the size term Q")
    parser.add_argument(
        "--bit-lr", type=float, default=0.05, help="learning rate of bit depths and exponents"
    )
    parser.add_argument("--no-preservation", action="store_true", help="plain self-compression")
    parser.add_argument("--restore-threshold", type=float, default=0.05, help="accuracy drop that restores")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the batch order and the preservation set"
    )
    _add_quiet(parser, progress_flag=True)


@command("self-compress", "learn per-channel bit depths in training, guarded by a preservation set")(
    _configure_self_compress
)
def run_self_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cetopt._io import atomic_write_json
    from cetopt.selfcompress import self_compress
    from cetopt.serialization import save, saved_size
    from cetopt.zoo import accuracy
    from cetopt.zoo.training import mean_loss

    stages = Stages("self-compress", 4, args.quiet)
    model, data, source = _resolve_model(args, stages)
    stages(
        f"training {args.steps} steps with learned bit depths"
        + ("" if args.no_preservation else ", guarded by a preservation set")
        + " (a bar shows loss, size term and bytes)"
    )
    result = self_compress(
        model,
        data,
        steps=args.steps,
        size_weight=args.size_weight,
        bit_lr=args.bit_lr,
        preservation=not args.no_preservation,
        restore_threshold=args.restore_threshold,
        seed=args.seed,
        progress=not (args.no_progress or args.quiet),
    )
    stages("evaluating on the test split")
    out = Path(args.out)
    fp32_bytes = saved_size(model, source=source)  # in memory: no file of the user's is touched
    report = {
        "model": source,
        "accuracy_fp32": accuracy(model, data.x_test, data.y_test),
        "accuracy_compressed": accuracy(result.model, data.x_test, data.y_test),
        "loss_fp32": mean_loss(model, data.x_test, data.y_test),
        "loss_compressed": mean_loss(result.model, data.x_test, data.y_test),
    }
    stages(f"writing {out}")
    saved = save(result.model, out / "model.safetensors", source=source)
    report.update(
        {
            "bytes_on_disk": saved.bytes_on_disk,
            "fp32_bytes_on_disk": fp32_bytes,
            "quantized_weight_bytes": saved.quantized_bytes,
            "other_bytes": saved.other_bytes,
            "header_bytes": saved.header_bytes,
            "file_compression_ratio": fp32_bytes / saved.bytes_on_disk,
            "size_term_bytes": result.size_bytes,
            "bits": result.bits,
            "removed": [{"layer": d.layer, "units": list(d.units)} for d in result.removals],
            "restores": [
                {"step": e.step, "accuracy": e.accuracy, "channels": e.channels} for e in result.restores
            ],
            "preservation": None if result.preservation is None else result.preservation.counts,
        }
    )
    print(
        f"test accuracy: fp32 {100 * report['accuracy_fp32']:.2f}%  ->  self-compressed "
        f"{100 * report['accuracy_compressed']:.2f}%; {len(result.restores)} restores"
    )
    for line in _size_lines(saved, None, fp32_bytes):
        print(line)
    atomic_write_json(out / "report.json", report)
    print(f"wrote {saved.path} and {out / 'report.json'}")
    return 0


def _leo_name(name: str, quiet: bool) -> tuple[str, str]:
    """(the name shown, LEO's internal name): ``digits-mlp-2x100`` ↔ ``digits-2x100``."""
    from cetopt.cli_inputs import canonical_model_name

    shown, hint = canonical_model_name(name)
    if hint and not quiet:
        print(hint, file=sys.stderr)
    return shown, re.sub(r"-mlp-(\d+x\d+)$", r"-\1", shown)


def _configure_leo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="digits-mlp-2x100",
        help="<digits|digits28|digits32|mnist1d>-mlp-<depth>x<width>, digits-conv or digits28-/digits32-conv",
    )
    parser.add_argument("--l1", type=float, default=1e-3, help="L1 weight penalty of the training recipe")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run and the domain samples")
    parser.add_argument(
        "--domain",
        default="data",
        help="'data' (per-feature box of the training split) or LO,HI (a box given without data)",
    )
    parser.add_argument("--solver", default="highs", help="any registered solver (`cetopt solvers`)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP")
    parser.add_argument("--out", default=None, help="write the stability report as JSON here")
    parser.set_defaults(out_kind="file")
    _add_quiet(parser, progress_flag=True)


@command("leo", "lossless compression: find stable ReLUs (LEO) and remove them")(_configure_leo)
def run_leo(args: argparse.Namespace) -> int:
    import torch

    import cetopt
    from cetopt._io import atomic_write_json
    from cetopt.errors import CetoptError, CommandLineError
    from cetopt.leo import Domain, build_leo_model, load_leo_model
    from cetopt.leo.training import leo_dataset
    from cetopt.zoo import accuracy

    shown, name = _leo_name(args.model, args.quiet)
    try:
        build_leo_model(name)
    except CetoptError:
        raise CommandLineError(
            f"--model {args.model!r}: not a LEO network; use <digits|digits28|digits32|mnist1d>-mlp-"
            "<depth>x<width> (e.g. digits-mlp-2x100), digits-conv, or digits28-conv / digits32-conv"
        ) from None
    if not args.l1 >= 0:
        raise CommandLineError(f"--l1 {args.l1}: must be at least 0")
    bounds = None
    if args.domain != "data":
        try:
            bounds = [float(v) for v in args.domain.split(",")]
        except ValueError:
            bounds = []
        if len(bounds) != 2 or not bounds[0] <= bounds[1]:
            raise CommandLineError(f"--domain {args.domain!r}: expected 'data' or LO,HI with LO <= HI")
    stages = Stages("leo", 4, args.quiet)
    stages(f"training or loading {shown} (L1 = {args.l1:g}, seed {args.seed})")
    model = load_leo_model(name, l1=args.l1, seed=args.seed)
    data = leo_dataset(name.split("-")[0])
    if bounds is None:
        domain, witnesses = Domain.from_data(data.x_train), data.x_train
    else:
        lo, hi = bounds
        domain, witnesses = (
            Domain.box(torch.full(data.input_shape, lo), torch.full(data.input_shape, hi)),
            None,
        )
    stages("proving which ReLUs are stable: data, bounds, attacks, then LPs/MILPs (bars per layer and stage)")
    report = cetopt.find_stable_units(
        model,
        domain,
        args.solver,
        data=witnesses,
        time_limit=args.time_limit,
        seed=args.seed,
        progress=not (args.no_progress or args.quiet),
    )
    stages("removing the stable units through the graph rewriter")
    compressed = cetopt.remove_stable_units(model, report)
    print(report.summary())
    info = compressed.leo_removal
    stages("checking outputs on the test split")
    with torch.no_grad():
        diff = (compressed(data.x_test) - model(data.x_test)).abs().max().item()
    before, after = info["params_before"], info["params_after"]
    print(
        f"\nparameters {before} -> {after} (-{100 * info['params_removed_fraction']:.1f}%; "
        f"{before / max(after, 1):.2f}x fewer, {100 * after / before:.1f}% kept), test accuracy "
        f"{100 * accuracy(model, data.x_test, data.y_test):.2f}% (unchanged by construction), "
        f"max |output change| on test {diff:.2e}"
    )
    if args.out:
        atomic_write_json(args.out, {**report.to_dict(), "removal": info, "max_diff_test": diff})
        print(f"wrote {args.out}")
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """Fail in a line, before any work, when ``--out`` cannot be written."""
    from cetopt._io import check_output_dir, check_output_file

    if getattr(args, "out", None) is None:
        return
    if args.out_kind == "file":
        check_output_file(args.out)
    else:
        check_output_dir(args.out, ("model.safetensors", "report.json"))


def build_parser() -> argparse.ArgumentParser:
    """The ``cetopt`` argument parser, one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="cetopt",
        description="Solver-driven compression of PyTorch models. `cetopt COMMAND --help` shows a "
        "command's options and their defaults.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, _, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        configure(child)
        if "--quiet" not in child._option_string_actions:
            child.add_argument(
                "--quiet", action="store_true", help="no stage lines or progress bars on stderr"
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cetopt`` script."""
    args = build_parser().parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    try:
        _check_out(args)
        return run(args)
    except Exception as exc:  # named errors reach the user as one clear line, not a traceback
        from cetopt.errors import CetoptError

        if isinstance(exc, CetoptError):
            message = " ".join(_plain_numbers(str(exc)).split())
            print(f"cetopt {args.command}: error: {message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
