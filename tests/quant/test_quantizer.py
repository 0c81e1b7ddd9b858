import pytest
import torch

from cetopt.errors import NonFiniteError
from cetopt.quant import fake_quantize, quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16, 24, 32])
def test_codes_fit_their_bits_and_dequantize_to_scale_multiples(bits):
    torch.manual_seed(bits)
    w = torch.randn(7, 5, 3)
    qw = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert int(qw.q.abs().max()) <= qmax and qw.q.shape == w.shape
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


def test_per_channel_bits_and_zero_channel():
    w = torch.randn(3, 10)
    w[1] = 0.0
    qw = quantize_weight(w, [2, 8, 16])
    assert qw.q.dtype == torch.int16 and int(qw.q[0].abs().max()) <= 1 and int(qw.q[2].abs().max()) <= 32767
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
