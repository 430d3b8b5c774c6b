"""RNN, GRU, LSTM and com.microsoft.DynamicQuantizeLSTM, per the ONNX spec: gate orders LSTM
i, o, f, c and GRU z, r, h; direction forward, reverse or bidirectional; layout 0
([seq, batch, ·]) or 1 ([batch, seq, ·]); clip; GRU linear_before_reset; LSTM peepholes;
per-batch sequence lengths. Default activations only (sigmoid / tanh).

The inputs are multiplied by the weights for the whole sequence at once; the steps then run
the cells of `runtime` (plain torch). A static sequence length without per-batch lengths is
unrolled into the forward (plain code, torch.export works); otherwise `runtime.recurrent`
loops over the steps at run time (a run-time length, e.g. in an `If` branch or a streaming
model). DynamicQuantizeLSTM (what ORT's quantizer makes of an LSTM) quantizes the inputs
and each step's hidden state to uint8 as ORT does (`runtime.recurrent_matmul`): the inputs of
all the steps that any batch entry runs with one scale and zero point, the hidden state with
one per block of batch rows, a block per thread of ORT's session (`runtime.ort_lstm_rows`).
So ORT's own results depend on its thread count (2e-3 relative between 1 and 2 threads on a
small LSTM); the lowering matches the session of the artifact's `ort_threads` (by default
ORT's default, this machine's physical cores). It always loops at run time, as the blocks
depend on the run-time batch size."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.errors import SlimgraphError

MS = "com.microsoft"
DEFAULT_ACTIVATIONS = (None, ["Sigmoid", "Tanh"], ["Sigmoid", "Tanh", "Tanh"], ["Tanh"],
                       ["Sigmoid", "Tanh", "Sigmoid", "Tanh"], ["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Tanh", "Tanh"],
                       ["Tanh", "Tanh"])


def _directions(node) -> list[str]:
    if attr(node, "activations") not in DEFAULT_ACTIVATIONS:
        raise SlimgraphError("pytorch backend: only default RNN activations are supported")
    direction = attr(node, "direction", "forward")
    return ["forward", "reverse"] if direction == "bidirectional" else [direction]


def _static_steps(node, layout: int, lengths) -> int | None:
    """The sequence length when it is known while building and every batch entry runs all of it."""
    shape = node.inputs[0].shape
    steps = shape[1 if layout else 0] if shape is not None and len(shape) == 3 else None
    return steps if isinstance(steps, int) and lengths is None else None


def ort_default_threads() -> int:
    """ONNX Runtime's default intra-op threads: the machine's physical cores (what cpuinfo counts),
    or half its logical CPUs where the topology cannot be read."""
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or max(1, (os.cpu_count() or 2) // 2)


def _quantized_steps(x, lengths):
    """ORT quantizes the inputs of the steps up to the longest length only: the steps after it
    (which no batch entry runs) become zeros, which leave the range as it is (it includes 0)."""
    if lengths is None:
        return x
    steps = torch.arange(x.size(0), device=x.device).reshape(-1, 1, 1)
    return torch.where(steps < lengths.max(), x, torch.zeros_like(x))


def _run(ctx, node, kind, x, weights, r, b, p, initial_h, initial_c, lengths, scales=(None, None, None, None)):
    """All directions of a recurrent op. `weights[d]`/`r[d]` are [input, gates·hidden]; returns
    (y, y_h, y_c) in the node's layout."""
    w_scale, w_zero, r_scale, r_zero = scales
    layout = attr(node, "layout", 0)
    if layout:
        x = x.transpose(0, 1)
        initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
        initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
    hidden, clip = attr(node, "hidden_size"), attr(node, "clip")
    before_reset = attr(node, "linear_before_reset", 0)
    steps = _static_steps(node, layout, lengths) if w_scale is None else None
    threads = None
    if w_scale is not None:
        x = _quantized_steps(x, lengths)
        threads = ctx.options.get("ort_threads") or ort_default_threads()
    outputs, finals_h, finals_c = [], [], []
    for d, direction in enumerate(_directions(node)):
        pick = [v[d] if v is not None else None for v in (w_scale, w_zero, r_scale, r_zero)]  # per direction
        xw = runtime.recurrent_matmul(x, weights[d], pick[0], pick[1])
        h = initial_h[d] if initial_h is not None else x.new_zeros(x.size(1), hidden)
        c = (initial_c[d] if initial_c is not None else x.new_zeros(x.size(1), hidden)) if kind == "lstm" else None
        bias = b[d] if b is not None else None
        peephole = p[d] if p is not None else None
        if steps is None:
            result = ctx.call(runtime.recurrent, kind, xw, r[d], bias, peephole, h, c, lengths,
                              direction == "reverse", clip, before_reset, pick[2], pick[3], threads or 1)
            y, h, c = result[0], result[1], result[2]
        else:
            per_step = [None] * steps
            for t in (range(steps) if direction == "forward" else reversed(range(steps))):
                if kind == "lstm":
                    h, c = runtime.lstm_cell(xw[t], h, c, r[d], bias, peephole, clip)
                elif kind == "gru":
                    h = runtime.gru_cell(xw[t], h, r[d], bias, clip, before_reset)
                else:
                    h = runtime.rnn_cell(xw[t], h, r[d], bias, clip)
                per_step[t] = h
            y = torch.stack(per_step, 0)
        outputs.append(y)
        finals_h.append(h)
        finals_c.append(c)
    y = torch.stack(outputs, 1)  # [seq, dirs, batch, hidden]
    y_h = torch.stack(finals_h, 0)  # [dirs, batch, hidden]
    y_c = torch.stack(finals_c, 0) if kind == "lstm" else None
    if layout:
        y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
        y_c = y_c.transpose(0, 1) if y_c is not None else None
    return y, y_h, y_c


def _transposed(weights, count: int) -> list:
    """ONNX stores W and R per direction as [gates·hidden, input]: → [input, gates·hidden]."""
    return [weights[d].t() for d in range(count)]


@lowers("RNN")
def rnn(ctx, node, x, w, r, b=None, sequence_lens=None, initial_h=None):
    count = len(_directions(node))
    y, y_h, _ = _run(ctx, node, "rnn", x, _transposed(w, count), _transposed(r, count), b, None, initial_h, None,
                     sequence_lens)
    return y, y_h


@lowers("GRU")
def gru(ctx, node, x, w, r, b=None, sequence_lens=None, initial_h=None):
    count = len(_directions(node))
    y, y_h, _ = _run(ctx, node, "gru", x, _transposed(w, count), _transposed(r, count), b, None, initial_h, None,
                     sequence_lens)
    return y, y_h


@lowers("LSTM")
def lstm(ctx, node, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    if attr(node, "input_forget", 0):
        raise SlimgraphError("pytorch backend: LSTM input_forget is not supported")
    count = len(_directions(node))
    return _run(ctx, node, "lstm", x, _transposed(w, count), _transposed(r, count), b, p, initial_h, initial_c,
                sequence_lens)


@lowers("DynamicQuantizeLSTM", domain=MS)
def dynamic_quantize_lstm(ctx, node, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None,
                          w_scale=None, w_zero_point=None, r_scale=None, r_zero_point=None):
    """W [dirs, input, 4·hidden] and R [dirs, hidden, 4·hidden] hold 8-bit codes with scales and
    zero points per direction (or per direction and column)."""
    if attr(node, "input_forget", 0):
        raise SlimgraphError("pytorch backend: LSTM input_forget is not supported")
    count = len(_directions(node))
    return _run(ctx, node, "lstm", x, [w[d] for d in range(count)], [r[d] for d in range(count)], b, p, initial_h,
                initial_c, sequence_lens, (w_scale, w_zero_point, r_scale, r_zero_point))
