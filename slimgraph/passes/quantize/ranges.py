"""Activation ranges for static quantization, from the calibration feeds: each tensor's (low, high)
float range, mapped later onto uint8 levels (`uint8_params`).

- `minmax`: the smallest and largest value seen (ONNX Runtime's default);
- `percentile`: the range that holds all but the `percentile`'s tails of the values, read from a
  histogram (2048 bins over the min-max range);
- `mse`: the range, shrunk from the min-max one, whose uint8 rounding and clipping have the least
  squared error over the histogram;
- `entropy`: the range whose 8-bit histogram diverges least (KL) from the float one — TensorRT's
  calibration, as ONNX Runtime's `HistogramCollector` computes it (reused, not rewritten).

Every method but minmax runs the calibration feeds twice (min-max first, then the histograms over
it), so no tensor's values are held beyond one feed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

Method = Literal["minmax", "percentile", "mse", "entropy"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")
BINS = 2048
Feeds = Mapping[str, np.ndarray]
Ranges = dict[str, tuple[float, float]]


def activation_ranges(captures: Iterable[Mapping[str, np.ndarray]], method: str, percentile: float = 99.999,
                      again: Iterable[Mapping[str, np.ndarray]] | None = None) -> Ranges:
    """name → (low, high) over every captured feed. `captures` yields each feed's values; the
    histogram methods also need `again`, the same values a second time."""
    ranges = _minmax(captures)
    if method == "minmax":
        return ranges
    if again is None:
        raise ValueError(f"the {method} method reads the calibration values twice")
    if method == "entropy":
        return _entropy(again, ranges)
    histograms = {name: np.zeros(BINS, np.int64) for name in ranges}
    for values in again:
        for name, array in values.items():
            low, high = ranges[name]
            if high > low:
                histograms[name] += np.histogram(array, bins=BINS, range=(low, high))[0]
    pick = _percentile_range if method == "percentile" else _mse_range
    return {name: pick(histograms[name], *ranges[name], percentile) if ranges[name][1] > ranges[name][0]
            else ranges[name] for name in ranges}


def uint8_params(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of the uint8 levels over [low, high] widened to hold 0 (0 exactly representable)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = np.float32((high - low) / 255.0)
    if not scale > 0:
        return np.float32(1.0), np.uint8(0)
    return scale, np.uint8(np.clip(np.rint(-low / scale), 0, 255))


def _minmax(captures: Iterable[Mapping[str, np.ndarray]]) -> Ranges:
    ranges: Ranges = {}
    for values in captures:
        for name, array in values.items():
            if array.size == 0:
                continue
            low, high = float(array.min()), float(array.max())
            old = ranges.get(name)
            ranges[name] = (low, high) if old is None else (min(old[0], low), max(old[1], high))
    return ranges


def _percentile_range(histogram: np.ndarray, low: float, high: float, percentile: float) -> tuple[float, float]:
    cumulative = np.cumsum(histogram) / max(histogram.sum(), 1)
    tail = (100.0 - percentile) / 100.0
    edges = np.linspace(low, high, BINS + 1)
    first = int(np.searchsorted(cumulative, tail, side="right"))
    last = int(np.searchsorted(cumulative, 1.0 - tail, side="left"))
    return float(edges[first]), float(edges[min(last + 1, BINS)])


def _mse_range(histogram: np.ndarray, low: float, high: float, _percentile: float = 0.0,
               steps: Sequence[float] = tuple(np.linspace(0.2, 1.0, 81))) -> tuple[float, float]:
    """The min-max range scaled by each of `steps`, scored by the squared error of the bins' centres."""
    edges = np.linspace(low, high, BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_error = (low, high), np.inf
    for step in steps:
        scale, zero_point = uint8_params(low * step, high * step)
        codes = np.clip(np.rint(centres / scale) + int(zero_point), 0, 255)
        error = float(histogram @ np.square((codes - int(zero_point)) * scale - centres))
        if error < best_error:
            best, best_error = (low * step, high * step), error
    return best


def _entropy(captures: Iterable[Mapping[str, np.ndarray]], ranges: Ranges) -> Ranges:
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector("entropy", symmetric=False, num_bins=BINS, num_quantized_bins=128,
                                   percentile=99.999, scenario="same")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines, which would corrupt --json
        for values in captures:
            collector.collect({name: [array] for name, array in values.items() if name in ranges})
        found = collector.compute_collection_result()
    return {name: (float(found[name][0]), float(found[name][1])) if name in found else ranges[name]
            for name in ranges}
