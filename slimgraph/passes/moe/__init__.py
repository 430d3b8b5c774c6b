"""Dense → MoE conversion without training (Dense2MoE, MoEfication): `moe-convert`.

- `clustering`: which neurons form the shared expert and how the rest split into equal experts;
- `router`: the training-free router, its temperature, and routing recall;
- `activation`: the FFN's activation as a piece of graph: what it computes, copied per expert;
- `emit`: the planned MoE written into the graph (com.microsoft.MoE or standard ONNX);
- `convert`: the pass.
"""
