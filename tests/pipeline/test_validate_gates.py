"""The validate stage's fidelity gates: a minimum fails below (and on NaN), a maximum above (and on NaN)."""

from __future__ import annotations

from pipeline.stages.validate import _fidelity_failures


def test_minimum_and_maximum_gates_fail_outside_and_on_nan() -> None:
    fid = {"cos_mean": 0.98765, "recall_at_10": 0.7, "top1_agreement": float("nan"), "ppl_ratio": 1.2}
    got = _fidelity_failures("t", fid, {"cos_mean": 0.99, "recall_at_10": 0.7, "top1_agreement": 0.5})
    assert [f["check"] for f in got] == ["cos_mean", "top1_agreement"]  # 0.7 >= 0.7 passes; NaN fails
    assert got[0] == {"target": "t", "check": "cos_mean", "value": 0.9877, "limit": 0.99}
    assert _fidelity_failures("t", fid, {"ppl_ratio": 1.2}, at_most=True) == []
    assert [f["check"] for f in _fidelity_failures("t", fid, {"ppl_ratio": 1.1}, at_most=True)] == ["ppl_ratio"]
    nan = _fidelity_failures("t", {"ppl_ratio": float("nan")}, {"ppl_ratio": 9.0}, at_most=True)
    assert [f["check"] for f in nan] == ["ppl_ratio"]
    assert _fidelity_failures("t", fid, {"cos_mean": None, "recall_at_10": None}) == []  # not gated
