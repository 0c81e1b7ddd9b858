"""``find_stable_units``: progressive screening (data, samples, intervals, LP, MILP) of every ReLU.

Soundness. A unit is called stable only on a proof: interval arithmetic (exact float64), or a
solver's *dual bound* (LP optimum or MIP dual bound, never an incumbent) that clears zero by
``margin``: ``max g ≤ −margin`` proves "stably inactive", ``min g ≥ margin`` proves "stably
active". Instability needs a witness: a point of the domain at which the network itself (run
in float64) gives the unit both signs; solver incumbents only count after that re-check. Every
inconclusive case (time limit, a bound between −margin and margin) keeps the unit as unstable,
which is always safe for the compression that follows. The margin (default ``1e-6``) covers HiGHS's
feasibility and optimality tolerances (1e-7 by default) on the small, well-scaled problems here;
matrix entries of magnitude ≤ 1e-9, which HiGHS would drop silently, are dropped explicitly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cetopt.analysis._common import progress_bar
from cetopt.errors import DataShapeError, DomainError, UntraceableModelError
from cetopt.leo.domain import Domain, as_domain
from cetopt.leo.formulation import ACTIVE, INACTIVE, UNDECIDED, BoxState, interval_bounds, layer_problem
from cetopt.leo.network import ReluLayer, ReluNetwork, extract
from cetopt.leo.report import _ALL_STAGES, STAGES, LayerReport, StabilityReport
from cetopt.problem import Solution, Status
from cetopt.solving.api import default_workers, solve_many

__all__ = ["find_stable_units"]

_RANK = {s: i for i, s in enumerate(_ALL_STAGES)}


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

    # -- witnesses -------------------------------------------------------------------------
    def witness(self, x: np.ndarray, stage: str) -> None:
        """Mark units seen positive / negative at the domain points ``x``."""
        if len(x) == 0:
            return
        for layer, flags, g in zip(self.net.layers, self.flags, self.net.preactivations(x)):
            ch = layer.channel_of
            flags.mark("pos", np.unique(ch[(g > 0).any(axis=0)]), stage)
            flags.mark("neg", np.unique(ch[(g < 0).any(axis=0)]), stage)

    # -- proofs ----------------------------------------------------------------------------
    def prove(self, b: int, i: int, neurons: np.ndarray, state: int, stage: str) -> None:
        box, layer = self.boxes[b], self.net.layers[i - 1]
        neurons = neurons[box.state[i - 1][neurons] == UNDECIDED]
        box.state[i - 1][neurons] = state
        self.stages[b][i - 1][neurons] = stage
        # a proven neuron rules out the opposite state for its whole unit (conservative for g ≡ 0)
        self.flags[i - 1].mark("neg" if state == INACTIVE else "pos", layer.channel_of[neurons], stage)

    def interval(self, b: int, i: int) -> None:
        box = self.boxes[b]
        lo, hi = interval_bounds(self.net, i, box)
        box.lo[i], box.hi[i] = np.maximum(box.lo[i], lo), np.minimum(box.hi[i], hi)
        if "interval" in self.cfg.stages:
            self.prove(b, i, np.flatnonzero(box.hi[i] <= 0), INACTIVE, "interval")
            self.prove(b, i, np.flatnonzero(box.lo[i] >= 0), ACTIVE, "interval")

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
        problem = layer_problem(self.net, i, self.boxes[b])
        problems = [problem.problem(n, sense, relax=relax) for n, sense in jobs]
        options = None
        if self.cfg.solver == "highs":
            options = {"report": False}
        t0 = time.perf_counter()
        if not relax and self.cfg.early_stop and self.cfg.solver == "highs":
            out = [None] * len(jobs)
            for sense in ("max", "min"):
                idx = [k for k, (_, s) in enumerate(jobs) if s == sense]
                sign = 1.0 if sense == "max" else -1.0
                opts = {
                    **(options or {}),
                    "interrupt_on_bound": -sign * self.cfg.margin,
                    "interrupt_on_objective": sign * self.cfg.margin,
                }
                sols = solve_many(
                    [problems[k] for k in idx],
                    self.cfg.solver,
                    self.cfg.time_limit,
                    options=opts,
                    workers=self.cfg.workers,
                )
                for k, sol in zip(idx, sols):
                    out[k] = sol
        else:  # a backend without a dual bound reports one when solved to a zero gap
            out = solve_many(
                problems,
                self.cfg.solver,
                None if relax else self.cfg.time_limit,
                None if self.cfg.solver == "highs" else 0.0,
                options=options,
                workers=self.cfg.workers,
            )
        c = self.counters[i - 1]
        if relax:
            c.lps, c.lp_time = c.lps + len(jobs), c.lp_time + time.perf_counter() - t0
        else:
            c.milps, c.milp_time = c.milps + len(jobs), c.milp_time + time.perf_counter() - t0
        self.absorb(b, i, jobs, out, relax)
        return out

    def absorb(self, b: int, i: int, jobs, sols: Sequence[Solution], relax: bool) -> None:
        """Turn solver answers into bounds, proofs and witnesses."""
        box, margin, stage = self.boxes[b], self.cfg.margin, "lp" if relax else "milp"
        points = []
        for (n, sense), sol in zip(jobs, sols):
            if sol.x is not None:
                points.append(np.clip(sol.x[: self.net.features], box.lo[0], box.hi[0]))
            usable = sol.status in (Status.OPTIMAL, Status.STOPPED, Status.TIME_LIMIT)
            if sol.bound is None or not usable or (relax and sol.status != Status.OPTIMAL):
                continue
            if sense == "max":
                box.hi[i][n] = min(box.hi[i][n], sol.bound + margin)
                if sol.bound <= -margin:
                    self.prove(b, i, np.array([n]), INACTIVE, stage)
            else:
                box.lo[i][n] = max(box.lo[i][n], sol.bound - margin)
                if sol.bound >= margin:
                    self.prove(b, i, np.array([n]), ACTIVE, stage)
        if self.cfg.propagate:
            self.witness(np.array(points).reshape(-1, self.net.features), stage)
        if relax:
            return
        ch = self.net.layers[i - 1].channel_of
        for (n, sense), sol in zip(jobs, sols):  # MILP answered, no proof and no witness: keep it
            if box.state[i - 1][n] != UNDECIDED:
                continue
            why = "milp" if sol.status in (Status.OPTIMAL, Status.STOPPED) else "timeout"
            self.flags[i - 1].mark("pos" if sense == "max" else "neg", ch[[n]], why)

    def lp_jobs(self, b: int, i: int, neurons: np.ndarray, sense: str) -> list[tuple[int, str]]:
        """LP jobs for ``neurons`` of layer ``i`` in one direction, leaving out those already solved."""
        done = self.lp_done.setdefault((b, i, sense), set())
        free = self.boxes[b].state[i - 1] == UNDECIDED
        jobs = [(int(n), sense) for n in neurons if free[n] and int(n) not in done]
        done.update(n for n, _ in jobs)
        return jobs

    def tighten(self, b: int, upto: int) -> None:
        """LP bounds, both directions, for the free neurons of layers ``< upto`` (bounds only).

        Run only when a later layer needs its LP stage, so that its big-M comes from LP bounds.
        """
        for k in range(1, upto):
            self.interval(b, k)
            every = np.arange(self.net.layers[k - 1].size)
            jobs = self.lp_jobs(b, k, every, "max") + self.lp_jobs(b, k, every, "min")
            if jobs:
                self.solve(b, k, jobs, relax=True)

    def lp_stage(self, b: int, i: int) -> None:
        self.tighten(b, i)
        self.interval(b, i)
        need_max, need_min = self.needs(b, i)
        jobs = self.lp_jobs(b, i, need_max, "max") + self.lp_jobs(b, i, need_min, "min")
        if jobs:
            self.solve(b, i, jobs, relax=True)

    def milp_stage(self, b: int, i: int) -> None:
        chunk = max(8, 4 * self.cfg.workers)
        allowed = None if self.cfg.milp_units is None else self.cfg.milp_units.get(i)
        for sense in ("max", "min"):
            while True:
                need = self.needs(b, i)[0 if sense == "max" else 1]
                if allowed is not None:
                    need = need[np.isin(need, allowed)]
                done = self._done_milp(b, i, sense)
                need = need[~np.isin(need, np.fromiter(done, dtype=np.int64, count=len(done)))]
                if need.size == 0:
                    break
                batch = need[:chunk]
                done.update(batch.tolist())
                self.solve(b, i, [(int(n), sense) for n in batch], relax=False)

    def _done_milp(self, b: int, i: int, sense: str) -> set:
        key = (b, i, sense)
        if not hasattr(self, "_milp_done"):
            self._milp_done = {}
        return self._milp_done.setdefault(key, set())

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
    progress: bool = True,
) -> StabilityReport:
    """Find the ReLUs of ``model`` that never change sign on ``domain`` (LEO, Serra et al. 2020).

    Stages run cheapest first, each deciding what it can: ``data`` (a unit seen with both signs on
    the data is unstable), ``samples`` (same with random points of the domain), ``interval``
    (interval arithmetic), ``lp`` (LP relaxation of the big-M formulation, per unit, max and min),
    ``milp`` (per-unit big-M MILP with ``M`` from the tightest bounds of earlier layers, stopped as
    soon as the dual bound proves the sign or a feasible point shows the unit can cross zero).
    Layers are analysed in order, and bounds of one layer tighten the ``M`` of later ones.

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
    if "data" in stages:
        run.witness(_data_points(data, domain, features), "data")
    if "samples" in stages and samples > 0:
        run.witness(domain.sample(samples, seed), "samples")
    with progress_bar(len(net.layers), "leo: layers", progress) as bar:
        for i in range(1, len(net.layers) + 1):
            t_layer = time.perf_counter()
            _analyse_layer(run, i, bar)
            run.counters[i - 1].time = time.perf_counter() - t_layer
            bar.update()
    return _report(run, shape, domain, margin, time.perf_counter() - t0)


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
    return _Run(
        net,
        domain,
        cfg,
        boxes,
        [_Flags.new(layer.channels) for layer in net.layers],
        stage_arrays,
        [_Counters() for _ in net.layers],
    )


def _stage(bar, run: _Run, b: int, i: int, stage: str) -> None:
    undecided = sum(n.size for n in run.needs(b, i))
    box = f" box {b + 1}/{len(run.boxes)}" if len(run.boxes) > 1 else ""
    bar.set_description(f"leo: layer {i}/{len(run.net.layers)}{box}: {stage} ({undecided} undecided)")


def _analyse_layer(run: _Run, i: int, bar) -> None:
    for b in range(len(run.boxes)):
        run.interval(b, i)
        if "lp" in run.cfg.stages and any(n.size for n in run.needs(b, i)):
            _stage(bar, run, b, i, "lp")
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
