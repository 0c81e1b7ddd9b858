"""Helpers shared by the per-layer and per-channel sensitivity estimators."""

from __future__ import annotations

from collections.abc import Sequence

from cetopt.errors import CetoptError

WORKING_BYTES = 2 << 30  # bound on what the estimators' probe and example chunks hold at once


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (a no-op when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def checked_bits(bits: Sequence[int]) -> list[int]:
    """``bits`` as ints, each a width the estimators can score (2 to 16)."""
    bits = [int(b) for b in bits]
    if any(b < 2 or b > 16 for b in bits):
        raise CetoptError(f"bits must lie in 2..16, got {bits}")
    return bits
