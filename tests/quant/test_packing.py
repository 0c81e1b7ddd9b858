import numpy as np
import pytest
import torch

from cetopt.quant import quantize_weight
from cetopt.quant.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 11, 16, 32])
def test_round_trip_and_exact_size(bits):
    torch.manual_seed(bits)
    qw = quantize_weight(torch.randn(5, 13, 3), bits)
    packed = pack_codes(qw.q, qw.bits.numpy())
    assert packed.dtype == np.uint8 and packed.nbytes == -(-5 * 39 * bits // 8)
    assert torch.equal(unpack_codes(packed, qw.bits.numpy(), tuple(qw.q.shape), qw.q.dtype), qw.q)


def test_mixed_channel_widths_are_packed_back_to_back():
    bits = np.array([2, 8, 3, 32])
    codes = torch.tensor(
        [[-1, 1, 0], [-127, 127, 5], [-3, 3, 2], [2**31 - 1, -(2**31) + 1, 7]], dtype=torch.int32
    )
    packed = pack_codes(codes, bits)
    assert packed.nbytes == packed_size(3, bits) == -(-3 * 45 // 8)
    assert torch.equal(unpack_codes(packed, bits, (4, 3), torch.int32), codes)


def test_code_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="channel 1"):
        pack_codes(torch.tensor([[1], [2]]), [2, 2])  # 2 does not fit 2-bit two's complement (max 1)


def test_wrong_stream_length_is_refused():
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(np.zeros(3, dtype=np.uint8), [4, 4], (2, 4), torch.int8)
