"""Linear bounds are sound (never inside the true range) and at least as tight as intervals."""

import numpy as np
import pytest
import torch
from torch import nn

import cetopt
from cetopt.leo.exhaustive import exhaustive_ranges, exhaustive_states
from cetopt.leo.formulation import UNDECIDED, BoxState, interval_bounds
from cetopt.leo.linear_bounds import linear_bounds, optimise_slopes
from cetopt.leo.network import extract
from tests.leo.nets import TinyConv, seeded, tiny_mlp


class TinyConv2d(nn.Module):
    """1×2×2 input, a padded 2×2 Conv2d with 2 channels (2×3×3), a strided one (2×1×1), a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 2, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 2, stride=2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


NETS = [
    (lambda: tiny_mlp(0), (2,)),
    (lambda: tiny_mlp(1, widths=(6, 6, 6, 6)), (2,)),
    (lambda: seeded(TinyConv, 6, scale=0.5), (1, 4)),
    (lambda: seeded(TinyConv2d, 2, scale=0.3), (1, 2, 2)),
]


def _box(net, lo, hi):
    """Intervals for every layer in turn (the state the linear bounds start from)."""
    d = net.features
    box = BoxState(
        [np.full(d, lo)] + [np.full(layer.size, -np.inf) for layer in net.layers],
        [np.full(d, hi)] + [np.full(layer.size, np.inf) for layer in net.layers],
        [np.full(layer.size, UNDECIDED, dtype=np.int8) for layer in net.layers],
    )
    intervals = []
    for i in range(1, len(net.layers) + 1):
        box.lo[i], box.hi[i] = interval_bounds(net, i, box)
        intervals.append((box.lo[i].copy(), box.hi[i].copy()))
    return box, intervals


@pytest.mark.parametrize("case", range(len(NETS)))
def test_linear_bounds_sound_and_tighter_than_intervals(case):
    build, shape = NETS[case]
    net = extract(build(), shape)
    box, intervals = _box(net, -1.0, 1.0)
    true_lo, true_hi = exhaustive_ranges(net, box.lo[0], box.hi[0])
    pts = np.random.default_rng(0).uniform(-1, 1, (20_000, net.features))
    sampled = net.preactivations(pts)
    gained = 0.0
    for i in range(1, len(net.layers) + 1):
        lo, hi = linear_bounds(net, i, box)
        slopes = optimise_slopes(net, i, box, np.arange(net.layers[i - 1].size))
        olo, ohi = linear_bounds(net, i, box, slopes=slopes) if slopes else (lo, hi)
        for a, b in ((lo, hi), (olo, ohi)):
            assert (a <= true_lo[i - 1] + 1e-9).all() and (b >= true_hi[i - 1] - 1e-9).all()
            assert (a <= sampled[i - 1].min(0)).all() and (b >= sampled[i - 1].max(0)).all()
        # the detector keeps the tighter of the two per neuron, as here
        ilo, ihi = intervals[i - 1]
        blo, bhi = np.maximum(ilo, np.maximum(lo, olo)), np.minimum(ihi, np.minimum(hi, ohi))
        assert (olo >= lo - 1e-9).all() and (ohi <= hi + 1e-9).all()  # optimised slopes only help
        gained += float((ihi - ilo).sum() - (bhi - blo).sum())
        box.lo[i], box.hi[i] = blo, bhi
    assert gained > 0 or len(net.layers) == 1


def test_rounding_margin_is_explicit():
    net = extract(tiny_mlp(0), (2,))
    box, _ = _box(net, -1.0, 1.0)
    _, hi = linear_bounds(net, 1, box)
    # the first layer is affine in the input: its exact range, widened by a tiny positive margin
    w, c = net.layers[0].pre.terms[0], net.layers[0].pre.const
    exact_hi = c + np.abs(w).sum(1)
    assert (hi > exact_hi).all() and (hi - exact_hi < 1e-12).all()


@pytest.mark.parametrize("seed", [2, 11])
def test_conv_stability_equals_exhaustive(seed):
    model = seeded(TinyConv2d, seed, scale=0.3)
    net = extract(model, (1, 2, 2))
    truth = exhaustive_states(net, -np.ones(4), np.ones(4))
    flat = np.concatenate(truth)
    assert (flat == 0).any() and (flat != 0).any()  # not vacuous: stable and unstable channels
    report = cetopt.find_stable_units(model, (-1.0, 1.0), input_shape=(1, 2, 2), workers=1)
    assert all(np.array_equal(layer.state, t) for layer, t in zip(report.layers, truth))
    no_witness = cetopt.find_stable_units(
        model, (-1.0, 1.0), input_shape=(1, 2, 2), workers=1, stages=("interval", "linear", "lp", "milp")
    )
    assert all(np.array_equal(layer.state, t) for layer, t in zip(no_witness.layers, truth))
