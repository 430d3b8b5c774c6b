"""Quantization passes: weight-only (MatMulNBits), dynamic int8, ternary, mixed precision."""
