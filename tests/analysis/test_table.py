"""A sensitivity table survives JSON: ``from_dict(to_dict())`` is the same table, checked again."""

import json

import numpy as np
import pytest

from cetopt.analysis import SensitivityTable
from cetopt.errors import DataShapeError, NonFiniteError


def _table(**extra) -> SensitivityTable:
    return SensitivityTable(
        layers=["a", "b.c"],
        bits=[2, 2, 4, 8],
        groups=[None, 32, None, None],
        values=np.array([[3.0, 2.5, 0.5, 0.01], [1.0, 0.7, 0.1, 0.0]]),
        params=np.array([640, 128]),
        method="measured",
        meta={"loss": "kl_to_float", "probes": 16},
        **extra,
    )


@pytest.mark.parametrize(
    "extra",
    [{}, {"stderr": np.full((2, 4), 0.01), "channels": np.array([10, 4]), "macs": np.array([6400, 128])}],
)
def test_round_trip_through_json(extra):
    table = _table(**extra)
    again = SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.to_dict() == table.to_dict()
    assert isinstance(again.values, np.ndarray) and again.values.dtype == np.float64
    assert list(again.groups) == [None, 32, None, None]


def test_a_damaged_record_is_refused_by_name():
    record = _table().to_dict()
    with pytest.raises(DataShapeError, match="colour"):
        SensitivityTable.from_dict({**record, "colour": 1})
    record["values"][1][2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'b\.c'"):
        SensitivityTable.from_dict(record)
