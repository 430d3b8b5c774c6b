"""Calibration inputs from a folder of images (JPEG, PNG, BMP, …): what a vision user has.

Each image becomes one feed of the model's image input, batch 1:

    RGB(or BGR) · scale − mean) / std, resized to the input's height and width, laid out NCHW or NHWC

The preprocessing is written after the folder in the pipeline options' grammar (the same in a
recipe's `calib:`), every key optional:

    --calib 'photos/{size=[320,320],scale=0.00392157,mean=[0.485,0.456,0.406],std=[0.229,0.224,0.225],order=bgr}'

`size` is needed only where the input's height or width is symbolic; the layout is read from
where the input has its 1 or 3 channels. Images are decoded with Pillow (the `images` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.passes._infra.options import convert, option_types, split_top_level

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    size: tuple[int, ...] = ()  # [height, width]; empty: the model input's
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    order: Literal["rgb", "bgr"] = "rgb"


def split_spec(text: str | Path) -> tuple[Path, ImagePreprocess]:
    """`photos/{mean=[0.5],…}` → (the folder, its preprocessing); a plain path gets the defaults."""
    text = str(text)
    if not text.endswith("}") or "{" not in text:
        return Path(text), ImagePreprocess()
    start = text.rindex("{")  # values are numbers and [lists]: no brace inside the block
    path, body = text[:start].rstrip("/") or ".", text[start + 1 : -1]
    types = option_types(ImagePreprocess)
    options = {}
    for item in split_top_level(body, ","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            known = ", ".join(types)
            raise SlimgraphError(f"calibration images: unknown option {key!r} in {text!r} (known: {known})")
        options[key] = convert("calibration images", key, types[key], value.strip())
    preprocess = ImagePreprocess(**options)
    if preprocess.size and (len(preprocess.size) != 2 or min(preprocess.size) < 1):
        raise SlimgraphError(f"calibration images: size must be [height, width], got {list(preprocess.size)}")
    if 0.0 in preprocess.std:
        raise SlimgraphError("calibration images: std must not be 0")
    return Path(path), preprocess


def image_files(folder: Path) -> list[Path]:
    """The folder's image files, sorted by name (so that the held-out quarter is the same every run)."""
    if not folder.is_dir():
        raise SlimgraphError(f"no such folder of calibration images: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SlimgraphError(f"calibration folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_images(folder: Path, preprocess: ImagePreprocess, model: ir.Model) -> tuple[list[dict[str, np.ndarray]], str]:
    """One feed per image for the model's single float image input."""
    image = _image_input(model)
    layout, channels, (height, width) = _layout(image, preprocess)
    Image = pillow()
    feeds = []
    for file in image_files(folder):
        try:
            with Image.open(file) as opened:
                picture = opened.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
        except (OSError, ValueError) as exc:
            raise SlimgraphError(f"cannot read calibration image {file}: {exc}") from None
        pixels = np.asarray(picture, dtype=np.float32).reshape(height, width, channels)
        if preprocess.order == "bgr" and channels == 3:
            pixels = pixels[..., ::-1]
        pixels = (pixels * preprocess.scale - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std,
                                                                                                    np.float32)
        if layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        feeds.append({image.name: np.ascontiguousarray(pixels[None], dtype=np.float32)})
    return feeds, f"{folder.name}/: {len(feeds)} images {height}×{width} {layout}"


def _image_input(model: ir.Model) -> ir.Value:
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    images = [v for v in inputs if v.dtype == ir.DataType.FLOAT and v.shape is not None and len(v.shape) == 4]
    if len(inputs) != 1 or len(images) != 1:
        described = ", ".join(f"{v.name} ({v.dtype.name.lower() if v.dtype else '?'}, rank "
                              f"{len(v.shape) if v.shape is not None else '?'})" for v in inputs)
        raise SlimgraphError(f"a folder of images calibrates a model with one 4-D float input; this one takes "
                             f"{described}: give a .npz of input arrays instead")
    return images[0]


def _layout(image: ir.Value, preprocess: ImagePreprocess) -> tuple[str, int, tuple[int, int]]:
    """(NCHW or NHWC, channels, (height, width))."""
    dims = list(image.shape)
    if dims[1] in (1, 3):
        layout, channels, spatial = "NCHW", dims[1], dims[2:]
    elif dims[3] in (1, 3):
        layout, channels, spatial = "NHWC", dims[3], dims[1:3]
    else:
        raise SlimgraphError(f"input '{image.name}' ({'×'.join(map(str, dims))}) has no axis of 1 or 3 channels "
                             "to read images into")
    if preprocess.size:
        if any(isinstance(d, int) and d != wanted for d, wanted in zip(spatial, preprocess.size)):
            raise SlimgraphError(f"calibration images: size={list(preprocess.size)}, but input '{image.name}' "
                                 f"takes {'×'.join(map(str, spatial))}")
        return layout, channels, (preprocess.size[0], preprocess.size[1])
    if not all(isinstance(d, int) for d in spatial):
        raise SlimgraphError(f"input '{image.name}' has a symbolic height or width ({'×'.join(map(str, dims))}): "
                             "say the size to resize to, e.g. --calib 'photos/{size=[320,320]}'")
    return layout, channels, (int(spatial[0]), int(spatial[1]))


def pillow():
    try:
        from PIL import Image
    except ImportError:
        raise SlimgraphError("reading a folder of images needs Pillow: pip install 'slimgraph[images]'") from None
    return Image

