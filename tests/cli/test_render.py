"""What the commands print, at 80 and 120 columns (golden renders), and the progress display.

Measured numbers that vary between machines (seconds, fidelity on another CPU's kernels) are
replaced by fixed ones before rendering; everything else comes from real runs.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
from rich.console import Console

import slimgraph
from slimgraph.bench import BenchResult, Latency
from slimgraph.measure.diff import diff_models
from slimgraph.measure.fidelity import Fidelity
from slimgraph.passes import Pipeline, get_pass_class
from slimgraph.passes._infra.registry import builtin_passes
from slimgraph.report import (
    TerminalProgress,
    ratio_label,
    render_bench,
    render_diff,
    render_pass_list,
    render_pipeline_report,
    render_search,
    render_summary,
    shorten_left,
    wrap_pipeline,
)
from tests.conftest import LIGHT_DIR, assert_golden, copy_model, render_text

WIDTHS = (80, 120)


def fits(text: str, width: int) -> bool:
    return all(len(line.rstrip()) <= width for line in text.splitlines())


def test_wrap_pipeline_breaks_at_option_boundaries():
    text = "cleanup,quantize-weights{bits=4,group_size=32,method=awq,embeddings=true,accuracy_level=4}"
    assert wrap_pipeline(text, 30) == ("cleanup,\n"
                                       "quantize-weights{bits=4,\n"
                                       "  group_size=32,method=awq,\n"
                                       "  embeddings=true,\n"
                                       "  accuracy_level=4}")
    assert wrap_pipeline(text, 200) == "cleanup,\n" + text.removeprefix("cleanup,")
    assert wrap_pipeline("quantize-weights{exclude=[a,b]}", 18) == "quantize-weights{\n  exclude=[a,b]}"


def test_shorten_left_keeps_the_end():
    assert shorten_left("encoder.layer.0.attention.self.query.weight", 20) == "…n.self.query.weight"
    assert shorten_left("short", 20) == "short"


@pytest.mark.parametrize("width", WIDTHS)
def test_pass_list_golden(width):
    classes = [get_pass_class(name) for name in sorted(builtin_passes())]
    text = render_text(render_pass_list(classes), width)
    assert fits(text, width)
    assert_golden(f"passes_{width}.txt", text)


def _fixed(fidelity: Fidelity, cosine: float) -> Fidelity:
    outputs = tuple(dataclasses.replace(o, cosine=cosine - 0.001 * i, rel_l2=0.0123, max_abs=0.5,
                                        max_rel_error=0.02 * (i + 1)) for i, o in enumerate(fidelity.outputs))
    return Fidelity(outputs)


@pytest.mark.parametrize("width", WIDTHS)
def test_optimize_report_golden(width, mlp_model):
    report = Pipeline("quantize-weights{bits=4,group_size=16,method=awq,exclude=[fc2],accuracy_level=4},"
                      "cleanup").run(mlp_model)
    quantize, cleanup = report.records
    quantize.seconds, cleanup.seconds = 1.25, 0.03
    quantize.fidelity = _fixed(quantize.fidelity, 0.98765)
    cleanup.fidelity = quantize.fidelity
    cleanup.exact_check = Fidelity(tuple(dataclasses.replace(o, max_rel_error=0.0) for o in cleanup.exact_check.outputs))
    text = render_text(render_pipeline_report(report, output="out/mlp-awq.onnx"), width)
    assert fits(text, width)
    assert "method=awq" in text and "accuracy_level=4}" in text  # never split inside an option
    assert_golden(f"optimize_mlp_{width}.txt", text)


def test_low_fidelity_shows_in_the_report(mlp_model):
    import tests.passes.test_pipeline  # noqa: F401  (registers test-noise)

    report = Pipeline("test-noise{scale=3.0}").run(mlp_model)
    text = render_text(render_pipeline_report(report), 80)
    assert "warning: LOW FIDELITY (see the" in text  # named in its row
    assert "max-drop" not in text  # the whole warning is on stderr, once
    assert "set --max-drop" in report.warnings[0]


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_golden_widths(width, minilm_onnx):
    text = render_text(render_summary(slimgraph.inspect(minilm_onnx)), width)
    assert fits(text, width)
    assert_golden(f"inspect_minilm_{width}.txt", text)


def test_inspect_cnn_golden():
    text = render_text(render_summary(slimgraph.inspect(LIGHT_DIR / "light_inception_v2.onnx")), 80)
    assert fits(text, 80) and "+1 more" in text
    assert_golden("inspect_inception_v2_80.txt", text)


@pytest.mark.parametrize("width", WIDTHS)
def test_diff_golden_widths(width, mlp_model):
    after = copy_model(mlp_model)
    Pipeline("cleanup").run(after)
    result = diff_models(mlp_model, after, weights=True, a_name="models/mlp.onnx", b_name="out/mlp-cleanup.onnx")
    text = render_text(render_diff(result), width)
    assert fits(text, width)
    assert_golden(f"diff_mlp_cleanup_{width}.txt", text)


def _bench_results() -> list[BenchResult]:
    def result(name, scale, size, rss):
        runs = [(1 + 0.02 * (i % 5 - 2)) * scale for i in range(10)]  # ±4% around the median, in each round
        return BenchResult(name=name, file_bytes=size, peak_rss_mb=rss,
                           latency=[Latency(1, 10.0 * scale, 12.5 * scale, 100 / scale, tuple(10 * r for r in runs)),
                                    Latency(8, 40.0 * scale, 44.0 * scale, 200 / scale, tuple(40 * r for r in runs))],
                           skipped={16: f"{name}: input 'input_ids' is fixed at batch 8 (8×128)"})

    return [result("models/minilm-fp32.onnx", 1.0, 90_868_000, 180.0),
            result("out/minilm-int4-awq.onnx", 1.17, 14_700_000, 95.5)]


@pytest.mark.parametrize("width", WIDTHS)
def test_bench_golden(width):
    results = _bench_results()
    for r in results:
        r.skipped = {}
    text = render_text(render_bench(results), width)
    assert fits(text, width)
    assert "latency p50, batch 1  1.17x (slower, 1.17–1.17)" in text
    assert "throughput, batch 8   0.85x (slower, 0.85–0.85)" in text
    assert_golden(f"bench_{width}.txt", text)


def _search_result():
    from slimgraph.search import Candidate, SearchResult

    mb = 1_000_000
    candidates = [
        Candidate("cleanup", cosine=1.0, bytes=90 * mb, latency={1: 1.0, 8: 0.99}),
        Candidate("cleanup,fuse-ort,quantize-dynamic{exclude=[encoder.layer.0.*,encoder.layer.#.output.dense]}",
                  cosine=0.9931, bytes=24 * mb, latency={1: 0.41, 8: 0.38}),
        Candidate("cleanup,prune-width{target=channels,ratio=0.25},quantize-static",
                  status="left out: prune-width: target=channels found nothing to prune: looked for Conv "
                         "output channels read by a Conv, BatchNorm or a per-channel op"),
        Candidate("cleanup,quantize-weights{bits=4,accuracy_level=4}", status="over budget: cosine 0.9712 < 0.99"),
    ]
    return SearchResult("latency", 0.01, 90 * mb, candidates, candidates[1])


@pytest.mark.parametrize("width", WIDTHS)
def test_goal_candidates_golden(width):
    text = render_text(render_search(_search_result()), width)
    assert fits(text, width)
    assert "→" in next(line for line in text.splitlines() if "0.9931" in line)
    assert_golden(f"goal_{width}.txt", text)


def test_bench_not_run_rows_have_no_figures():
    text = render_text(render_bench(_bench_results()[:1]), 80)
    row = next(line for line in text.splitlines() if line.split()[:1] == ["16"])
    assert row.split() == ["16", "not", "run"]
    assert "batch 16 not run: models/minilm-fp32.onnx: input 'input_ids' is fixed at batch 8" in " ".join(text.split())


@pytest.mark.parametrize("key, value, expected", [
    ("p50_batch1", 1.17, ("latency p50, batch 1", "1.17x (slower)")),
    ("p50_batch8", 0.5, ("latency p50, batch 8", "0.50x (faster)")),
    ("throughput_batch8", 1.3, ("throughput, batch 8", "1.30x (faster)")),
    ("file_bytes", 0.16, ("file size", "0.16x (smaller)")),
    ("peak_rss_mb", 1.001, ("peak memory", "1.00x (same)")),
])
def test_ratio_labels_say_the_direction(key, value, expected):
    assert ratio_label(key, value) == expected


@pytest.mark.parametrize("value, interval, expected", [
    (0.89, (0.84, 1.03), "0.89x (within noise, 0.84–1.03)"),
    (1.06, (0.97, 1.10), "1.06x (within noise, 0.97–1.10)"),
    (1.17, (1.12, 1.22), "1.17x (slower, 1.12–1.22)"),
])
def test_a_timing_within_its_interval_of_one_is_noise(value, interval, expected):
    assert ratio_label("p50_batch1", value, interval)[1] == expected


def test_progress_draws_stages_passes_and_layers(mlp_model):
    console = Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)
    with TerminalProgress(enabled=True, console=console) as progress:
        with progress.stage("loading mlp.onnx") as say:
            say("reading the export from the cache")
        Pipeline("quantize-weights{group_size=16},cleanup").run(mlp_model, progress=progress.step,
                                                                instruments=progress.passes(2))
    drawn = console.file.getvalue()
    for expected in ("loading mlp.onnx: reading the export from the cache", "pass quantize-weights{group_size=16}",
                     "rtn int4", "1/2", "pass cleanup"):
        assert expected in drawn, expected


def test_progress_shows_what_the_user_typed_as_text_not_markup():
    """`merge-lora{adapter=/abs/path/lora}` once crashed the bar (rich read `[/abs/path/lora]` as a closing tag)."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    typed = "merge-lora{adapter=[/abs/path/lora]}"
    with TerminalProgress(enabled=True, console=console) as progress:
        with progress.stage(f"pass {typed}"):
            pass
        progress.step("[bold]layers[/bold]", 1, 2)
    drawn = console.file.getvalue()
    assert typed in drawn and "[bold]layers[/bold]" in drawn


def test_a_change_tree_stops_at_a_screenful():
    from slimgraph.measure.diff import Change
    from slimgraph.report import MAX_TREE_LINES, render_change_tree

    changes = [Change(f"block{i}.x", "removed", before="Relu") for i in range(100)]
    text = render_text(render_change_tree(changes, 1, "changes", 80), width=80)
    assert len(text.splitlines()) <= MAX_TREE_LINES + 2
    assert text.rstrip().endswith(f"{100 - MAX_TREE_LINES // 2} more changes (--json for all)")


@pytest.mark.parametrize("width", WIDTHS)
def test_triton_lowering_fits_and_folds_what_is_left(width):
    import collections

    from slimgraph.backends.triton.plan import LoweringReport
    from slimgraph.report import render_lowering

    report = LoweringReport(
        kernels={f"matmul_nbits_{i}": ("MatMulNBits + bias", 6) for i in range(4)},
        triton=collections.Counter({"com.microsoft::MatMulNBits": 24, "Add": 24, "Gelu": 6}),
        pytorch=collections.Counter({"Softmax": 6, "LayerNormalization": 13, "Gather": 3, "Reshape": 48}),
        left=[("com.microsoft::MatMulNBits", f"/encoder/layer.{i}/attention/query/MatMulNBits", "a g_idx input")
              for i in range(6)])
    text = render_text(render_lowering(report), width)
    assert fits(text, width)
    flat = " ".join(text.split())
    assert "left to PyTorch: com.microsoft::MatMulNBits ×6: a g_idx input" in flat and "(6 in all)" in flat


def test_disabled_progress_draws_nothing(mlp_model):
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with TerminalProgress(enabled=False, console=console) as progress:
        with progress.stage("loading"):
            pass
        assert progress.passes(1) == []
        Pipeline("quantize-weights{group_size=16}").run(mlp_model, progress=progress.step)
    assert console.file.getvalue() == ""
