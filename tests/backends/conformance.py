"""Running the ONNX backend node cases through ONNX → IR → PyTorch backend, and each case that
passes once more through its saved model.py (imported by path): a case passes only if both do.

Left out, as the issue allows: cases whose inputs or outputs have dtypes torch cannot
represent (float8 variants, 4/2-bit ints, float4, strings) or sequence/optional/map types.
"""

from __future__ import annotations

import collections
import importlib.util
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

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


def run_case(case, saved_in: Path | None = None) -> Outcome:
    """The case through the backend; with `saved_in`, also through its saved model.py."""
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
            if saved_in is not None:
                _check_saved(artifact, saved_in / case.name, [_array(x) for x in case.data_sets[0][0]])
    except Exception as exc:  # any failure of the case counts against the pass rate
        text = str(exc).strip().splitlines()
        return Outcome(case.name, op, "fail", f"{type(exc).__name__}: {text[0] if text else ''}"[:200])
    return Outcome(case.name, op, "pass")


def _check_saved(artifact, folder: Path, inputs: list) -> None:
    """The saved model.py (imported here, by path) gives the module's outputs and imports no slimgraph."""
    import torch

    from slimgraph.backends.pytorch.tensors import to_torch

    artifact.save(folder)
    source = (folder / "model.py").read_text()
    assert "slimgraph." not in source.replace("slimgraph.backends.pytorch.runtime", ""), "model.py imports slimgraph"
    spec = importlib.util.spec_from_file_location(f"saved_{folder.name}", folder / "model.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    arguments = [to_torch(np.asarray(x)) for x in inputs]
    with torch.no_grad():
        for got, want in zip(generated.load()(*arguments), artifact.module(*arguments)):
            same = torch.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True) if got.is_floating_point() \
                else torch.equal(got, want)
            assert same, "saved model.py gives other values"


def all_outcomes() -> list[Outcome]:
    """Every case, in memory and through its saved model.py."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    with tempfile.TemporaryDirectory() as folder:
        return [run_case(case, Path(folder)) for case in cases]


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


def markdown(outcomes: list[Outcome]) -> str:
    """docs/pytorch-backend.md: the pass rate, what is left out, and every op's cases."""
    from slimgraph.backends.pytorch.builder import build_module  # noqa: F401  (registers lowerings)
    from slimgraph.backends.pytorch.lowering import supported_ops

    result = summary(outcomes)
    lines = [
        "# PyTorch backend: op coverage",
        "",
        "Generated by `python -m tests.backends.conformance --markdown > docs/pytorch-backend.md` from the ONNX",
        "backend node cases (`onnx.backend.test.case.node.collect_testcases`), run ONNX → IR → PyTorch backend",
        "and compared with their expected outputs at the ONNX reference tolerances (rtol 1e-3, atol 1e-7); a",
        "case passes only if its saved `model.py`, imported on its own, gives the same outputs too.",
        "",
        f"**{result['passed']} of {result['counted']} cases pass ({result['rate']:.1%}).** "
        f"{result['cases'] - result['counted']} of the {result['cases']} cases are left out, as allowed:",
        "",
        "| left out | cases |",
        "|---|---|",
    ]
    for status, count in sorted(result["left out"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {status.removeprefix('left out: ')} | {count} |")
    per_op: dict[str, collections.Counter] = {}
    for o in outcomes:
        if not o.status.startswith("left out"):
            per_op.setdefault(o.op, collections.Counter())[o.status] += 1
    lines += ["", "## Cases by op (first node of the case)", "", "| op | pass | fail |", "|---|---|---|"]
    for op in sorted(per_op):
        lines.append(f"| {op} | {per_op[op]['pass']} | {per_op[op]['fail']} |")
    lines += ["", "## Failing cases", "", "| case | op | why |", "|---|---|---|"]
    for o in outcomes:
        if o.status == "fail":
            lines.append(f"| {o.name} | {o.op} | {o.message.replace('|', '/')[:140]} |")
    lines += ["", "## Lowerings (op: opset ranges)", ""]
    for op, ranges in supported_ops().items():
        text = ", ".join(f"{lo}+" if hi is None else f"{lo}–{hi}" for lo, hi in ranges)
        lines.append(f"- `{op}`: {text}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    outcomes = all_outcomes()
    if "--markdown" in sys.argv:
        sys.stdout.write(markdown(outcomes))
    else:
        print(summary(outcomes))
        failing = collections.Counter(o.op for o in outcomes if o.status == "fail")
        print("failing ops:", failing.most_common(40))
