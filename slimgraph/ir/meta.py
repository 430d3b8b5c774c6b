"""Keys slimgraph reads and writes in model metadata (`node.metadata_props`, `model.meta`).

`ir` owns them so that every layer above (frontends, passes, backends) names them the same way.
"""

from __future__ import annotations

# On nodes: the PyTorch exporter's module path of each node, a Python list literal of scopes.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"

# In `model.meta` (in memory only, never saved):
EXAMPLE_INPUTS_KEY = "slimgraph.example_inputs"  # list of feeds (name → array) a frontend knows
EXAMPLE_INPUTS_SOURCE_KEY = "slimgraph.example_inputs_source"  # where they came from, for the report
SOURCE_KEY = "slimgraph.source"  # the file or folder the model was loaded from
TOKENIZER_KEY = "slimgraph.tokenizer"  # a folder or file the tokenizer loads from (HF folder, .gguf)
READER_KEY = "slimgraph.reader"  # the frontend's DataReader: how passes read files for this model
INPUTS_READ_WEIGHTS_KEY = "slimgraph.inputs_read_weights"  # the example inputs were computed with the weights
OUTPUT_MAPS_KEY = "slimgraph.output_maps"  # output name → fidelity.OutputMap: how it relates to the original's

# On a tensor's `meta`: where a weight bound to an input file lies (`slimgraph.frontend.lazy_weights.WeightSource`,
# equal for the same bytes read the same way).
WEIGHT_SOURCE_KEY = "slimgraph.weight_source"
