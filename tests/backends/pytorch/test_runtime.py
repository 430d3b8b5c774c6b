"""Runtime helpers (ops whose output shape depends on values): ONNX Runtime's results, and a
saved model.py that carries their source and so still imports nothing but torch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import slimgraph
from slimgraph.measure import evaluate
from tests.backends.pytorch.standalone import run_standalone


def _nms_model() -> ir.Model:
    inputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [2, 40, 4]),
              helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 3, 40])]
    limits = [helper.make_tensor("max_per_class", TensorProto.INT64, [1], [5]),
              helper.make_tensor("iou", TensorProto.FLOAT, [1], [0.4]),
              helper.make_tensor("score", TensorProto.FLOAT, [1], [0.2])]
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_per_class", "iou", "score"], ["selected"])
    graph = helper.make_graph([node], "nms", inputs, [helper.make_tensor_value_info("selected", TensorProto.INT64,
                                                                                   None)], limits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))


def _feeds(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 10, (2, 40, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(0.5, 4, (2, 40, 2)).astype(np.float32)], -1)
    return {"boxes": boxes, "scores": rng.uniform(0, 1, (2, 3, 40)).astype(np.float32)}


def test_non_max_suppression_matches_onnxruntime():
    model = _nms_model()
    artifact = slimgraph.compile(model, backend="pytorch")
    for seed in range(5):
        feeds = _feeds(seed)
        np.testing.assert_array_equal(artifact(**feeds)["selected"], evaluate.run(model, feeds)["selected"])


def test_saved_module_carries_its_helpers(tmp_path):
    model = _nms_model()
    artifact = slimgraph.compile(model, backend="pytorch")
    folder = artifact.save(tmp_path / "nms")
    assert "def non_max_suppression(" in (folder / "model.py").read_text()
    feeds = _feeds(7)
    np.savez(tmp_path / "feeds.npz", **feeds)
    run_standalone(folder, f"feeds = np.load({str(tmp_path / 'feeds.npz')!r})\n"
                           "(selected,) = load()(torch.from_numpy(feeds['boxes']), torch.from_numpy(feeds['scores']))\n"
                           f"np.save({str(tmp_path / 'selected.npy')!r}, selected.numpy())")
    np.testing.assert_array_equal(np.load(tmp_path / "selected.npy"), evaluate.run(model, feeds)["selected"])


@pytest.mark.parametrize("mode, transform, sampling_ratio", [("avg", "half_pixel", 0), ("avg", "output_half_pixel", 2),
                                                            ("max", "half_pixel", 2)])
def test_roi_align_matches_onnxruntime(mode, transform, sampling_ratio):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 10]),
              helper.make_tensor_value_info("rois", TensorProto.FLOAT, [6, 4]),
              helper.make_tensor_value_info("batch", TensorProto.INT64, [6])]
    node = helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], mode=mode, output_height=4, output_width=3,
                            sampling_ratio=sampling_ratio, spatial_scale=0.5, coordinate_transformation_mode=transform)
    graph = helper.make_graph([node], "roi", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)]))
    rng = np.random.default_rng(3)
    corners = rng.uniform(-2, 18, (6, 2))
    feeds = {"x": rng.normal(size=(2, 3, 12, 10)).astype(np.float32),
             "rois": np.concatenate([corners, corners + rng.uniform(1, 8, (6, 2))], 1).astype(np.float32),
             "batch": rng.integers(0, 2, 6)}
    got = slimgraph.compile(model, backend="pytorch")(**feeds)["y"]
    np.testing.assert_allclose(got, evaluate.run(model, feeds)["y"], rtol=1e-5, atol=1e-5)


def test_saved_helpers_bring_the_helpers_they_call(tmp_path):
    """roi_align calls _roi_axis and math: the copy in model.py must too."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6]),
              helper.make_tensor_value_info("rois", TensorProto.FLOAT, [2, 4])]
    batch = helper.make_tensor("batch", TensorProto.INT64, [2], [0, 0])
    node = helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], output_height=2, output_width=2)
    graph = helper.make_graph([node], "roi", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [batch])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)]))
    folder = slimgraph.compile(model, backend="pytorch").save(tmp_path / "roi")
    feeds = {"x": np.arange(72, dtype=np.float32).reshape(1, 2, 6, 6),
             "rois": np.array([[0, 0, 3, 3], [1, 2, 5, 4]], np.float32)}
    printed = run_standalone(folder, "(y,) = load()(torch.arange(72.0).reshape(1, 2, 6, 6), "
                                     "torch.tensor([[0.0, 0, 3, 3], [1, 2, 5, 4]]))\nprint(y.flatten().tolist())")
    np.testing.assert_allclose(eval(printed), evaluate.run(model, feeds)["y"].ravel(), rtol=1e-5)
