"""prune-width on real models: fidelity floors, widths, GQA, conv channels, backends, bad input."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.ir.structure import discover
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.measure.stats import model_stats
from slimgraph.passes import PassContext, Pipeline
from tests.conftest import LIGHT_DIR, copy_model


def pruned(model, text: str, ctx: PassContext | None = None):
    model = copy_model(model)
    report = Pipeline.parse(text).run(model, ctx or PassContext(), verify=False)
    return model, report.records[0].stats


@pytest.mark.slow
@pytest.mark.parametrize("text, floor", [
    ("prune-width{target=ffn,ratio=0.25}", 0.96),  # measured 0.971 (0.926 without compensation)
    ("prune-width{target=heads,ratio=0.25}", 0.95),  # measured 0.960
])
def test_minilm_fidelity_floor(minilm, sentence_eval, text, floor):
    model, stats = pruned(minilm, text, sentence_eval.context())
    assert sentence_eval.cosines(model).mean() >= floor
    found = discover(model)
    if "ffn" in text:
        assert [f.inner for f in found.ffns] == [1152] * 6 and stats["kept"] == "6 × ffn 1536→1152"
    else:
        assert [a.heads for a in found.attention] == [9] * 6 and stats["kept"] == "6 × heads 12→9"


@pytest.mark.slow
def test_wanda_beats_magnitude_on_minilm(minilm, sentence_eval):
    """Without compensation, the score alone decides: activations matter (0.926 vs 0.859 measured)."""
    cosines = {}
    for importance in ("wanda", "magnitude"):
        model, _ = pruned(minilm, f"prune-width{{ratio=0.25,importance={importance},compensate=none}}",
                          sentence_eval.context())
        cosines[importance] = sentence_eval.cosines(model).mean()
    assert cosines["wanda"] > cosines["magnitude"] + 0.02


def test_rounded_widths_and_global_scope(llama_ir):
    model, stats = pruned(llama_ir, "prune-width{target=ffn,ratio=0.3,scope=global,importance=magnitude}")
    widths = [f.inner for f in discover(model).ffns]
    assert all(w % 8 == 0 for w in widths) and sum(widths) < 3 * 176
    assert evaluate.run(model, sample_inputs(model))["logits"].shape[-1] == 1000


def test_grouped_query_heads(llama_ir):
    """4 query heads in 2 KV groups: ratio 0.5 takes one from each group; 0.25 cannot be split evenly."""
    model, stats = pruned(llama_ir, "prune-width{target=heads,ratio=0.5}")
    assert {(a.heads, a.kv_heads) for a in discover(model).attention} == {(2, 2)}
    assert stats["kept"] == "3 × heads 4→2"
    model, _ = pruned(llama_ir, "prune-width{target=kv-heads,ratio=0.5}")
    assert {(a.heads, a.kv_heads) for a in discover(model).attention} == {(2, 1)}
    with pytest.raises(SlimgraphError, match="same number from each"):
        pruned(llama_ir, "prune-width{target=heads,ratio=0.25}")


def test_resnet50_channels_halved():
    model = ir.load(LIGHT_DIR / "light_resnet50.onnx")
    before = model_stats(model).flops
    pruned_model, stats = pruned(model, "prune-width{target=channels,ratio=0.5,importance=magnitude,compensate=none}")
    assert model_stats(pruned_model).flops < 0.35 * before  # both sides of most convs halve
    assert evaluate.run(pruned_model, sample_inputs(pruned_model, batch=1))["gpu_0/softmax_1"].shape == (1, 1000)
    assert collections.Counter(g.kind for g in discover(pruned_model).groups)["channels"] == 37


def test_channels_that_meet_in_one_reshape_shrink_it_together(tmp_path, capsys):
    """Inception-v2's four branches are concatenated and flattened by one Reshape: each branch's group
    shrinks the Reshape's 1024 by its own channels. Kept apart, the four edits disagreed and the
    pass raised a ValueError (a traceback from `--goal` on this zoo file)."""
    out = tmp_path / "pruned.onnx"
    assert main(["optimize", str(LIGHT_DIR / "light_inception_v2.onnx"), "-p",
                 "prune-width{target=channels,ratio=0.5}", "-o", str(out), "--json"]) == 0
    pruned_model = ir.load(out)
    [logits] = evaluate.run(pruned_model, sample_inputs(pruned_model, batch=1)).values()
    assert logits.shape == (1, 1000)
    [classifier] = [n for n in pruned_model.graph if n.op_type == "Gemm"]
    flatten = classifier.inputs[0].producer()
    assert flatten.op_type == "Reshape"
    assert flatten.inputs[1].const_value.numpy().tolist() == [1, 512]  # the branches' 1024 channels, halved together


@pytest.mark.slow
def test_pruned_minilm_runs_and_trains_in_pytorch(minilm):
    import torch

    import slimgraph

    model, _ = pruned(minilm, "prune-width{target=all,ratio=0.25,importance=magnitude,compensate=none}")
    feeds = minilm.meta["slimgraph.example_inputs"][0]
    artifact = slimgraph.compile(model, backend="pytorch")
    want = evaluate.run(model, feeds)["last_hidden_state"]
    got = artifact(**feeds)["last_hidden_state"]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    out = artifact.module(*[torch.from_numpy(feeds[n]) for n in artifact.input_names])
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in artifact.module.parameters())
    ffn = artifact.module.get_parameter("encoder.layer.0.intermediate.dense.weight")
    assert ffn.shape == (1152, 384)  # nn.Linear's [out, in]
    assert "self.intermediate.dense = nn.Linear(384, 1152)" in artifact.code.source


@pytest.mark.slow
def test_diff_shows_what_shrank(tmp_path, minilm_onnx, capsys):
    out = tmp_path / "pruned.onnx"
    assert main(["optimize", str(minilm_onnx), "-p", "prune-width{ratio=0.25,importance=magnitude,compensate=none}",
                 "-o", str(out), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["diff", str(minilm_onnx), str(out), "--depth", "4"]) == 1
    printed = capsys.readouterr().out
    assert "384×1536" in printed and "384×1152" in printed and "×6" in printed


@pytest.mark.parametrize("args, message", [
    (["-p", "prune-width{ratio=1.5}"], "ratio must be in [0, 1)"),
    (["-p", "prune-width{target=heads}"], "target=heads found nothing to prune"),
    (["-p", "prune-width{target=ffn,keep=[nothing*]}"], "found nothing to prune"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    model = LIGHT_DIR / "light_vgg19.onnx"
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("target", ["heads", "ffn"])
def test_no_value_keeps_its_shape_from_before_pruning(minilm, target):
    """Every resized activation's shape is inferred again (a head's Q/K/V projection output kept
    [B, S, 384] after 3 of 12 heads went, which stopped ONNX Runtime's attention fusion)."""
    import onnx

    Pipeline.parse(f"prune-width{{target={target},ratio=0.25}}").run(minilm, verify=False)
    proto = ir.serde.serialize_model(minilm)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # raises where a stored shape disagrees


def test_pruned_heads_keep_a_known_head_count_and_still_fuse(minilm):
    """The exporter reshapes heads as [B, S, -1, 32]: shape inference cannot recover the count
    after pruning, so the group writes it (9 of 12), and ONNX Runtime's attention fusion matches."""
    Pipeline.parse("prune-width{target=heads,ratio=0.25,importance=magnitude,compensate=none}").run(minilm,
                                                                                                   verify=False)
    head_shapes = {tuple(v.shape)[1:] for n in minilm.graph if n.op_type in ("Reshape", "Transpose")
                   for v in n.outputs if v.shape is not None and len(v.shape) == 4}
    assert all(9 in dims and 12 not in dims for dims in head_shapes), head_shapes
    Pipeline.parse("fuse-ort").run(minilm, verify=False)
    attention = [n for n in minilm.graph if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 6 and {n.attributes.get_int("num_heads") for n in attention} == {9}


@pytest.mark.slow
def test_the_pruned_minilm_recipe_keeps_its_fidelity_floor(minilm, sentence_eval):
    """recipes/minilm-pruned.yaml (FFN 25%, fused ops, W8A8), on its own calibration file: measured 0.963
    on the held-out sentences; its own verification (the file's last 8 sentences) holds max_drop."""
    recipe = Pipeline.from_recipe(Path(__file__).parents[3] / "recipes" / "minilm-pruned.yaml")
    report = recipe.run(minilm)
    assert sentence_eval.cosines(minilm).mean() >= 0.95
    ops = collections.Counter(n.op_type for n in minilm.graph)
    assert ops["MultiHeadAttention"] == 6 and ops["MatMulInteger"] == 37 and "SkipLayerNormalization" not in ops
    assert report.records[1].stats["kept"] == "6 × ffn 1536→1152"
