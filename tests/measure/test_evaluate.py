import numpy as np
import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs


def test_run_and_capture_intermediates(mlp_model):
    feeds = sample_inputs(mlp_model)
    outputs_before = [v.name for v in mlp_model.graph.outputs]
    (captured,) = evaluate.capture(mlp_model, ["h1", "a"], [feeds])
    x = feeds["x"]
    w1 = mlp_model.graph.initializers["fc1.weight"].const_value.numpy()
    b1 = mlp_model.graph.initializers["fc1.bias"].const_value.numpy()
    np.testing.assert_allclose(captured["h1"], x @ w1 + b1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(captured["a"], np.maximum(x @ w1 + b1, 0), rtol=1e-5, atol=1e-6)
    assert [v.name for v in mlp_model.graph.outputs] == outputs_before  # model left as it was


@pytest.mark.parametrize("external", [False, True])
def test_capture_feeds_the_weights_and_runs_only_what_the_values_need(mlp_model, tmp_path, monkeypatch, external):
    """Every weight is fed to the session (the size threshold lowered to 0) and the nodes after
    the captured value are left out; the values are those of the whole model, which stays as it was."""
    import onnx_ir as ir

    if external:  # weights read from external data, as a large model loaded from a file has them
        ir.save(mlp_model, tmp_path / "mlp.onnx", external_data="mlp.onnx.data", size_threshold_bytes=0)
        mlp_model = ir.load(tmp_path / "mlp.onnx")
    feeds = sample_inputs(mlp_model)
    want = evaluate.capture(mlp_model, ["h1"], [feeds])
    before = ir.serde.serialize_model(mlp_model)
    monkeypatch.setattr(evaluate, "FED_WEIGHT_BYTES", 0)
    view, weights = evaluate._capture_view(mlp_model, [mlp_model.graph.node(1).outputs[0]])
    assert set(weights) == {"fc1.weight", "fc1.bias"} and [v.name for v in view.graph.outputs] == ["h1"]
    assert len(view.graph) == 2 and not view.graph.initializers  # MatMul, Add: nothing after h1
    np.testing.assert_array_equal(next(evaluate.capture(mlp_model, ["h1"], [feeds]))["h1"], next(want)["h1"])
    assert ir.serde.serialize_model(mlp_model) == before


def test_capture_unknown_value(mlp_model):
    with pytest.raises(SlimgraphError, match="no value named 'nope'"):
        evaluate.capture(mlp_model, ["nope"], [sample_inputs(mlp_model)])


def test_missing_inputs(mlp_model):
    with pytest.raises(SlimgraphError, match="missing model inputs: x"):
        evaluate.run(mlp_model, {})


def test_check_model_rejects_invalid_graphs(mlp_model):
    node = next(n for n in mlp_model.graph if n.op_type == "Relu")
    node.op_type = "NoSuchOp"
    with pytest.raises(SlimgraphError, match="not valid ONNX"):
        evaluate.check_model(mlp_model)


def test_onnxruntime_logs_nothing_when_a_run_fails(capfd):
    """ORT logs a coloured ERROR line of its own (on the process's stderr, below Python) before
    raising; slimgraph's error says it once, and nothing else may reach the user's terminal."""
    import onnx
    import onnx_ir as ir

    model = ir.serde.deserialize_model(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, T] audio) => (float[B, S] y) <int64[4] pads = {0, 64, 0, 64}> {
            y = Pad <mode = "reflect"> (audio, pads)
        }"""))
    with pytest.raises(SlimgraphError, match="ONNX Runtime failed to run the model"):
        evaluate.run(model, {"audio": np.zeros((1, 16), np.float32)})
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("which", ["minilm", "llama_kv"])  # llama_kv: every block makes outputs (present k/v)
def test_a_model_run_block_by_block_gives_its_outputs(request, which):
    model = request.getfixturevalue(which)
    feeds = model.meta["slimgraph.example_inputs"]
    whole = evaluate.run_all(model, feeds)
    by_blocks = evaluate.run_by_blocks(model, feeds)
    for a, b in zip(whole, by_blocks, strict=True):
        assert list(a) == list(b)
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5 * np.abs(a[name]).max())


def test_run_all_goes_block_by_block_where_a_session_of_the_whole_would_not_fit(minilm, monkeypatch):
    feeds = minilm.meta["slimgraph.example_inputs"][:1]
    whole = evaluate.run_all(minilm, feeds)
    monkeypatch.setattr(evaluate, "available_memory", lambda: evaluate.initializer_bytes(minilm))
    monkeypatch.setattr(evaluate, "make_session", lambda *a, **k: pytest.fail("a session of the whole model"))
    for name, value in evaluate.run_all(minilm, feeds)[0].items():
        np.testing.assert_allclose(value, whole[0][name], rtol=1e-4, atol=1e-5)
