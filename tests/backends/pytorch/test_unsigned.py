"""uint64 ops through the PyTorch backend against Python's integers (torch lacks most uint64
kernels, so the backend computes on the int64 bits; these are where that could go wrong)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.backends.pytorch import PyTorchArtifact

MASK = (1 << 64) - 1
# values near the sign bit and the ends are the interesting ones
uint64 = st.one_of(st.integers(0, MASK), st.sampled_from([0, 1, (1 << 63) - 1, 1 << 63, (1 << 63) + 1, MASK]))
pairs = st.lists(st.tuples(uint64, uint64), min_size=1, max_size=16)

OPS = {
    "Div": lambda a, b: a // b, "Mod": lambda a, b: a % b, "Max": max, "Min": min,
    "Greater": lambda a, b: a > b, "LessOrEqual": lambda a, b: a <= b,
    "Add": lambda a, b: (a + b) & MASK, "Sub": lambda a, b: (a - b) & MASK, "Mul": lambda a, b: (a * b) & MASK,
}


def _run(op_type: str, a: list[int], b: list[int], **attributes) -> list:
    node = onnx.helper.make_node(op_type, ["a", "b"], ["y"], **attributes)
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UINT64, [len(a)]) for n in ("a", "b")]
    graph = onnx.helper.make_graph([node], "g", info, [onnx.helper.make_tensor_value_info("y", 0, None)])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))
    (y,) = PyTorchArtifact(model)(a=np.array(a, np.uint64), b=np.array(b, np.uint64)).values()
    return [int(v) if y.dtype != bool else bool(v) for v in y]


@settings(max_examples=60, deadline=None)
@given(pairs, st.sampled_from(sorted(OPS)))
def test_binary_ops(values, op_type):
    a, b = [x for x, _ in values], [max(y, 1) for _, y in values]  # no division by zero
    assert _run(op_type, a, b) == [OPS[op_type](x, y) for x, y in zip(a, b)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(uint64, st.integers(0, 63)), min_size=1, max_size=16), st.sampled_from(["LEFT", "RIGHT"]))
def test_bit_shift(values, direction):
    a, shifts = [x for x, _ in values], [s for _, s in values]
    want = [(x << s) & MASK if direction == "LEFT" else x >> s for x, s in values]
    assert _run("BitShift", a, shifts, direction=direction) == want
