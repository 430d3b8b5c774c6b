"""Measurement beside the IR: run a model (evaluate), compare outputs (fidelity), make inputs for it,
count its size and FLOPs (stats), compare two graphs (diff, summary), and describe the machine it
targets (target). Nothing here changes a graph."""
