"""Targets: where the model will run, as far as the passes care.

Int8 kernels differ by CPU: ONNX Runtime's U8S8 GEMM on AVX2 without VNNI multiplies pairs with
`vpmaddubsw`, whose int16 sums saturate, so a W8A8 model there loses accuracy unless its weights
use 7 bits (reduce_range) or are stored as uint8 (U8U8, another kernel). With AVX-512 VNNI or
AVX-VNNI the sums are exact. `detect()` reads the running machine (the default target);
`--target` names another.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimgraph.errors import SlimgraphError

if TYPE_CHECKING:
    from slimgraph.workers import Workers

# What each named target promises (a detected target carries the machine's own flags).
FEATURES = {
    "cpu": frozenset(),
    "cpu-avx2": frozenset({"avx2"}),
    "cpu-avx512": frozenset({"avx2", "avx512f"}),
    "cpu-vnni": frozenset({"avx2", "avx512f", "avx512_vnni"}),
    "cuda": frozenset(),
}
NAMES = tuple(FEATURES)


@dataclass(frozen=True)
class Target:
    name: str
    features: frozenset[str] = frozenset()
    resource: str | None = None  # `--target ray:NAME`: the Ray node resource of the machine (`slimgraph.workers`)

    @property
    def vnni(self) -> bool:
        """Exact int8 dot products (AVX-512 VNNI or AVX-VNNI)."""
        return bool({"avx512_vnni", "avx_vnni"} & self.features)

    @property
    def int8_saturates(self) -> bool:
        """U8S8 int8 GEMM saturates its int16 pair sums (x86 AVX2 without VNNI)."""
        return "avx2" in self.features and not self.vnni

    def describe(self) -> str:
        shown = sorted(self.features & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
        return self.name + (f" ({', '.join(shown)})" if shown else "") + (
            f" on ray:{self.resource}" if self.resource else "")


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def detect() -> Target:
    """The machine slimgraph runs on (CPU features; CUDA is only ever asked for, never assumed)."""
    features = cpu_features()
    if {"avx512_vnni", "avx_vnni"} & features:
        name = "cpu-vnni"
    elif "avx512f" in features:
        name = "cpu-avx512"
    elif "avx2" in features:
        name = "cpu-avx2"
    else:
        name = "cpu"
    if platform.machine().lower() in ("arm64", "aarch64"):
        name = "cpu"
    return Target(name, features)


def parse(text: str | None, workers: Workers | None = None) -> Target:
    """A target by name; None or "auto": the running machine; `ray:NAME`: the machine of the Ray
    cluster that has the node resource NAME, as `workers` (Ray) detect it there."""
    if text in (None, "auto"):
        return detect()
    if text.startswith("ray:") and len(text) > 4:
        if workers is None or workers.name != "ray":
            raise SlimgraphError(f"--target {text} names a Ray node; it needs --workers ray")
        return workers.call(on_node, None, None, text[4:], resource=text[4:])
    if text not in NAMES:
        raise SlimgraphError(f"--target: unknown target '{text}' (known: auto, ray:NODE-RESOURCE, {', '.join(NAMES)})")
    return Target(text, FEATURES[text])


def on_node(model: Any, shared: Any, resource: str) -> Target:
    """The machine this runs on, as a Ray task on the node that has `resource` (a `workers` task)."""
    return Target(detect().name, detect().features, resource)
