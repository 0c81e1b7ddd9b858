"""Under ``auto``, a ``cet`` the model's kernels cannot differentiate forward gives way to ``measured``."""

import pytest

from cetopt.analysis import estimators


def _fake_methods(monkeypatch, cet_error: Exception):
    def cet(obj, deltas, opts):
        raise cet_error

    def measured(obj, deltas, opts):
        return "values", None, {"examples_used": 1}

    monkeypatch.setitem(estimators.METHODS, "cet", cet)
    monkeypatch.setitem(estimators.METHODS, "measured", measured)


@pytest.mark.parametrize(
    "error",
    [
        NotImplementedError("sdpa flash kernel"),
        RuntimeError("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"),
    ],
)
def test_auto_falls_back_to_measured_when_cet_lacks_forward_ad(monkeypatch, error):
    _fake_methods(monkeypatch, error)
    values, _, meta, method = estimators._run("cet", None, {}, {}, {"chose": "cet", "reason": "cheaper"})
    assert (values, method) == ("values", "measured")
    assert meta["auto"]["chose"] == "measured"
    assert "cet cannot run here" in meta["auto"]["reason"]


def test_other_failures_are_raised_not_hidden(monkeypatch):
    _fake_methods(monkeypatch, RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        estimators._run("cet", None, {}, {}, {"chose": "cet", "reason": "cheaper"})
    # an explicitly requested cet is never replaced
    _fake_methods(monkeypatch, NotImplementedError("no forward AD"))
    with pytest.raises(NotImplementedError):
        estimators._run("cet", None, {}, {}, None)
