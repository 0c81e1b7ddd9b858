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

    rows = []
    for info in available_solvers():
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
        return run(args)
    except Exception as exc:  # named errors reach the user as one clear line, not a traceback
        from cetopt.errors import CetoptError

        if isinstance(exc, CetoptError):
            print(f"cetopt {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
