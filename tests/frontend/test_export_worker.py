"""With a display live (`load(stage=...)`), the export runs in a worker process: the loading process
never builds the torch model, so torch never holds its GIL and its spinner keeps moving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.frontend import cache, load
from slimgraph.frontend.export_worker import run_in_worker

# A script, not this process: whether the model's module was imported is the evidence, and the
# test session imports transformers' Llama elsewhere.
LOAD_WITH_A_DISPLAY = """
import json, sys
import slimgraph
said = []
model = slimgraph.load(sys.argv[1], stage=said.append)
print(json.dumps({"said": said, "nodes": len(model.graph),
                  "model_module_here": "transformers.models.llama.modeling_llama" in sys.modules}))
"""


def run_load(folder: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_A_DISPLAY, str(folder)], capture_output=True, text=True,
                          env=os.environ | env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_load_with_a_display_exports_in_a_worker_then_reads_the_cache(llama_folder, llama_ir, tmp_path):
    env = {"SLIMGRAPH_CACHE": str(tmp_path / "cache")}
    first = run_load(llama_folder, env)
    assert first["said"] == ["looking in the export cache",
                             cache.EXPORTING + " in a worker process"]
    assert not first["model_module_here"]  # the torch model was built and exported elsewhere
    assert first["nodes"] == len(llama_ir.graph)
    again = run_load(llama_folder, env)
    assert again["said"] == ["looking in the export cache", "reading the export from the cache"]

    off = run_load(llama_folder, env | {"SLIMGRAPH_NO_CACHE": "1"})
    assert off["said"] == [cache.EXPORTING + " in a worker process (the export cache is off)"]
    assert not off["model_module_here"] and off["nodes"] == len(llama_ir.graph)


def test_a_users_error_in_the_worker_comes_back_as_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(SlimgraphError, match="transformers cannot load"):
        load(folder, stage=lambda what: None)
    assert not (tmp_path / "cache" / "exports").exists()  # nothing half-written


def test_a_worker_that_dies_is_a_clear_error():
    with pytest.raises(SlimgraphError, match="worker process ended with exit code"):
        run_in_worker(os.abort)


@pytest.mark.slow
def test_a_cache_that_cannot_be_written_exports_in_this_process(gpt2_folder, tmp_path, monkeypatch):
    """As without a display, a cache it cannot write (a file where its folder should be) fails nothing."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(blocked))
    monkeypatch.delenv("SLIMGRAPH_NO_CACHE", raising=False)
    said = []
    model = load(gpt2_folder, stage=said.append)
    assert said[-1] == cache.EXPORTING + " in a worker process" and len(model.graph) > 0
