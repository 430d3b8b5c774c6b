import pytest

"""The ONNX backend node cases through ONNX → IR → PyTorch backend, at the reference tolerances."""

from tests.backends.conformance import UNREPRESENTABLE, all_outcomes, summary

# A ratchet: the pass rate may only go up. The goal is 0.90 of the cases counted.
PASS_RATE_FLOOR = 0.98  # 1633 of 1665; a Slice regression (1626, 0.977) went unseen at 0.97


@pytest.mark.slow
def test_conformance_pass_rate():
    outcomes = all_outcomes()
    result = summary(outcomes)
    assert result["cases"] > 1800
    allowed = {f"left out: {name.lower()} dtype" for name in UNREPRESENTABLE} | {
        "left out: sequence type", "left out: optional type", "left out: map type"}
    assert set(result["left out"]) <= allowed
    assert result["rate"] >= PASS_RATE_FLOOR, f"{result['passed']}/{result['counted']} cases pass"
