import numpy as np

from slimgraph.ir.inputs import model_inputs, sample_inputs


def test_token_inputs_are_valid(minilm):
    feeds = sample_inputs(minilm, batch=3, sequence=7)
    assert set(feeds) == {"input_ids", "token_type_ids", "attention_mask"}
    assert feeds["input_ids"].shape == (3, 7) and feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 30522
    assert (feeds["attention_mask"] == 1).all()
    assert (feeds["token_type_ids"] == 0).all()


def test_float_inputs_and_fixed_dims(mlp_model):
    feeds = sample_inputs(mlp_model, batch=5)
    assert feeds["x"].shape == (5, 8) and feeds["x"].dtype == np.float32
    again = sample_inputs(mlp_model, batch=5)
    np.testing.assert_array_equal(feeds["x"], again["x"])  # seeded


def test_model_inputs_prefers_real_examples(minilm, mlp_model):
    feeds, source = model_inputs(minilm)
    assert source.startswith("tokenizer")
    assert feeds[0]["input_ids"][0, 0] == 101  # [CLS]
    feeds, source = model_inputs(mlp_model)
    assert source == "synthesized" and len(feeds) == 2
