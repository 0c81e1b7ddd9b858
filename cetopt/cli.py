"""The ``cetopt`` command line. Each subcommand is one small function registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np

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
    parser.add_argument("--seed", type=int, default=0)


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


def _configure_compress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a zoo name (see `cetopt zoo`) or module:attr")
    parser.add_argument("--budget", required=True, help='weight bytes, "10x" against fp32, or "3.2bits"')
    parser.add_argument("--out", required=True, help="directory for model.safetensors and report.json")
    parser.set_defaults(out_kind="dir")
    parser.add_argument("--data", help="dataset for a module:attr model (digits or mnist1d)")
    parser.add_argument(
        "--method",
        default="auto",
        help="sensitivity: auto (default: the cheaper of measured and cet, printed), cet, hutchinson, "
        "fisher, measured (per channel: auto, cet, measured)",
    )
    parser.add_argument("--bits", default="2,3,4,5,6,8", help="candidate bit widths, comma-separated")
    parser.add_argument("--solver", default="highs", help="any registered solver (`cetopt solvers`)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the allocation MILP")
    parser.add_argument(
        "--probes", type=int, default=None, help="HVP probes per bit width (cet; default 16, 64 per channel)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--calibration",
        default="train",
        choices=["train", "val"],
        help="split the sensitivities are measured on",
    )
    parser.add_argument("--allow-import", action="store_true", help="allow importing a module:attr model")
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


def _resolve_model(args: argparse.Namespace):
    from cetopt.errors import CetoptError
    from cetopt.zoo import load_dataset, load_model, zoo_entry

    if ":" not in args.model:
        entry = zoo_entry(args.model)
        return load_model(args.model), load_dataset(args.data or entry.dataset), f"zoo:{args.model}"
    if not args.allow_import:
        raise CetoptError(f"--model {args.model} imports and runs your code; add --allow-import to allow it")
    if not args.data:
        raise CetoptError("a module:attr model needs --data (digits or mnist1d)")
    import importlib

    from torch import nn

    module_name, _, attr = args.model.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj()
    return model.eval(), load_dataset(args.data), args.model


@command("compress", "mixed-precision quantization of a model within a size budget")(_configure_compress)
def run_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cetopt._io import atomic_write_json
    from cetopt.pipeline import compress
    from cetopt.serialization import save
    from cetopt.zoo import accuracy

    model, data, source = _resolve_model(args)
    bits = [int(b) for b in args.bits.split(",")]
    result = compress(
        model,
        data.loader(args.calibration, batch_size=512),
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
        joint=args.joint,
    )
    choice = result.table.meta.get("auto")
    if choice is not None:
        print(f"sensitivity method (auto): {choice['reason']}")
    print(result.plan.summary())
    if result.joint is not None:
        print(result.joint.summary())
    before = accuracy(model, data.x_test, data.y_test)
    after = accuracy(result.model, data.x_test, data.y_test)
    out = Path(args.out)
    saved = save(result.model, out / "model.safetensors", source=source)
    print(f"\ntest accuracy: fp32 {100 * before:.2f}%  ->  compressed {100 * after:.2f}%")
    print(
        f"wrote {saved.path}: {saved.bytes_on_disk} bytes on disk "
        f"(fp32 weights {result.plan.fp32_bytes:.0f} bytes)"
    )
    report = {
        "model": source,
        "budget": args.budget,
        "accuracy_fp32": before,
        "accuracy_compressed": after,
        "bytes_on_disk": saved.bytes_on_disk,
        "quantized_weight_bytes": saved.quantized_bytes,
        "other_bytes": saved.other_bytes,
        "bits": result.plan.bits,
        "plan": result.plan.to_dict(),
        "solver_status": result.plan.status,
        "sensitivity_method": result.table.method,
        "sensitivity_method_choice": choice,
        "step_seconds": result.seconds,
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
    print(f"wrote {out / 'report.json'}")
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
        fake = accuracy(runtime(model, "fake-int8", activations=ranges), data.x_test, data.y_test)
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
        for name, r in measure_latency(fns, runs=args.runs, baseline="fp32").items():
            rows.append(
                [
                    str(batch),
                    name,
                    f"{1e3 * r['median_s']:.2f}",
                    f"{1e3 * r['p25_s']:.2f}..{1e3 * r['p75_s']:.2f}",
                    f"{r['speedup']:.2f}x",
                ]
            )
    _print_table(["batch", "mode", "median ms", "p25..p75 ms", "vs fp32"], rows)
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


@command("zoo", "list the demo models (trained offline, cached)")(_configure_zoo)
def run_zoo(args: argparse.Namespace) -> int:
    from cetopt.zoo import load_model, model_names, zoo_entry

    rows = []
    for name in model_names():
        entry = zoo_entry(name)
        row = [name, entry.dataset, entry.description]
        if args.train:
            info = load_model(name).zoo_info
            row.append(f"{100 * info['test_accuracy']:.2f}%")
        rows.append(row)
    _print_table(["model", "dataset", "architecture"] + (["test accuracy"] if args.train else []), rows)
    return 0


def _configure_decompose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a zoo name (see `cetopt zoo`) or module:attr")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--params-ratio", type=float, help="keep 1/ratio of the layers' weight values")
    budget.add_argument("--bytes-ratio", type=float, help="keep 1/ratio of the layers' float32 weight bytes")
    parser.add_argument(
        "--kinds",
        default="quant,svd,prune,weight_space,admm",
        help="menu kinds, comma-separated (dense is always on the menu)",
    )
    parser.add_argument("--data", help="dataset for a module:attr model (digits or mnist1d)")
    parser.add_argument("--calibration-size", type=int, default=512, help="training examples to fit on")
    parser.add_argument(
        "--iterations", type=int, default=20, help="most ADMM iterations per option (stopped by residuals)"
    )
    parser.add_argument("--solver", default="highs", help="any registered solver (`cetopt solvers`)")
    parser.add_argument("--out", help="directory for model.safetensors and report.json")
    parser.set_defaults(out_kind="dir")
    parser.add_argument("--allow-import", action="store_true", help="allow importing a module:attr model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


@command("decompose", "low-rank + sparse / quantization menu chosen by one MILP")(_configure_decompose)
def run_decompose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cetopt._io import atomic_write_json
    from cetopt.lowrank import build_menu
    from cetopt.serialization import save
    from cetopt.zoo import accuracy

    model, data, source = _resolve_model(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    menu = build_menu(
        model,
        data.x_train[: args.calibration_size],
        kinds=kinds,
        iterations=args.iterations,
        progress=not args.no_progress,
    )
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
    before = accuracy(model, data.x_test, data.y_test)
    after = accuracy(new, data.x_test, data.y_test)
    print(
        f"\nparams {menu.dense_params} -> {plan.params} ({menu.dense_params / plan.params:.2f}x), "
        f"bytes {menu.dense_bytes} -> {plan.bytes} ({menu.dense_bytes / plan.bytes:.2f}x), "
        f"solver {plan.solver} ({plan.status})"
    )
    print(f"test accuracy: fp32 {100 * before:.2f}%  ->  compressed {100 * after:.2f}% (no fine-tune)")
    if args.out:
        out = Path(args.out)
        saved = save(new, out / "model.safetensors", source=source)
        report = {"model": source, "accuracy_fp32": before, "accuracy_compressed": after, **plan.to_dict()}
        report["bytes_on_disk"] = saved.bytes_on_disk
        atomic_write_json(out / "report.json", report)
        print(f"wrote {saved.path} and {out / 'report.json'}")
    return 0


def _configure_self_compress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a zoo name (see `cetopt zoo`) or module:attr")
    parser.add_argument("--out", required=True, help="directory for model.safetensors and report.json")
    parser.set_defaults(out_kind="dir")
    parser.add_argument("--data", help="dataset for a module:attr model (digits, mnist1d or pydoc-text)")
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--size-weight", type=float, default=0.1, help="weight of the size term Q")
    parser.add_argument(
        "--bit-lr", type=float, default=0.05, help="learning rate of bit depths and exponents"
    )
    parser.add_argument("--no-preservation", action="store_true", help="plain self-compression")
    parser.add_argument("--restore-threshold", type=float, default=0.05, help="accuracy drop that restores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-import", action="store_true", help="allow importing a module:attr model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


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

    model, data, source = _resolve_model(args)
    result = self_compress(
        model,
        data,
        steps=args.steps,
        size_weight=args.size_weight,
        bit_lr=args.bit_lr,
        preservation=not args.no_preservation,
        restore_threshold=args.restore_threshold,
        seed=args.seed,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    saved = save(result.model, out / "model.safetensors", source=source)
    fp32_bytes = saved_size(model, source=source)  # in memory: no file of the user's is touched
    report = {
        "model": source,
        "accuracy_fp32": accuracy(model, data.x_test, data.y_test),
        "accuracy_compressed": accuracy(result.model, data.x_test, data.y_test),
        "loss_fp32": mean_loss(model, data.x_test, data.y_test),
        "loss_compressed": mean_loss(result.model, data.x_test, data.y_test),
        "bytes_on_disk": saved.bytes_on_disk,
        "fp32_bytes_on_disk": fp32_bytes,
        "quantized_weight_bytes": saved.quantized_bytes,
        "size_term_bytes": result.size_bytes,
        "bits": result.bits,
        "removed": [{"layer": d.layer, "units": list(d.units)} for d in result.removals],
        "restores": [
            {"step": e.step, "accuracy": e.accuracy, "channels": e.channels} for e in result.restores
        ],
        "preservation": None if result.preservation is None else result.preservation.counts,
    }
    print(
        f"test accuracy: fp32 {100 * report['accuracy_fp32']:.2f}%  ->  self-compressed "
        f"{100 * report['accuracy_compressed']:.2f}%; {saved.bytes_on_disk} bytes on disk "
        f"({100 * saved.bytes_on_disk / fp32_bytes:.1f}% of fp32); {len(result.restores)} restores"
    )
    atomic_write_json(out / "report.json", report)
    print(f"wrote {saved.path} and {out / 'report.json'}")
    return 0


def _configure_leo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="digits-2x100", help="<digits|mnist1d>-<depth>x<width> or digits-conv"
    )
    parser.add_argument("--l1", type=float, default=1e-3, help="L1 weight penalty of the training recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--domain",
        default="data",
        help="'data' (per-feature box of the training split) or LO,HI (a box given without data)",
    )
    parser.add_argument("--solver", default="highs", help="any registered solver (`cetopt solvers`)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP")
    parser.add_argument("--out", default=None, help="write the stability report as JSON here")
    parser.set_defaults(out_kind="file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


@command("leo", "lossless compression: find stable ReLUs (LEO) and remove them")(_configure_leo)
def run_leo(args: argparse.Namespace) -> int:
    import torch

    import cetopt
    from cetopt._io import atomic_write_json
    from cetopt.leo import Domain, load_leo_model
    from cetopt.zoo import accuracy, load_dataset

    model = load_leo_model(args.model, l1=args.l1, seed=args.seed)
    data = load_dataset(args.model.split("-")[0])
    if args.domain == "data":
        domain, witnesses = Domain.from_data(data.x_train), data.x_train
    else:
        lo, hi = (float(v) for v in args.domain.split(","))
        domain, witnesses = (
            Domain.box(torch.full(data.input_shape, lo), torch.full(data.input_shape, hi)),
            None,
        )
    report = cetopt.find_stable_units(
        model,
        domain,
        args.solver,
        data=witnesses,
        time_limit=args.time_limit,
        seed=args.seed,
        progress=not args.no_progress,
    )
    compressed = cetopt.remove_stable_units(model, report)
    print(report.summary())
    info = compressed.leo_removal
    with torch.no_grad():
        diff = (compressed(data.x_test) - model(data.x_test)).abs().max().item()
    print(
        f"\nparameters {info['params_before']} -> {info['params_after']} "
        f"(-{100 * info['params_removed_fraction']:.1f}%), test accuracy "
        f"{100 * accuracy(model, data.x_test, data.y_test):.2f}%, max |output change| on test {diff:.2e}"
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
    parser = argparse.ArgumentParser(
        prog="cetopt", description="Solver-driven compression of PyTorch models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, _, help_text) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
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
            print(f"cetopt {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
