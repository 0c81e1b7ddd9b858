import pytest
import torch

from cetopt.errors import NonFiniteError
from cetopt.quant import fake_quantize, quantize_weight
from cetopt.quant.quantizer import _check_bits, codes_for


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16, 24, 32])
def test_codes_fit_their_bits_and_dequantize_to_scale_multiples(bits):
    torch.manual_seed(bits)
    w = torch.randn(7, 5, 3)
    qw = quantize_weight(w, bits)
    assert -(2 ** (bits - 1)) <= int(qw.q.min()) and int(qw.q.max()) <= 2 ** (bits - 1) - 1
    assert qw.q.shape == w.shape
    assert not qw.q.is_floating_point()
    exact = qw.q.double() * qw.scale.double().view(-1, 1, 1)  # scale multiples, up to float32 rounding
    torch.testing.assert_close(qw.dequantize().double(), exact, rtol=1e-7, atol=0)
    assert qw.bits.tolist() == [bits] * 7


def test_error_shrinks_with_bits_and_high_bits_are_near_identity():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    errors = [((fake_quantize(w, b) - w) ** 2).sum().item() for b in (2, 3, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True)
    assert (fake_quantize(w, 32) - w).abs().max() < 1e-7


def test_clip_search_never_does_worse_and_pays_off_on_heavy_tails():
    torch.manual_seed(1)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 256)) * torch.rand(16, 1)
    for bits in (2, 3, 4, 6):
        searched = ((fake_quantize(w, bits) - w) ** 2).sum(dim=1)
        plain = ((fake_quantize(w, bits, clip_search=False) - w) ** 2).sum(dim=1)
        assert torch.all(searched <= plain * (1 + 1e-6))
        if bits <= 3:  # at low bit widths the MSE-optimal clip is well inside max|W|
            assert searched.sum() < 0.6 * plain.sum()


def _restricted_grid_error(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row error of the best positive step on the restricted grid ±(2^(b−1) − 1), same ratios."""
    qmax = 2 ** (bits - 1) - 1
    wmax = w.abs().amax(dim=1, keepdim=True)
    best = torch.full((w.shape[0],), float("inf"))
    for ratio in torch.linspace(0.3, 1.0, 64):
        s = ratio * wmax / qmax
        best = torch.minimum(best, ((torch.clamp(torch.round(w / s), -qmax, qmax) * s - w) ** 2).sum(1))
    return best


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_full_twos_complement_grid_never_does_worse_than_the_restricted_one(bits):
    torch.manual_seed(3)
    w = torch.randn(64, 48) * torch.rand(64, 1)
    full = ((fake_quantize(w, bits) - w) ** 2).sum(dim=1)
    restricted = _restricted_grid_error(w, bits)
    assert torch.all(full <= restricted * (1 + 1e-5))
    assert full.sum() < (0.85 if bits <= 3 else 0.95) * restricted.sum()


def test_a_negative_step_gives_the_extra_level_to_the_heavier_positive_tail():
    w = torch.tensor([[2.0, 1.0, 0.0, -1.0], [-2.0, -1.0, 0.0, 1.0]])
    qw = quantize_weight(w, 2)  # 2 bits: codes -2..1, so only a mirrored grid holds +2 exactly
    assert qw.scale[0] < 0 < qw.scale[1]
    torch.testing.assert_close(qw.dequantize(), w)
    assert qw.q.min() >= -2 and qw.q.max() <= 1


def test_per_channel_bits_and_zero_channel():
    w = torch.randn(3, 10)
    w[1] = 0.0
    qw = quantize_weight(w, [2, 8, 16])
    assert qw.q.dtype == torch.int16 and int(qw.q[0].abs().max()) <= 2 and int(qw.q[2].abs().max()) <= 32768
    assert torch.equal(qw.dequantize()[1], torch.zeros(10))


@pytest.mark.parametrize("bits", [1, 33, 2.5, [2, 3]])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.randn(3, 4), bits)


def test_nan_weight():
    w = torch.randn(3, 4)
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        quantize_weight(w, 4)


def _scales_by_trying_every_candidate(weight: torch.Tensor, bits, grid: int = 64, min_ratio: float = 0.3):
    """The clip search as first written: every (ratio, sign) candidate tried on the whole tensor."""

    bits = _check_bits(bits, weight.shape[0])
    w = weight.reshape(weight.shape[0], -1).float()
    qmax = (2.0 ** (bits.double() - 1) - 1).float()[:, None]
    wmax = w.abs().amax(dim=1, keepdim=True)
    scale, best = wmax / qmax, torch.full_like(wmax, float("inf"))
    for ratio in torch.linspace(min_ratio, 1.0, grid):
        for sign in (1.0, -1.0):
            s = sign * (ratio * wmax / qmax).clamp_min(torch.finfo(torch.float32).tiny)
            err = ((codes_for(w, s, qmax) * s - w) ** 2).sum(dim=1, keepdim=True)
            better = (err < best) & (bits <= 8)[:, None]
            best, scale = torch.where(better, err, best), torch.where(better, s, scale)
    return torch.where(wmax > 0, scale, torch.ones_like(scale)).reshape(-1)


def test_the_sorted_clip_search_picks_the_same_scales_and_codes_as_trying_every_candidate():
    torch.manual_seed(0)
    weights = [
        torch.distributions.StudentT(3.0).sample((40, 33)),
        torch.randn(16, 3, 3, 3) * torch.rand(16, 1, 1, 1),
        torch.randn(8, 1),
        torch.zeros(4, 6),
    ]
    for w in weights:
        for bits in (2, 3, 5, 8, [2, 4, 6, 16] * (w.shape[0] // 4)):
            qw = quantize_weight(w, bits)
            reference = _scales_by_trying_every_candidate(w, bits)
            assert torch.equal(qw.scale, reference)
            qmax = (2.0 ** (qw.bits.double() - 1) - 1).float()[:, None]
            codes = codes_for(w.reshape(len(w), -1).float(), reference[:, None], qmax)
            assert torch.equal(qw.q.reshape(len(w), -1).float(), codes)
