"""Allocation stage: choose each layer's compression under a budget by an integer program."""

from cetopt.allocation.allocate import OptionChoice, ParetoFront, allocate, choose_options, pareto
from cetopt.allocation.costs import BYTES_PER_CHANNEL, fp32_weight_bytes, option_bytes, parse_budget
from cetopt.allocation.mck import MCKGreedyResult, mck_greedy
from cetopt.allocation.plan import Plan

__all__ = [
    "BYTES_PER_CHANNEL",
    "MCKGreedyResult",
    "OptionChoice",
    "ParetoFront",
    "Plan",
    "allocate",
    "choose_options",
    "fp32_weight_bytes",
    "mck_greedy",
    "option_bytes",
    "pareto",
    "parse_budget",
]
