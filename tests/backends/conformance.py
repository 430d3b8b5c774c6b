"""Running the ONNX backend node cases through ONNX → IR → PyTorch backend.

Left out, as the issue allows: cases whose inputs or outputs have dtypes torch cannot
represent (float8 variants, 4/2-bit ints, float4, strings) or sequence/optional/map types.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

UNREPRESENTABLE = {
    "STRING", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
    "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2",
}


@dataclass(frozen=True)
class Outcome:
    name: str
    op: str
    status: str  # "pass", "fail", "left out: <category>"
    message: str = ""


def left_out(model: onnx.ModelProto) -> str | None:
    for value in list(model.graph.input) + list(model.graph.output):
        kind = value.type.WhichOneof("value")
        if kind in ("sequence_type", "optional_type", "map_type"):
            return f"{kind.replace('_type', '')} type"
        if kind == "tensor_type":
            dtype = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
            if dtype in UNREPRESENTABLE:
                return f"{dtype.lower()} dtype"
    return None


def _array(value) -> np.ndarray:
    """Some cases store a TensorProto inside an object array."""
    array = np.asarray(value)
    if array.dtype == object and array.shape == () and isinstance(array.item(), onnx.TensorProto):
        return onnx.numpy_helper.to_array(array.item())
    return array


def run_case(case) -> Outcome:
    from slimgraph.backends.pytorch import PyTorchArtifact

    op = case.model.graph.node[0].op_type if case.model.graph.node else "?"
    category = left_out(case.model)
    if category:
        return Outcome(case.name, op, f"left out: {category}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ir.serde.deserialize_model(case.model)
            artifact = PyTorchArtifact(model)
            for inputs, expected in case.data_sets:
                inputs, expected = [_array(x) for x in inputs], [_array(x) for x in expected]
                feeds = dict(zip(artifact.input_names, inputs))
                got = artifact(**feeds)
                for (name, value), want in zip(got.items(), expected):
                    want = np.asarray(want)
                    if value.shape != want.shape:
                        return Outcome(case.name, op, "fail", f"{name}: shape {value.shape} != {want.shape}")
                    if want.dtype.kind in "fc" or want.dtype.name == "bfloat16":
                        np.testing.assert_allclose(value.astype(np.float64), want.astype(np.float64), rtol=case.rtol,
                                                   atol=case.atol)
                    else:
                        np.testing.assert_array_equal(value, want)
    except Exception as exc:  # any failure of the case counts against the pass rate
        text = str(exc).strip().splitlines()
        return Outcome(case.name, op, "fail", f"{type(exc).__name__}: {text[0] if text else ''}"[:200])
    return Outcome(case.name, op, "pass")


def all_outcomes() -> list[Outcome]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return [run_case(case) for case in cases]


def summary(outcomes: list[Outcome]) -> dict:
    counted = [o for o in outcomes if not o.status.startswith("left out")]
    passed = sum(o.status == "pass" for o in counted)
    return {
        "cases": len(outcomes),
        "counted": len(counted),
        "passed": passed,
        "rate": passed / len(counted) if counted else 0.0,
        "left out": collections.Counter(o.status for o in outcomes if o.status.startswith("left out")),
    }


if __name__ == "__main__":
    import sys

    outcomes = all_outcomes()
    print(summary(outcomes))
    failing = collections.Counter(o.op for o in outcomes if o.status == "fail")
    print("failing ops:", failing.most_common(int(sys.argv[1]) if len(sys.argv) > 1 else 40))
