import numpy as np
import pytest

from slimgraph.ir.fidelity import compare, compare_output


def test_identical_outputs():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = compare_output("y", a, a.copy())
    assert (f.cosine, f.rel_l2, f.max_abs, f.max_rel_error) == (1.0, 0.0, 0.0, 0.0)


def test_known_values():
    ref = np.array([[3.0, 4.0]], np.float32)
    new = np.array([[3.0, 4.5]], np.float32)
    f = compare_output("logits", ref, new)
    assert f.max_abs == pytest.approx(0.5)
    assert f.max_rel_error == pytest.approx(0.5 / 4.0)
    assert f.rel_l2 == pytest.approx(0.5 / 5.0)
    assert f.cosine == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))
    assert f.top1 == 1.0


def test_top1_disagreement_over_batches():
    ref = [{"logits": np.array([[1.0, 2.0], [3.0, 1.0]])}, {"logits": np.array([[0.0, 1.0]])}]
    new = [{"logits": np.array([[2.0, 1.0], [3.0, 1.0]])}, {"logits": np.array([[0.0, 1.0]])}]
    assert compare(ref, new).top1 == pytest.approx(2 / 3)


def test_shape_change_is_an_error():
    with pytest.raises(ValueError, match="changed shape"):
        compare_output("y", np.zeros((2, 3)), np.zeros((3, 2)))
