"""Greedy decoding of SmolLM2-135M-Instruct against the runtimes an LLM user would pick instead.

Contenders, each in its own worker process (its peak RSS is its own), run in turn one generation
at a time, the order reversed every other round:

- slimgraph's outputs, built with `slimgraph optimize … --kv-cache` (Verify and the checker after every
  pass; a decoder's weights go to `.data`, as GenAI's builder writes them) and run as `slimgraph bench
  --new-tokens` runs them (`bench.decoder_session`: the weights memory-mapped by ONNX Runtime) by
  `slimgraph.generate`'s SessionDecoder: fp32 as exported, fp32 fused
  (`fuse-ort`: GroupQueryAttention, RotaryEmbedding, RMSNorm), int4 (rtn g32, accuracy level 4,
  embeddings and the tied head shared), trim-vocab + int4, prune-depth + int4;
  (prune-depth, moe-convert and trim-vocab calibrated on 64 pydoc paragraphs);
- ONNX Runtime GenAI's model builder on the same folder (fp32 and int4), run by its own generator;
- llama.cpp (`llama-cpp-python`, if installed) on the original Q4_1 GGUF.

Printed per contender: decode tokens/s (median, min–max over the rounds), time to first token,
peak RSS (the worker's VmHWM), file size, and how many of the 64 greedy tokens equal
transformers' fp32 greedy output before the first difference. Batch 1, 2 threads, one prompt; the
end-of-sequence token is suppressed everywhere (transformers' `min_new_tokens`, GenAI's
`min_length`), so that every contender generates all 64.

    .venv/bin/python benchmarks/decode.py [--rounds 4] [--new-tokens 64] [--only NAME,…]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = ("Write a detailed explanation of how a compiler turns source code into machine code, covering "
          "parsing, optimization and code generation.")
INT4 = "quantize-weights{bits=4,embeddings=true,accuracy_level=4}"
PIPELINES = {
    "slimgraph fp32": "cleanup",
    "slimgraph fp32 fused": "cleanup,fuse-ort",
    "slimgraph int4 (unfused)": f"cleanup,{INT4}",
    "slimgraph int4": f"cleanup,fuse-ort,{INT4}",
    "slimgraph trim-vocab + int4": f"cleanup,trim-vocab,fuse-ort,{INT4}",
    "slimgraph prune-depth + int4": f"cleanup,prune-depth{{blocks=4}},fuse-ort,{INT4}",
    "slimgraph moe-convert + int4": f"cleanup,moe-convert,fuse-ort,{INT4}",
}
CALIBRATED = ("trim-vocab", "prune-depth", "moe-convert")
THREADS = 2


# --- the workers -------------------------------------------------------------------------------


def worker(kind: str, path: str, prompt_ids: list[int], new_tokens: int, eos: int) -> None:
    """Load one contender, then answer each line on stdin with one timed generation (JSON)."""
    generate = _generator(kind, path, prompt_ids, new_tokens, eos)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        first, rest, tokens = generate()
        print(json.dumps({"first_ms": first * 1e3, "rate": (new_tokens - 1) / rest, "tokens": tokens}), flush=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _generator(kind: str, path: str, prompt_ids: list[int], new_tokens: int, eos: int):
    import numpy as np

    ids = np.array([prompt_ids], np.int64)
    if kind == "slimgraph":
        import slimgraph
        from slimgraph.bench import decoder_session
        from slimgraph.generate import SessionDecoder
        from slimgraph.measure import evaluate

        model = slimgraph.load(path)
        decoder = SessionDecoder(model, decoder_session(Path(path), model, evaluate.session_options(THREADS)))

        def pick(logits):
            logits[:, eos] = -np.inf
            return int(logits.argmax(-1)[0])

        def generate():
            start = time.perf_counter()
            logits = decoder.start(ids, np.ones_like(ids), capacity=ids.shape[1] + new_tokens)
            first = time.perf_counter()
            tokens = [pick(logits)]
            for _ in range(new_tokens - 1):
                tokens.append(pick(decoder.advance(np.array(tokens[-1:]))))
            return first - start, time.perf_counter() - first, tokens
        return generate
    if kind == "genai":
        import onnxruntime_genai as og

        model = og.Model(path)  # its genai_config.json sets the thread count (`build`)

        def generate():
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=ids.shape[1] + new_tokens, min_length=ids.shape[1] + new_tokens,
                                      do_sample=False)
            generator = og.Generator(model, params)
            start = time.perf_counter()
            generator.append_tokens(ids)
            generator.generate_next_token()
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                generator.generate_next_token()
            rest = time.perf_counter() - first
            return first - start, rest, [int(t) for t in generator.get_sequence(0)[ids.shape[1]:]]
        return generate
    if kind == "llama.cpp":
        from llama_cpp import Llama, LogitsProcessorList

        llm = Llama(model_path=path, n_threads=THREADS, n_ctx=ids.shape[1] + new_tokens + 8, verbose=False)

        def without_eos(_, scores):
            scores[eos] = -np.inf
            return scores

        def generate():
            llm.reset()
            start = time.perf_counter()
            tokens, first = [], 0.0
            for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True,
                                      logits_processor=LogitsProcessorList([without_eos])):
                if not tokens:
                    first = time.perf_counter()
                tokens.append(int(token))
                if len(tokens) == new_tokens:
                    break
            return first - start, time.perf_counter() - first, tokens
        return generate
    raise ValueError(kind)


class Worker:
    def __init__(self, name: str, kind: str, path: Path, prompt_ids: list[int], new_tokens: int, eos: int) -> None:
        self.name, self.path = name, path
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, str(path), json.dumps(prompt_ids), str(new_tokens), str(eos)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker died (exit {self.process.wait()})")
        return json.loads(line)

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> float:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        peak = self._read()["peak_rss_mb"]
        self.process.wait()
        return peak


# --- building the contenders ---------------------------------------------------------------------


def build(folder: Path, work: Path, only: set[str] | None) -> list[tuple[str, str, Path]]:
    from slimgraph.zoo import smollm2, text

    contenders = []
    calib = work / "calib.txt"
    calib.write_text("\n".join(p.replace("\n", " ") for p in text.calibration_texts(64)))
    for name, pipeline in PIPELINES.items():
        if only and name not in only:
            continue
        out = work / (name.replace(" ", "_").replace("+", "and") + ".onnx")
        command = [str(ROOT / ".venv/bin/slimgraph"), "optimize", str(folder), "--kv-cache", "-p", pipeline,
                   "-o", str(out), "--json"]
        if any(name in pipeline for name in CALIBRATED):
            command += ["--calib", str(calib)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: slimgraph optimize failed: {done.stderr.strip()}", file=sys.stderr)
            continue
        contenders.append((name, "slimgraph", out))
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("onnxruntime-genai is not installed: its rows are left out (pip install onnxruntime-genai)")
    else:
        for precision in ("fp32", "int4"):
            name = f"ORT GenAI builder {precision}"
            if only and name not in only:
                continue
            out = work / f"genai_{precision}"
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                            "-p", precision, "-e", "cpu", "-c", str(work / "genai_cache")],
                           check=True, capture_output=True)
            config = json.loads((out / "genai_config.json").read_text())
            config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
            (out / "genai_config.json").write_text(json.dumps(config, indent=4))
            contenders.append((name, "genai", out))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: its row is left out (pip install llama-cpp-python)")
    else:
        if not only or "llama.cpp Q4_1" in only:
            contenders.append(("llama.cpp Q4_1", "llama.cpp", smollm2.gguf_file()))
    return contenders


def transformers_tokens(folder: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' fp32 greedy continuation: the tokens every contender is held to."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in (".onnx", ".data", ".gguf")]
    extra = [path.with_name(path.name + ".data")] if path.is_file() else []
    return sum(f.stat().st_size for f in files + [e for e in extra if e.exists()]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated contender names")
    args = parser.parse_args()

    from slimgraph.frontend.calibration import load_tokenizer
    from slimgraph.zoo import smollm2

    folder = smollm2.hf_folder()
    tokenizer = load_tokenizer(folder)
    prompt_ids, eos = list(tokenizer(PROMPT)["input_ids"]), tokenizer.eos_token_id
    only = {n.strip() for n in args.only.split(",") if n.strip()} or None
    with tempfile.TemporaryDirectory(prefix="slimgraph-decode-") as tmp:
        contenders = build(folder, Path(tmp), only)
        want = transformers_tokens(folder, prompt_ids, args.new_tokens)
        workers = [Worker(name, kind, path, prompt_ids, args.new_tokens, eos) for name, kind, path in contenders]
        results: dict[str, list[dict]] = {w.name: [] for w in workers}
        for w in workers:
            w.run()  # warm-up
        for r in range(args.rounds):
            for w in workers if r % 2 == 0 else reversed(workers):
                results[w.name].append(w.run())
        peaks = {w.name: w.close() for w in workers}
        sizes = {name: size_mb(path) for name, _, path in contenders}
    print(f"SmolLM2-135M-Instruct, batch 1, {len(prompt_ids)}-token prompt, {args.new_tokens} greedy new tokens, "
          f"{THREADS} threads, {args.rounds} rounds alternating")
    print(f"{'contender':32} {'tokens/s (min–max)':>22} {'first ms':>9} {'peak RSS MB':>12} {'file MB':>8}  "
          f"{'= transformers':>14}")
    rates = {}
    for name, runs in results.items():
        rate = [r["rate"] for r in runs]
        rates[name] = statistics.median(rate)
        same = next((i for i, (a, b) in enumerate(zip(runs[-1]["tokens"], want)) if a != b), len(want))
        print(f"{name:32} {rates[name]:8.1f} ({min(rate):5.1f}–{max(rate):5.1f}) "
              f"{statistics.median(r['first_ms'] for r in runs):9.1f} {peaks[name]:12.0f} {sizes[name]:8.1f}  "
              f"{same:>6}/{len(want)}")
    for base in ("ORT GenAI builder int4", "llama.cpp Q4_1", "ORT GenAI builder fp32"):
        if base in rates:
            against = [f"{name}: {rates[name] / rates[base]:.2f}x" for name in rates if name.startswith("slimgraph")]
            print(f"tokens/s against {base}: " + ", ".join(against))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
