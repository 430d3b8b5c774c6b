"""RNN, GRU and LSTM of a run-time sequence length (a loop, not unrolled), with per-batch
lengths, inside an If branch, and DynamicQuantizeLSTM as ONNX Runtime's quantizer writes it:
all against ONNX Runtime, in memory and through the saved model.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.measure import evaluate
from tests.backends.pytorch.standalone import run_standalone

HIDDEN, INPUT = 5, 4
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def recurrent_model(op: str, direction: str = "bidirectional", lengths: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x [seq, batch, INPUT] with `seq` and `batch` symbolic → op → (y, y_h)."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    weights = {
        "w": rng.standard_normal((dirs, gates * HIDDEN, INPUT)) * 0.5,
        "r": rng.standard_normal((dirs, gates * HIDDEN, HIDDEN)) * 0.5,
        "b": rng.standard_normal((dirs, 2 * gates * HIDDEN)) * 0.1,
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", INPUT]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, [dirs, "batch", HIDDEN])]
    if lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
    extra = {"linear_before_reset": 1} if op == "GRU" else {}
    node = helper.make_node(op, ["x", "w", "r", "b", "lengths" if lengths else "", "h0"], ["y", "y_h"],
                            hidden_size=HIDDEN, direction=direction, **extra)
    graph = helper.make_graph([node], "recurrent", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y_h", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def feeds_for(steps: int, batch: int = 2, dirs: int = 2, lengths: bool = False, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((steps, batch, INPUT)).astype(np.float32),
             "h0": rng.standard_normal((dirs, batch, HIDDEN)).astype(np.float32) * 0.1}
    if lengths:
        feeds["lengths"] = np.array([steps, max(steps - 2, 1)][:batch], dtype=np.int32)
    return feeds


def assert_close(got: dict, want: dict, rtol: float = 1e-4) -> None:
    assert list(got) == list(want)
    for name in want:
        scale = max(float(np.abs(want[name]).max()), 1e-30)
        assert got[name].shape == want[name].shape, name
        assert np.abs(got[name] - want[name]).max() <= rtol * scale, name


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("lengths", [False, True])
def test_run_time_sequence_length(op, direction, lengths):
    model = ir.serde.deserialize_model(recurrent_model(op, direction, lengths))
    artifact = slimgraph.compile(model, backend="pytorch")
    dirs = 2 if direction == "bidirectional" else 1
    for steps in (1, 3, 7):  # one module, any length
        feeds = feeds_for(steps, dirs=dirs, lengths=lengths)
        assert_close(artifact(**feeds), evaluate.run(model, feeds))


def test_static_length_is_unrolled_and_run_time_length_loops():
    static = recurrent_model("LSTM")
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    unrolled = slimgraph.compile(ir.serde.deserialize_model(static), backend="pytorch").source
    looped = slimgraph.compile(ir.serde.deserialize_model(recurrent_model("LSTM")), backend="pytorch").source
    assert "recurrent" not in unrolled and "recurrent" in looped


def test_lstm_in_an_if_branch_and_saved(tmp_path):
    """The branch's LSTM reads an outer value whose length only the run knows (Silero VAD's shape)."""
    lstm = recurrent_model("LSTM")
    then_branch = helper.make_graph(
        [helper.make_node("LSTM", ["x", "w", "r", "b", "", "h0"], ["then_y", "then_h"], hidden_size=HIDDEN,
                          direction="bidirectional")],
        "then", [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, None),
                     helper.make_tensor_value_info("then_h", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["nx"]),
         helper.make_node("LSTM", ["nx", "w", "r", "b", "", "h0"], ["else_y", "else_h"], hidden_size=HIDDEN,
                          direction="bidirectional")],
        "else", [], [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, None),
                     helper.make_tensor_value_info("else_h", TensorProto.FLOAT, None)])
    graph = lstm.graph
    del graph.node[:]
    graph.node.append(helper.make_node("If", ["flag"], ["y", "y_h"], then_branch=then_branch, else_branch=else_branch))
    graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    model = ir.serde.deserialize_model(lstm)
    artifact = slimgraph.compile(model, backend="pytorch")
    for flag in (True, False):
        feeds = feeds_for(5) | {"flag": np.array(flag)}
        assert_close(artifact(**feeds), evaluate.run(model, feeds))
    artifact.save(tmp_path / "saved")
    feeds = feeds_for(4) | {"flag": np.array(False)}
    want = evaluate.run(model, feeds)["y"]
    printed = run_standalone(tmp_path / "saved", (
        f"x = torch.from_numpy(np.array({feeds['x'].tolist()}, dtype=np.float32))\n"
        f"h0 = torch.from_numpy(np.array({feeds['h0'].tolist()}, dtype=np.float32))\n"
        "print(repr(load()(x, h0, torch.tensor(False))[0].detach().numpy().tolist()))"))
    np.testing.assert_allclose(np.array(eval(printed)), want, rtol=1e-4, atol=1e-5)


def test_dynamic_quantize_lstm_as_onnxruntime_writes_it(tmp_path):
    """ORT's quantize_dynamic turns an LSTM into com.microsoft.DynamicQuantizeLSTM (int8 weights,
    inputs and hidden state quantized to uint8 at run time); the backend does the same arithmetic."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = tmp_path / "lstm.onnx"
    proto = recurrent_model("LSTM", seed=3)
    # DynamicQuantizeLSTM needs initial_c as well when initial_h is given
    proto.graph.input.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [2, "batch", HIDDEN]))
    proto.graph.node[0].input.append("c0")
    onnx.save(proto, source)
    quantized = tmp_path / "lstm.int8.onnx"
    # reduce_range: 7-bit weights keep ORT's U8S8 kernel exact on CPUs without VNNI (int16 pair sums)
    quantize_dynamic(str(source), str(quantized), op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8,
                     reduce_range=True)
    model = ir.load(quantized)
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["DynamicQuantizeLSTM"]
    # ORT quantizes the hidden state of each thread's batch rows together: with 2 threads and
    # at most 2 rows, row by row
    artifact = slimgraph.compile(model, backend="pytorch", ort_threads=2)
    session = evaluate.make_session(model, threads=2)
    for steps, batch in ((1, 1), (6, 1), (6, 2)):
        feeds = feeds_for(steps, batch=batch) | {"c0": np.full((2, batch, HIDDEN), 0.1, np.float32)}
        feeds["h0"] = feeds["h0"][:, :batch]
        assert_close(artifact(**feeds), evaluate.run(session, feeds))


class _Tagger(torch.nn.Module):
    """nn.LSTM and a Linear head: what ORT's quantize_dynamic makes DynamicQuantizeLSTM and
    DynamicQuantizeLinear + MatMulInteger of."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, hidden)
        self.head = torch.nn.Linear(hidden, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


@pytest.mark.parametrize(("weights", "per_channel"), [("QInt8", False), ("QInt8", True), ("QUInt8", False)])
def test_onnxruntime_quantized_torch_lstm(tmp_path, weights, per_channel):
    """A torch LSTM exported by the TorchScript exporter, quantized by ORT's quantize_dynamic.
    ORT quantizes the hidden state over blocks of batch rows, one per thread (rows 0-1 and 2
    of 3 with 2 threads; the whole batch with 1 thread or hidden > 256): its results depend
    on the session's threads, by 2e-3 relative here, and the backend matches the session of
    `ort_threads`. Int8 products are exact with VNNI, and with 7-bit (QInt8) or uint8 codes
    without it; the full-range QInt8 weights here can saturate AVX2's int16 pair sums."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slimgraph.measure.target import detect

    exact = weights == "QUInt8" or not detect().int8_saturates
    rtol = 1e-4 if exact else 1e-1
    for hidden, batch, threads in ((16, 2, 1), (16, 2, 2), (16, 3, 2), (300, 2, 2)):
        torch.manual_seed(0)
        source, quantized = tmp_path / "lstm.onnx", tmp_path / f"lstm.{hidden}.int8.onnx"
        torch.onnx.export(_Tagger(hidden).eval(), (torch.randn(5, batch, 8),), source, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {1: "batch"}})
        quantize_dynamic(str(source), str(quantized), weight_type=QuantType[weights], per_channel=per_channel)
        model = ir.load(quantized)
        ops = {n.op_type for n in model.graph}
        assert {"DynamicQuantizeLSTM", "DynamicQuantizeLinear", "MatMulInteger"} <= ops
        artifact = slimgraph.compile(model, backend="pytorch", ort_threads=threads)
        session = evaluate.make_session(model, threads=threads)
        feeds = {"x": np.random.default_rng(1).standard_normal((5, batch, 8)).astype(np.float32)}
        assert_close(artifact(**feeds), evaluate.run(session, feeds), rtol=rtol)
