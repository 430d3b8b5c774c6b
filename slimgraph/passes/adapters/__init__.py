"""Adapters: PEFT LoRA / DoRA / SHiRA adapters fused into the weights they adapt.

- `records`: an adapter as data (its modules' factors or values), read from its folder by
  `slimgraph.frontend.peft_files`;
- `targets`: which linear or embedding of the IR each adapter module adapts (module path, weight name,
  or the fingerprint of the base weight it was trained on);
- `weight_math`: the arithmetic (LoRA, DoRA, SHiRA), in float32, on weights in PyTorch's `[out, in]` layout;
- `merge`: the passes `merge-lora` and `merge-shira`.

Switching adapters in place on a compiled artifact is the backends' (`slimgraph.backends.switching`).
"""
