"""How well one sensitivity table ranks (layer, bits) options compared with another."""

from __future__ import annotations

from scipy import stats

from cetopt.analysis.table import SensitivityTable
from cetopt.errors import DataShapeError

__all__ = ["rank_correlation"]


def rank_correlation(table: SensitivityTable, reference: SensitivityTable, *, per_bit: bool = False):
    """Spearman rank correlation of ``table``'s values with ``reference``'s (e.g. ``measured``).

    Parameters
    ----------
    table, reference : SensitivityTable
        Same layers and bits.
    per_bit : bool
        If true, return one correlation across layers per bit width (a dict), else one over
        every (layer, bits) entry.
    """
    if list(table.layers) != list(reference.layers) or list(table.bits) != list(reference.bits):
        raise DataShapeError("the tables must have the same layers and bits, in the same order")
    if per_bit:
        return {
            b: float(stats.spearmanr(table.values[:, j], reference.values[:, j]).statistic)
            for j, b in enumerate(table.bits)
        }
    return float(stats.spearmanr(table.values.ravel(), reference.values.ravel()).statistic)
