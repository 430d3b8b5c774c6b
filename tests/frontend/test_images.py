"""Calibration from a folder of images: decoding, resizing, layout, scale/mean/std, channel order, and
one clear error line for what cannot work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from slimgraph.errors import SlimgraphError
from slimgraph.frontend.images import ImagePreprocess, load_images, split_spec

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg",
          "hubble_deep_field.jpg", "ihc.png", "color.png", "brick.png", "grass.png", "gravel.png", "camera.png",
          "page.png", "text.png", "coins.png", "moon.png", "cell.png", "clock_motion.png", "motorcycle_right.png")


def photo_folder(folder: Path) -> Path:
    """20 real photos that scikit-image ships (numbered, so the held-out five are always the same)."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(PHOTOS):
        shutil.copy(data / name, folder / f"{i:02d}_{name}")
    return folder


def image_model(shape: list) -> ir.Model:
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Relu", ["pixels"], ["y"])], "m", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def two_pixels(folder: Path) -> Path:
    """Two 2×2 images: one red, one with a blue top row."""
    from PIL import Image

    folder.mkdir()
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((2, 2, 3), np.uint8)
    blue[0, :, 2] = 255
    Image.fromarray(red).save(folder / "a.png")
    Image.fromarray(blue).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_nchw_rgb_with_mean_and_std(tmp_path):
    folder, preprocess = split_spec(f"{two_pixels(tmp_path / 'imgs')}/{{mean=[0.5,0.5,0.5],std=[0.5,0.5,0.5]}}")
    feeds, source = load_images(folder, preprocess, image_model([1, 3, 2, 2]))
    assert len(feeds) == 2 and source == "imgs/: 2 images 2×2 NCHW"
    red = feeds[0]["pixels"]
    assert red.shape == (1, 3, 2, 2) and red.dtype == np.float32
    np.testing.assert_allclose(red[0, :, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)


def test_nhwc_bgr_resized_to_the_input(tmp_path):
    folder, preprocess = split_spec(f"{two_pixels(tmp_path / 'imgs')}/{{order=bgr,scale=1}}")
    feeds, _ = load_images(folder, preprocess, image_model([1, 4, 4, 3]))
    red = feeds[0]["pixels"]
    assert red.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(red[0, 0, 0], [0.0, 0.0, 255.0])  # red is the last channel in BGR


def test_symbolic_size_needs_the_size_option(tmp_path):
    folder = two_pixels(tmp_path / "imgs")
    model = image_model(["batch", 3, "height", "width"])
    with pytest.raises(SlimgraphError, match=r"symbolic height or width .*size=\[320,320\]"):
        load_images(folder, ImagePreprocess(), model)
    feeds, _ = load_images(*split_spec(f"{folder}/{{size=[8,6]}}"), model)
    assert feeds[0]["pixels"].shape == (1, 3, 8, 6)
    # a fixed height and a symbolic width (an OCR recogniser): the size must agree where the input is fixed
    line = image_model([1, 1, 64, "width"])
    feeds, _ = load_images(*split_spec(f"{folder}/{{size=[64,128]}}"), line)
    assert feeds[0]["pixels"].shape == (1, 1, 64, 128)
    with pytest.raises(SlimgraphError, match=r"size=\[32, 128\], but input 'pixels' takes 64×width"):
        load_images(*split_spec(f"{folder}/{{size=[32,128]}}"), line)


@pytest.mark.parametrize("spec, message", [
    ("{folder}/{{shape=[3]}}", "unknown option 'shape'"),
    ("{folder}/{{size=[3]}}", r"size must be \[height, width\]"),
    ("{folder}/{{std=[0]}}", "std must not be 0"),
    ("{empty}", "has no images"),
])
def test_bad_specs_and_folders_fail_with_one_line(tmp_path, spec, message):
    from slimgraph.frontend.calibration import check_calibration_file

    folder = two_pixels(tmp_path / "imgs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimgraphError, match=message):
        check_calibration_file(Path(spec.format(folder=folder, empty=tmp_path / "empty")))


def test_a_model_without_one_image_input_is_refused(tmp_path):
    folder = two_pixels(tmp_path / "imgs")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"])], "m", [ids],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 8])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(SlimgraphError, match="one 4-D float input"):
        load_images(folder, ImagePreprocess(), model)


def test_cli_calibrates_on_a_folder_of_images(tmp_path, capsys):
    import json

    import onnx

    from slimgraph.cli import main
    from tests.passes.quantize.test_static import small_cnn

    source = tmp_path / "cnn.onnx"
    onnx.save(ir.serde.serialize_model(small_cnn()), source)
    photos = photo_folder(tmp_path / "photos")
    code = main(["optimize", str(source), "-p", "quantize-static", "--calib", str(photos), "-o",
                 str(tmp_path / "q.onnx"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == "photos/: 20 images 16×16 NCHW; the first 15 of 20 samples"  # 5 held out
    assert report["fidelity"]["cosine"] >= 0.999
