"""If, Loop and Scan: each subgraph becomes a submodule (its outer values as extra arguments),
run by a helper from `runtime` (a Python if / while / for). Eager and torch.compile (with
graph breaks) run them; torch.export and fullgraph=True do not."""

from __future__ import annotations

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.errors import SlimgraphError


def _outputs(node, results) -> tuple:
    return tuple(results[i] for i in range(len(node.outputs)))


@lowers("If", tensors=False)
def if_(ctx, node, condition):
    then_branch, then_arguments = ctx.subgraph(attr(node, "then_branch"), "then_branch")
    else_branch, else_arguments = ctx.subgraph(attr(node, "else_branch"), "else_branch")
    return _outputs(node, ctx.call(runtime.if_then_else, ctx.tensor(condition), then_branch, then_arguments,
                                   else_branch, else_arguments))


@lowers("Loop", since=11, tensors=False)
def loop(ctx, node, trip_count=None, condition=None, *carried):
    body, captured = ctx.subgraph(attr(node, "body"), "loop_body")
    carried = [ctx.tensor(value) for value in carried]
    return _outputs(node, ctx.call(runtime.loop, body, ctx.tensor(trip_count), ctx.tensor(condition), carried,
                                   captured))


@lowers("Scan", since=9, tensors=False)
def scan(ctx, node, *inputs):
    sequences_count = attr(node, "num_scan_inputs")
    states, sequences = inputs[:len(inputs) - sequences_count], inputs[len(inputs) - sequences_count:]
    outputs_count = len(node.outputs) - len(states)
    if any(value is None for value in inputs):
        raise SlimgraphError("pytorch backend: Scan with missing inputs is not supported")
    ranks = [len(value.shape) for value in node.inputs[len(states):]]
    input_axes = [a % r for a, r in zip(attr(node, "scan_input_axes") or [0] * sequences_count, ranks)]
    body, captured = ctx.subgraph(attr(node, "body"), "scan_body")
    return _outputs(node, ctx.call(
        runtime.scan, body, [ctx.tensor(v) for v in states], [ctx.tensor(v) for v in sequences], input_axes,
        attr(node, "scan_input_directions") or [0] * sequences_count, attr(node, "scan_output_axes") or [0] * outputs_count,
        attr(node, "scan_output_directions") or [0] * outputs_count, captured))


@lowers("Scan", since=8, until=8, tensors=False)
def scan_with_batch(ctx, node, sequence_lens, *inputs):
    sequences_count = attr(node, "num_scan_inputs")
    states, sequences = inputs[:len(inputs) - sequences_count], inputs[len(inputs) - sequences_count:]
    body, captured = ctx.subgraph(attr(node, "body"), "scan_body")
    return _outputs(node, ctx.call(
        runtime.scan_batched, body, ctx.tensor(sequence_lens), [ctx.tensor(v) for v in states],
        [ctx.tensor(v) for v in sequences], attr(node, "directions") or [0] * sequences_count,
        len(node.outputs) - len(states), captured))
