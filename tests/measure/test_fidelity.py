import numpy as np
import pytest

from slimgraph.measure.fidelity import OutputMap, at_real_tokens, compare, compare_output


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


def test_pooled_outputs_are_compared_as_the_sentences_they_pool_to():
    """A sentence encoder's token states: compared as mean-pooled sentences over the real tokens;
    padding positions (whatever they hold) do not count."""
    from slimgraph.measure.fidelity import OutputMap, sentence_cosines

    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    ref = rng.normal(size=(2, 4, 8)).astype(np.float32)
    new = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)
    new[0, 3] = 1e3  # a padding position
    maps = {"last_hidden_state": OutputMap(pooled_by="attention_mask")}
    feeds = [{"attention_mask": mask}]
    pooled = compare([{"last_hidden_state": ref}], [{"last_hidden_state": new}], maps, feeds).outputs[0]
    token_level = compare([{"last_hidden_state": ref}], [{"last_hidden_state": new}]).outputs[0]
    assert pooled.view == "as mean-pooled sentences" and token_level.view is None
    assert token_level.cosine < 0.1 < 0.9 < pooled.cosine  # the padded position is left out
    per_sentence = sentence_cosines([ref], [new], [mask])
    assert per_sentence.min() - 1e-3 <= pooled.cosine <= per_sentence.max() + 1e-3
    with pytest.raises(ValueError, match="attention_mask"):
        compare([{"last_hidden_state": ref}], [{"last_hidden_state": new}], maps)


def test_real_tokens_compares_only_what_the_mask_keeps():
    """A decoder's outputs at padding are never read: a map with `real_tokens` leaves them out,
    right-aligned (logits cover the new tokens, the mask the past too)."""
    ref = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)  # [batch, 3 new tokens, vocab]
    new = ref.copy()
    new[0, 0] = -99  # at padding: the mask's last 3 of 4 columns are the new tokens
    assert compare([{"logits": ref}], [{"logits": new}]).cosine < 1
    maps = {"logits": OutputMap(real_tokens=("attention_mask", 1))}
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    fidelity = compare([{"logits": ref}], [{"logits": new}], maps, [{"attention_mask": mask}])
    assert fidelity.max_abs == 0 and fidelity.top1 == 1.0
    kept = at_real_tokens(np.zeros((2, 3, 4, 8)), mask, 2)  # a cache [batch, heads, total, dim]
    assert kept.shape == (6, 3, 8)  # 2 + 4 real positions, each with its heads' vectors
