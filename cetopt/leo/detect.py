"""``find_stable_units``: progressive screening (data, samples, intervals, linear bounds, attack,
LP, MILP) of every ReLU.

Soundness. A unit is called stable only on a proof that clears zero by ``margin``: interval or
linear-bound arithmetic (float64, widened by an explicit rounding bound), or a solver's *dual
bound* (LP optimum or MIP dual bound, never an incumbent): ``max g ≤ −margin`` proves "stably
inactive", ``min g ≥ margin`` proves "stably active". Instability needs a witness: a point of the
domain at which the network itself (run in float64) gives the unit both signs; solver incumbents,
LP points and attack points only count after that re-check. Every
inconclusive case (time limit, a bound between −margin and margin) keeps the unit as unstable,
which is always safe for the compression that follows. The margin (default ``1e-6``) covers HiGHS's
feasibility and optimality tolerances (1e-7 by default) on the small, well-scaled problems here;
matrix entries of magnitude ≤ 1e-9, which HiGHS would drop silently, are dropped explicitly.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cetopt._modes import in_eval_mode
from cetopt.analysis._common import progress_bar
from cetopt.errors import DataShapeError, DomainError, UntraceableModelError
from cetopt.leo.attack import NetworkTorch, search_sign_change
from cetopt.leo.domain import Domain, as_domain
from cetopt.leo.formulation import (
    ACTIVE,
    INACTIVE,
    UNDECIDED,
    BoxState,
    cone,
    gid_base,
    interval_bounds,
    layer_problem,
)
from cetopt.leo.linear_bounds import linear_bounds, optimise_slopes
from cetopt.leo.network import ReluLayer, ReluNetwork, extract
from cetopt.leo.report import _ALL_STAGES, STAGES, LayerReport, StabilityReport, weights_fingerprint
from cetopt.problem import Solution, Status
from cetopt.solving.api import default_workers
from cetopt.solving.executors import Executor, get_executor, solve_tasks

__all__ = ["find_stable_units"]

_RANK = {s: i for i, s in enumerate(_ALL_STAGES)}
_IPM_COLUMNS = 2000
_SLOPE_ROWS = 128  # optimise slopes for at most this many open neurons of a layer
_OBBT_UNITS = 512  # OBBT on at most this many unstable neurons per earlier layer, most influential first
_DATA_STARTS = 8  # attack starts per open channel taken from the data
_DATA_STEPS = 100


@dataclass
class _Config:
    solver: object
    stages: tuple[str, ...]
    early_stop: bool
    propagate: bool
    margin: float
    time_limit: float | None
    workers: int
    milp_units: Mapping[int, np.ndarray] | None
    executor: Executor | None = None


@dataclass
class _Flags:
    """Per layer and unit (channel): proven unable to be inactive / active, and by which stage."""

    no_inactive: np.ndarray
    no_active: np.ndarray
    stage_pos: np.ndarray
    stage_neg: np.ndarray

    @classmethod
    def new(cls, units: int) -> _Flags:
        empty = np.full(units, "", dtype=object)
        return cls(np.zeros(units, bool), np.zeros(units, bool), empty.copy(), empty.copy())

    def mark(self, which: str, units: np.ndarray, stage: str) -> None:
        flags, stages = (
            (self.no_inactive, self.stage_pos) if which == "pos" else (self.no_active, self.stage_neg)
        )
        new = np.asarray(units, dtype=np.int64)
        new = new[~flags[new]]
        flags[new] = True
        stages[new] = stage

    @property
    def settled(self) -> np.ndarray:
        return self.no_inactive & self.no_active


@dataclass
class _Counters:
    milps: int = 0
    lps: int = 0
    milp_time: float = 0.0
    lp_time: float = 0.0
    time: float = 0.0


@dataclass
class _Run:
    net: ReluNetwork
    domain: Domain
    cfg: _Config
    boxes: list[BoxState]
    flags: list[_Flags]
    stages: list[list[np.ndarray]]  # stages[b][i]: stage that proved each neuron's state in box b
    counters: list[_Counters]
    lp_done: dict = field(default_factory=dict)
    # seen[b][i - 1]: (max, min) pre-activation of layer i over the points evaluated in box b
    seen: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # solve tasks that failed twice
    torch_net: NetworkTorch | None = None
    data: np.ndarray | None = None  # the data points inside the domain (attack starts)
    data_pres: dict = field(default_factory=dict)  # box -> (its data points, their pre-activations)
    slopes_done: set = field(default_factory=set)  # (box, layer) where optimised slopes were run

    # -- witnesses -------------------------------------------------------------------------
    def witness(self, x: np.ndarray, stage: str) -> None:
        """Mark units seen positive / negative at the domain points ``x``."""
        if len(x) == 0:
            return
        pres = self.observe(x)
        for layer, flags, g in zip(self.net.layers, self.flags, pres):
            ch = layer.channel_of
            flags.mark("pos", np.unique(ch[(g > 0).any(axis=0)]), stage)
            flags.mark("neg", np.unique(ch[(g < 0).any(axis=0)]), stage)

    def observe(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-activations at ``x``; each box records the extremes over its own points."""
        pres = self.net.preactivations(x)
        for b, box in enumerate(self.boxes):
            inside = ((x >= box.lo[0]) & (x <= box.hi[0])).all(axis=1)
            if not inside.any():
                continue
            for k, g in enumerate(pres):
                hi, lo = self.seen[b][k]
                np.maximum(hi, g[inside].max(axis=0), out=hi)
                np.minimum(lo, g[inside].min(axis=0), out=lo)
        return pres

    def contradicted(self, b: int, i: int, n: int, sense: str, sol: Solution) -> bool:
        """Whether a point the network was evaluated at refutes ``sol.bound`` (and so the solver)."""
        hi, lo = self.seen[b][i - 1]
        margin = self.cfg.margin
        wrong = sol.bound + margin < hi[n] if sense == "max" else sol.bound - margin > lo[n]
        if wrong:
            seen = hi[n] if sense == "max" else lo[n]
            self.rejected.append(
                f"layer {i} unit {n}: {sol.solver} bounded the {sense} by {sol.bound:.6g}, "
                f"but the network reaches {seen:.6g} inside the box"
            )
        return bool(wrong)

    # -- proofs ----------------------------------------------------------------------------
    def prove(self, b: int, i: int, neurons: np.ndarray, state: int, stage: str) -> None:
        box, layer = self.boxes[b], self.net.layers[i - 1]
        neurons = neurons[box.state[i - 1][neurons] == UNDECIDED]
        box.state[i - 1][neurons] = state
        self.stages[b][i - 1][neurons] = stage
        # a proven neuron rules out the opposite state for its whole unit (conservative for g ≡ 0)
        self.flags[i - 1].mark("neg" if state == INACTIVE else "pos", layer.channel_of[neurons], stage)

    def bounded(self, b: int, i: int, lo: np.ndarray, hi: np.ndarray, stage: str) -> None:
        """Tighten layer ``i``'s bounds in box ``b``; prove what clears zero by the margin."""
        box, margin = self.boxes[b], self.cfg.margin
        box.lo[i], box.hi[i] = np.maximum(box.lo[i], lo), np.minimum(box.hi[i], hi)
        if stage in self.cfg.stages:
            self.prove(b, i, np.flatnonzero(box.hi[i] <= -margin), INACTIVE, stage)
            self.prove(b, i, np.flatnonzero(box.lo[i] >= margin), ACTIVE, stage)

    def interval(self, b: int, i: int) -> None:
        self.bounded(b, i, *interval_bounds(self.net, i, self.boxes[b]), "interval")

    def linear(self, b: int, i: int) -> None:
        """Symbolic linear bounds for every neuron of layer ``i`` (skipped where intervals are exact)."""
        if "linear" not in self.cfg.stages or set(self.net.layers[i - 1].pre.terms) == {0}:
            return
        self.bounded(b, i, *linear_bounds(self.net, i, self.boxes[b]), "linear")

    def optimised(self, b: int, i: int) -> None:
        """Linear bounds with optimised slopes (α-CROWN) for the neurons still open after the attack."""
        if "linear" not in self.cfg.stages or set(self.net.layers[i - 1].pre.terms) == {0}:
            return
        rows = np.union1d(*self.needs(b, i))
        if rows.size == 0 or rows.size > _SLOPE_ROWS:  # many open positions: their small LPs are cheaper
            return
        box = self.boxes[b]
        slopes = optimise_slopes(self.net, i, box, rows)
        if not slopes:
            return
        self.slopes_done.add((b, i))
        lo, hi = linear_bounds(self.net, i, box, rows, slopes)
        full_lo, full_hi = box.lo[i].copy(), box.hi[i].copy()
        full_lo[rows], full_hi[rows] = np.maximum(full_lo[rows], lo), np.minimum(full_hi[rows], hi)
        self.bounded(b, i, full_lo, full_hi, "linear")

    def attack(self, b: int, i: int) -> None:
        """Projected-gradient search for a sign change of each channel still open; points re-checked."""
        if "attack" not in self.cfg.stages:
            return
        need_max, need_min = self.needs(b, i)
        ch = self.net.layers[i - 1].channel_of
        channels = np.concatenate([np.unique(ch[need_max]), np.unique(ch[need_min])])
        signs = np.concatenate(
            [np.ones(np.unique(ch[need_max]).size), -np.ones(np.unique(ch[need_min]).size)]
        )
        if channels.size == 0:
            return
        if self.torch_net is None:
            self.torch_net = NetworkTorch(self.net)
        box = self.boxes[b]
        points = search_sign_change(self.torch_net, i, channels, signs, box.lo[0], box.hi[0], seed=b)
        self.witness(points, "attack")
        need_max, need_min = self.needs(b, i)  # what the random starts left open
        channels = np.concatenate([np.unique(ch[need_max]), np.unique(ch[need_min])])
        signs = np.concatenate(
            [np.ones(np.unique(ch[need_max]).size), -np.ones(np.unique(ch[need_min]).size)]
        )
        starts = self.data_starts(b, i, channels, signs) if channels.size else None
        if starts is not None:  # from the data points nearest to crossing, in small steps
            points = search_sign_change(
                self.torch_net,
                i,
                channels,
                signs,
                box.lo[0],
                box.hi[0],
                steps=_DATA_STEPS,
                init=starts,
                step=0.05,
            )
            self.witness(points, "attack")

    def data_starts(self, b: int, i: int, channels: np.ndarray, signs: np.ndarray) -> np.ndarray | None:
        """For each target channel, the ``_DATA_STARTS`` data points of box ``b`` whose most
        positive (``signs`` +1) / most negative (−1) position of the channel is nearest to zero."""
        if self.data is None or len(self.data) == 0:
            return None
        if b not in self.data_pres:
            box = self.boxes[b]
            inside = ((self.data >= box.lo[0]) & (self.data <= box.hi[0])).all(axis=1)
            x = self.data[inside]
            self.data_pres[b] = (x, self.net.preactivations(x) if len(x) else [])
        x, pres = self.data_pres[b]
        if len(x) == 0:
            return None
        positions = self.net.layers[i - 1].positions
        g = pres[i - 1].reshape(len(x), -1, positions)
        k = min(_DATA_STARTS, len(x))
        out = np.empty((len(channels), k, x.shape[1]))
        for t, (c, s) in enumerate(zip(channels, signs)):
            value = (s * g[:, c]).max(axis=1)
            out[t] = x[np.argsort(-value, kind="stable")[:k]]
        return out

    def needs(self, b: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Neurons of layer ``i`` still to be maximised / minimised in box ``b``."""
        layer, flags = self.net.layers[i - 1], self.flags[i - 1]
        free = self.boxes[b].state[i - 1] == UNDECIDED
        if not self.cfg.propagate:
            return np.flatnonzero(free), np.flatnonzero(free)
        ch = layer.channel_of
        return np.flatnonzero(free & ~flags.no_inactive[ch]), np.flatnonzero(free & ~flags.no_active[ch])

    # -- solving ---------------------------------------------------------------------------
    def solve(self, b: int, i: int, jobs: list[tuple[int, str]], relax: bool) -> list[Solution]:
        box = self.boxes[b]
        problem = layer_problem(self.net, i, box)
        keeps = [cone(self.net, i, np.array([n]), box) for n, _ in jobs]
        problems = [problem.problem(n, sense, relax=relax, keep=k) for (n, sense), k in zip(jobs, keeps)]
        options = {"report": False} if self.cfg.solver == "highs" else None
        t0 = time.perf_counter()
        out: list[Solution] = [None] * len(jobs)
        failed: list[int] = []
        if not relax and self.cfg.early_stop and self.cfg.solver == "highs":
            for sense in ("max", "min"):
                idx = [k for k, (_, s) in enumerate(jobs) if s == sense]
                sign = 1.0 if sense == "max" else -1.0
                opts = {
                    **(options or {}),
                    "interrupt_on_bound": -sign * self.cfg.margin,
                    "interrupt_on_objective": sign * self.cfg.margin,
                }
                sols, bad = self.run_solves([problems[k] for k in idx], self.cfg.time_limit, None, opts)
                for k, sol in zip(idx, sols):
                    out[k] = sol
                failed += [idx[k] for k in bad]
        else:  # a backend without a dual bound reports one when solved to a zero gap
            gap = None if self.cfg.solver == "highs" else 0.0
            limit = None if relax else self.cfg.time_limit
            # large LPs (a dense layer behind convolutions): interior point is several times faster
            big = [relax and options is not None and p.A.shape[1] > _IPM_COLUMNS for p in problems]
            for flag in (False, True):
                idx = [k for k, f in enumerate(big) if f == flag]
                opts = {**(options or {}), "solver": "ipm"} if flag else options
                sols, bad = self.run_solves([problems[k] for k in idx], limit, gap, opts) if idx else ([], [])
                for k, sol in zip(idx, sols):
                    out[k] = sol
                failed += [idx[k] for k in bad]
        c = self.counters[i - 1]
        if relax:
            c.lps, c.lp_time = c.lps + len(jobs), c.lp_time + time.perf_counter() - t0
        else:
            c.milps, c.milp_time = c.milps + len(jobs), c.milp_time + time.perf_counter() - t0
        for k in failed:
            n, sense = jobs[k]
            self.failed.append(
                {"layer": i, "neuron": int(n), "sense": sense, "lp": relax, "message": out[k].message}
            )
        points = [
            problem.input_point(s.x, kp, box.lo[0], box.hi[0]) for s, kp in zip(out, keeps) if s.x is not None
        ]
        self.absorb(b, i, jobs, out, relax, np.array(points).reshape(-1, self.net.features), set(failed))
        return out

    def run_solves(self, problems, time_limit, gap, options) -> tuple[list[Solution], list[int]]:
        return solve_tasks(
            problems, self.cfg.solver, time_limit, gap, options=options, executor=self.cfg.executor
        )

    def absorb(self, b: int, i: int, jobs, sols: Sequence[Solution], relax: bool, points, failed=()) -> None:
        """Turn solver answers into bounds, proofs and witnesses (``points``: their inputs)."""
        box, margin, stage = self.boxes[b], self.cfg.margin, "lp" if relax else "milp"
        if self.cfg.propagate:
            self.witness(points, stage)
        elif len(points):
            self.observe(points)  # refutes false bounds below, without counting as a witness stage
        for (n, sense), sol in zip(jobs, sols):
            usable = sol.verified and sol.status in (Status.OPTIMAL, Status.STOPPED, Status.TIME_LIMIT)
            if sol.bound is None or not usable or (relax and sol.status != Status.OPTIMAL):
                continue
            if self.contradicted(b, i, n, sense, sol):
                continue
            if sense == "max":
                box.hi[i][n] = min(box.hi[i][n], sol.bound + margin)
                if sol.bound <= -margin:
                    self.prove(b, i, np.array([n]), INACTIVE, stage)
            else:
                box.lo[i][n] = max(box.lo[i][n], sol.bound - margin)
                if sol.bound >= margin:
                    self.prove(b, i, np.array([n]), ACTIVE, stage)
        if relax:
            return
        ch = self.net.layers[i - 1].channel_of
        for k, ((n, sense), sol) in enumerate(zip(jobs, sols)):  # no proof and no witness: keep it
            if box.state[i - 1][n] != UNDECIDED:
                continue
            why = "milp" if sol.status in (Status.OPTIMAL, Status.STOPPED) else "timeout"
            why = "failed" if k in failed else why
            self.flags[i - 1].mark("pos" if sense == "max" else "neg", ch[[n]], why)

    def pick(
        self,
        b: int,
        i: int,
        neurons: np.ndarray,
        sense: str,
        quota: int,
        done: set,
        limit: int | None = None,
    ) -> list:
        """Jobs for up to ``quota`` positions per channel not yet in ``done``, nearest to crossing first.

        Solving a channel's likeliest positions first lets one witness close the whole channel
        before its other positions are solved.
        """
        box = self.boxes[b]
        free = box.state[i - 1] == UNDECIDED
        neurons = np.asarray([n for n in neurons if free[n] and int(n) not in done], dtype=np.int64)
        if neurons.size == 0:
            return []
        ch = self.net.layers[i - 1].channel_of[neurons]
        closeness = -box.hi[i][neurons] if sense == "max" else box.lo[i][neurons]
        order = np.lexsort((closeness, ch))
        neurons, ch = neurons[order], ch[order]
        rank = np.arange(ch.size) - np.searchsorted(ch, ch)
        chosen = neurons[rank < quota][:limit]
        done.update(int(n) for n in chosen)
        return [(int(n), sense) for n in chosen]

    def tighten(self, b: int, upto: int, targets: np.ndarray) -> None:
        """OBBT before big-M: LP bounds (the LP optimum is a dual bound), both directions, for the
        unstable neurons of layers ``< upto`` that ``targets`` of layer ``upto`` depend on; bounds only.

        Layers that read only the input are skipped (their interval bounds are exact); per layer at
        most ``_OBBT_UNITS`` neurons, those whose relaxation gap weighs most on the targets.
        """
        keep, base, stale = cone(self.net, upto, targets, self.boxes[b]), gid_base(self.net), False
        for k in range(1, upto):
            if stale:
                self.interval(b, k)
                self.linear(b, k)
            if set(self.net.layers[k - 1].pre.terms) == {0}:
                continue
            box = self.boxes[b]
            inside = keep[base[k] : base[k + 1]] & (box.lo[k] < 0) & (box.hi[k] > 0)
            units = self.influential(b, k, upto, targets, np.flatnonzero(inside))
            jobs = []
            for sense in ("max", "min"):
                done = self.lp_done.setdefault(("obbt", b, k, sense), set())
                jobs += self.pick(b, k, units, sense, units.size, done)
            if jobs:
                self.solve(b, k, jobs, relax=True)
                stale = True
        if stale:
            self.interval(b, upto)
            self.linear(b, upto)

    def influential(self, b: int, k: int, upto: int, targets: np.ndarray, units: np.ndarray) -> np.ndarray:
        """The ``_OBBT_UNITS`` of ``units`` (layer ``k``) with the largest relaxation gap times weight.

        The weight is the unit's direct coefficient in the targets' pre-activations where there is
        one, else 1 (a unit further back).
        """
        if units.size <= _OBBT_UNITS:
            return units
        box = self.boxes[b]
        lo, hi = box.lo[k][units], box.hi[k][units]
        gap = -lo * hi / (hi - lo)
        direct = self.net.layers[upto - 1].pre.terms.get(k)
        weight = np.abs(direct[targets][:, units]).sum(axis=0) if direct is not None else 1.0
        return np.sort(units[np.argsort(-gap * weight, kind="stable")[:_OBBT_UNITS]])

    def lp_stage(self, b: int, i: int) -> None:
        self.rounds(b, i, relax=True)

    def rounds(self, b: int, i: int, relax: bool) -> None:
        """Solve the open positions of layer ``i`` in rounds, doubling the positions per channel."""
        chunk = None if relax else max(8, 4 * self.cfg.workers)
        allowed = None if relax or self.cfg.milp_units is None else self.cfg.milp_units.get(i)
        quota = 1 if self.net.layers[i - 1].positions > 1 else 1 << 30
        senses = (("max", "min"),) if relax else (("max",), ("min",))
        for group in senses:
            while True:
                jobs = []
                for sense in group:
                    need = self.needs(b, i)[0 if sense == "max" else 1]
                    if allowed is not None:
                        need = need[np.isin(need, allowed)]
                    kind = "lp" if relax else "milp"
                    done = self.lp_done.setdefault((kind, b, i, sense), set())
                    jobs += self.pick(b, i, need, sense, quota, done, chunk)
                if not jobs:
                    break
                self.solve(b, i, jobs, relax=relax)
                quota *= 2

    def big_lps(self, b: int, i: int) -> bool:
        """Whether the LPs of layer ``i``'s open neurons are large (the optimised linear bounds,
        already run on them, come close to these LPs at a small part of their cost)."""
        if (b, i) not in self.slopes_done:
            return False
        open_ = np.union1d(*self.needs(b, i))
        return open_.size > 0 and int(cone(self.net, i, open_[:1], self.boxes[b]).sum()) > _IPM_COLUMNS

    def milp_stage(self, b: int, i: int) -> None:
        if "lp" in self.cfg.stages:  # tighter bounds before big-M, then the LPs again on them
            self.tighten(b, i, np.union1d(*self.needs(b, i)))
            big = any(n.size for n in self.needs(b, i)) and self.big_lps(b, i)
            if any(n.size for n in self.needs(b, i)):
                self.slopes_done.discard((b, i))
                self.optimised(b, i)  # the slopes again, on the tightened bounds
            if not (big and (b, i) in self.slopes_done):  # big LPs add little to those slopes
                for sense in ("max", "min"):
                    self.lp_done.pop(("lp", b, i, sense), None)
                self.rounds(b, i, relax=True)
        if any(n.size for n in self.needs(b, i)):
            self.rounds(b, i, relax=False)

    def finish_layer(self, i: int) -> None:
        """Units still open after the last stage are kept as unstable (stage ``skipped``)."""
        flags, ch = self.flags[i - 1], self.net.layers[i - 1].channel_of
        for b in range(len(self.boxes)):
            free = ch[self.boxes[b].state[i - 1] == UNDECIDED]
            flags.mark("pos", free, "skipped")
            flags.mark("neg", free, "skipped")


def _unit_results(run: _Run, i: int) -> tuple[np.ndarray, list[str]]:
    layer, flags = run.net.layers[i - 1], run.flags[i - 1]
    units = layer.channels
    state = np.zeros(units, dtype=np.int8)
    stage: list[str] = []
    for c in range(units):
        sl = slice(c * layer.positions, (c + 1) * layer.positions)
        states = np.concatenate([box.state[i - 1][sl] for box in run.boxes])
        proofs = np.concatenate([st[i - 1][sl] for st in run.stages])
        if (states == INACTIVE).all() or (states == ACTIVE).all():
            state[c] = INACTIVE if (states == INACTIVE).all() else ACTIVE
            stage.append(max(proofs, key=lambda s: _RANK[s]))
        else:
            pos, neg = flags.stage_pos[c] or "skipped", flags.stage_neg[c] or "skipped"
            stage.append(max(pos, neg, key=lambda s: _RANK[s]))
    return state, stage


def _constants(layer: ReluLayer, state: np.ndarray) -> np.ndarray:
    zero = np.ones(layer.size, dtype=bool)
    for m in layer.pre.terms.values():
        zero &= ~np.any(m != 0, axis=1)
    out = np.full(layer.channels, np.nan)
    for c in np.flatnonzero(state == ACTIVE):
        sl = slice(c * layer.positions, (c + 1) * layer.positions)
        values = layer.pre.const[sl]
        if zero[sl].all() and np.ptp(values) == 0:
            out[c] = float(values[0])
    return out


def _first_linear_inputs(model: nn.Module) -> int | None:
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))), None)
    return first.in_features if isinstance(first, nn.Linear) else None


def _input_shape(model: nn.Module, domain, data, input_shape) -> tuple[int, ...]:
    shape = _guess_shape(model, domain, data, input_shape)
    expected = _first_linear_inputs(model)
    if expected is not None and int(np.prod(shape)) != expected:
        raise DomainError(
            f"the domain or data has {int(np.prod(shape))} features, but the model takes {expected}"
        )
    return shape


def _guess_shape(model: nn.Module, domain, data, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if data is not None:
        return tuple(int(s) for s in np.shape(data)[1:])
    if isinstance(domain, Domain) and domain.shape is not None:
        return domain.shape
    if isinstance(domain, Sequence) and len(domain) == 2:
        for v in domain:
            if np.ndim(v) >= 1:
                return tuple(int(s) for s in np.shape(v))
    if _first_linear_inputs(model) is not None:
        return (_first_linear_inputs(model),)
    raise DomainError("cannot tell the model's input shape from the domain; pass input_shape")


def _data_points(data, domain: Domain, features: int) -> np.ndarray:
    if data is None:
        return np.zeros((0, features))
    arr = data.detach().double().numpy() if isinstance(data, torch.Tensor) else np.asarray(data, np.float64)
    arr = arr.reshape(len(arr), -1)
    if arr.shape[1] != features:
        raise DataShapeError(f"data has {arr.shape[1]} features per sample, the model takes {features}")
    return arr[domain.contains(arr)]  # only points of the domain are witnesses


@in_eval_mode("model")
def find_stable_units(
    model: nn.Module,
    domain=None,
    solver="highs",
    *,
    data=None,
    input_shape: Sequence[int] | None = None,
    samples: int = 1000,
    stages: Sequence[str] = STAGES,
    early_stop: bool = True,
    propagate: bool = True,
    margin: float = 1e-6,
    time_limit: float | None = 60.0,
    workers: int | None = None,
    milp_units: Mapping[int, Sequence[int]] | None = None,
    seed: int = 0,
    executor: str | Executor | None = None,
    progress: bool = True,
) -> StabilityReport:
    """Find the ReLUs of ``model`` that never change sign on ``domain`` (LEO, Serra et al. 2020).

    Stages run cheapest first, each deciding what it can: ``data`` (a unit seen with both signs on
    the data is unstable), ``samples`` (same with random points of the domain), ``interval``
    (interval arithmetic), ``linear`` (symbolic linear bounds by back-substitution, every position
    of a layer in one pass), ``attack`` (projected-gradient search for a sign change of each open
    channel from the box centre and random points, then from the data points nearest to crossing;
    its points are re-run through the network), ``lp`` (LP relaxation of the big-M formulation per
    position and direction; skipped where the LPs are large and the optimised slopes already ran on
    the open neurons, which come close to them), ``milp`` (after LP bound tightening of the earlier
    unstable neurons the open ones depend on, the 512 that weigh most, and the slopes again on
    those bounds: a per-position big-M MILP with ``M`` from the tightest bounds, stopped as soon as
    the dual bound proves the sign or a feasible point shows a crossing).
    Every LP/MILP is restricted to the neurons its target depends on (a conv position's receptive
    field), and a channel's positions are solved nearest-to-crossing first, in rounds, so one
    witness stops the channel. Layers are analysed in order; bounds of one layer tighten the
    relaxations and ``M`` of later ones.

    Parameters
    ----------
    model : nn.Module
        Linear, Conv1d/2d, BatchNorm (eval statistics), ReLU, flatten, identity/dropout and residual
        adds. Never modified.
    domain : Domain or (lo, hi), optional
        :class:`~cetopt.leo.Domain` (``box``, ``from_data``, ``ball``) or a ``(lo, hi)`` pair of
        scalars or per-feature arrays. Default: the data's per-feature box.
    solver : str or Solver
        Any registered backend; with ``"highs"`` the MILPs stop early through a callback.
    data : Tensor or array, optional
        Inputs for the data pass (only the points inside the domain are used).
    input_shape : sequence of int, optional
        Shape of one input, when neither the data nor the domain shows it.
    samples : int
        Random domain points for the ``samples`` stage.
    stages : sequence of str
        Which of :data:`~cetopt.leo.report.STAGES` to run. ``("milp",)`` with ``early_stop=False``
        and ``propagate=False`` is the naive baseline: two full MILPs per unit.
    early_stop : bool
        Stop each MILP once its sign is decided.
    propagate : bool
        Use solver points as witnesses for all units, and skip solves already made pointless.
    margin : float
        Soundness margin of dual bounds (see the module docstring).
    time_limit : float, optional
        Seconds per MILP; a unit whose MILP runs out of time is kept as unstable (``timeout``).
    workers : int, optional
        Threads for the independent solves of a layer (default: all cores).
    milp_units : mapping, optional
        ``{layer number (1-based): neuron indices}`` to restrict the MILP stage to (the rest are
        kept as unstable, stage ``skipped``); for measuring a slow baseline on a subset.
    seed : int
        Seed of the random samples.
    executor : {"thread", "ray"} or Executor, optional
        Where the independent LPs/MILPs of a round run: the local thread pool (default, ``workers``
        threads) or a Ray cluster (:class:`~cetopt.solving.executors.RayExecutor`; ``"ray"`` starts
        or joins one with ``ray.init()``). Same decisions either way. A solve task that fails
        (raises, its worker dies, or status ``error``) is retried once; if it fails again its unit
        is kept (stage ``failed``) and listed in ``report.extra["failed_tasks"]``.
    progress : bool
        Show a progress bar on stderr (per layer, with the stage running and its undecided units).

    Returns
    -------
    StabilityReport

    Raises
    ------
    DomainError
        lo > hi, NaN bounds, a domain of the wrong dimension, or no domain and no data.
    UnsupportedLayerError
        A layer outside the supported set (named in the message).
    """
    t0 = time.perf_counter()
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        raise ValueError(f"unknown stages {bad}; choose from {STAGES}")
    shape = _input_shape(model, domain, data, input_shape)
    features = int(np.prod(shape))
    if domain is None:
        if data is None:
            raise DomainError("give a domain, or data to derive the box from")
        domain = Domain.from_data(data)
    domain = as_domain(domain, features)
    try:
        net = extract(model, shape)
    except UntraceableModelError:
        raise
    except RuntimeError as exc:  # a convolution that cannot read inputs of this shape
        raise DomainError(f"inputs of shape {shape} do not fit the model: {exc}") from None
    run = _new_run(
        net, domain, solver, stages, early_stop, propagate, margin, time_limit, workers, milp_units
    )
    run.cfg.executor = get_executor(executor, run.cfg.workers)
    run.data = _data_points(data, domain, features)
    if "data" in stages:
        run.witness(run.data, "data")
    if "samples" in stages and samples > 0:
        run.witness(domain.sample(samples, seed), "samples")
    with progress_bar(len(net.layers), "leo: layers", progress) as bar:
        for i in range(1, len(net.layers) + 1):
            t_layer = time.perf_counter()
            _analyse_layer(run, i, bar)
            run.counters[i - 1].time = time.perf_counter() - t_layer
            bar.update()
    if run.rejected:
        warnings.warn(
            f"{len(run.rejected)} solver bound(s) contradicted by the network's own values were ignored "
            f"(their units stay undecided); first: {run.rejected[0]}",
            RuntimeWarning,
            stacklevel=3,  # past the in_eval_mode wrapper, to the caller
        )
    if run.failed:
        warnings.warn(
            f"{len(run.failed)} solve task(s) failed twice; their units are kept. First: {run.failed[0]}",
            RuntimeWarning,
            stacklevel=3,
        )
    report = _report(run, shape, domain, margin, time.perf_counter() - t0)
    report.extra["executor"] = run.cfg.executor.name
    report.extra["failed_tasks"] = run.failed
    report.fingerprint = weights_fingerprint(model)
    return report


def _new_run(net, domain, solver, stages, early_stop, propagate, margin, time_limit, workers, milp_units):
    cfg = _Config(
        solver=solver,
        stages=tuple(stages),
        early_stop=early_stop,
        propagate=propagate,
        margin=float(margin),
        time_limit=time_limit,
        workers=default_workers() if workers is None else max(1, int(workers)),
        milp_units=None if milp_units is None else {int(k): np.asarray(v) for k, v in milp_units.items()},
    )
    boxes, stage_arrays = [], []
    for b in range(domain.boxes):
        lo = [domain.lo[b].copy()] + [np.full(layer.size, -np.inf) for layer in net.layers]
        hi = [domain.hi[b].copy()] + [np.full(layer.size, np.inf) for layer in net.layers]
        state = [np.full(layer.size, UNDECIDED, dtype=np.int8) for layer in net.layers]
        boxes.append(BoxState(lo, hi, state))
        stage_arrays.append([np.full(layer.size, "", dtype=object) for layer in net.layers])
    run = _Run(
        net,
        domain,
        cfg,
        boxes,
        [_Flags.new(layer.channels) for layer in net.layers],
        stage_arrays,
        [_Counters() for _ in net.layers],
    )
    run.seen = [
        [(np.full(layer.size, -np.inf), np.full(layer.size, np.inf)) for layer in net.layers] for _ in boxes
    ]
    run.observe(_check_points(domain))
    return run


def _check_points(domain: Domain, per_box: int = 32) -> np.ndarray:
    """Each box's centre and a few seeded random points: the network's values there refute false bounds."""
    rng = np.random.default_rng(12345)
    u = rng.random((domain.boxes, per_box, domain.features))
    random = domain.lo[:, None] + u * (domain.hi - domain.lo)[:, None]
    centres = (domain.lo + domain.hi)[:, None] / 2
    return np.concatenate([centres, random], axis=1).reshape(-1, domain.features)


def _stage(bar, run: _Run, b: int, i: int, stage: str) -> None:
    undecided = sum(n.size for n in run.needs(b, i))
    box = f" box {b + 1}/{len(run.boxes)}" if len(run.boxes) > 1 else ""
    bar.set_description(f"leo: layer {i}/{len(run.net.layers)}{box}: {stage} ({undecided} undecided)")


def _analyse_layer(run: _Run, i: int, bar) -> None:
    for b in range(len(run.boxes)):
        run.interval(b, i)
        if i < len(run.net.layers) or any(n.size for n in run.needs(b, i)):
            run.linear(b, i)  # later layers' relaxations need these bounds too
        if any(n.size for n in run.needs(b, i)):
            run.attack(b, i)
        if any(n.size for n in run.needs(b, i)):
            run.optimised(b, i)
        milp_next = "milp" in run.cfg.stages and "lp" in run.cfg.stages
        open_ = any(n.size for n in run.needs(b, i))
        if "lp" in run.cfg.stages and open_ and not (milp_next and run.big_lps(b, i)):
            _stage(bar, run, b, i, "lp")  # (with big LPs and a MILP stage next: once, after OBBT)
            run.lp_stage(b, i)
        if "milp" in run.cfg.stages and any(n.size for n in run.needs(b, i)):
            _stage(bar, run, b, i, "milp")
            run.milp_stage(b, i)
    run.finish_layer(i)


def _report(run: _Run, shape, domain: Domain, margin: float, seconds: float) -> StabilityReport:
    layers = []
    for i, layer in enumerate(run.net.layers, start=1):
        state, stage = _unit_results(run, i)
        c = run.counters[i - 1]
        layers.append(
            LayerReport(
                name=layer.producer or layer.node,
                node=layer.node,
                producer=layer.producer,
                batchnorm=layer.batchnorm,
                kind="linear" if len(layer.shape) == 1 else "conv",
                units=layer.channels,
                positions=layer.positions,
                state=state,
                stage=stage,
                constant=_constants(layer, state),
                milps=c.milps,
                lps=c.lps,
                milp_time=c.milp_time,
                lp_time=c.lp_time,
                time=c.time,
            )
        )
    report = StabilityReport(layers, tuple(shape), domain.to_dict(), margin, seconds)
    report.network = run.net
    return report
