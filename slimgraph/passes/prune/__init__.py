"""Pruning passes: width (FFN channels, attention heads, conv channels) and depth (blocks).

All are lossy and training-free: they work from the weights and, where it helps, calibration
activations; the pipeline measures and budgets what they cost. They edit through the dependency
groups of `slimgraph.ir.groups`, so every tensor a removed channel touches goes with it.
"""
