"""The editing core: helpers over onnx_ir graphs (graph), the one way passes change them (edit),
shape factors and dependency groups for pruning (factors, groups, channels), the model's parts
(parts, structure), opset handling (opset), the NBits storage format (nbits) and metadata keys (meta)."""
