"""Quantization passes: weight-only (MatMulNBits), dynamic int8, static int8 (QDQ), ternary, mixed precision."""
