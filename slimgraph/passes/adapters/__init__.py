"""Adapters: PEFT LoRA / DoRA / SHiRA folders fused into the weights they adapt, and switched in place.

- `peft_files`: an adapter folder (`adapter_config.json` + `adapter_model.safetensors`) read into numpy;
- `targets`: which linear or embedding of the IR each adapter module adapts (module path, weight name,
  or the fingerprint of the base weight it was trained on);
- `weight_math`: the arithmetic (LoRA, DoRA, SHiRA), in float32, on weights in PyTorch's `[out, in]` layout;
- `merge`: the passes `merge-lora` and `merge-shira`;
"""
