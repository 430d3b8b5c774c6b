"""RNN, GRU and LSTM, unrolled over the (static) sequence length, per the ONNX spec:
gate orders LSTM i, o, f, c and GRU z, r, h; direction forward, reverse or bidirectional;
layout 0 ([seq, batch, ·]) or 1 ([batch, seq, ·]); clip; GRU linear_before_reset;
LSTM peepholes. Default activations only (sigmoid / tanh)."""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.errors import SlimgraphError


def _setup(node, x):
    if attr(node, "activations") not in (None, ["Sigmoid", "Tanh"], ["Sigmoid", "Tanh", "Tanh"], ["Tanh"],
                                          ["Sigmoid", "Tanh", "Sigmoid", "Tanh"],
                                          ["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Tanh", "Tanh"], ["Tanh", "Tanh"]):
        raise SlimgraphError("pytorch backend: only default RNN activations are supported")
    layout = attr(node, "layout", 0)
    if layout:
        x = x.transpose(0, 1)
    steps = node.inputs[0].shape[1 if layout else 0]
    if not isinstance(steps, int):
        raise SlimgraphError("pytorch backend: recurrent ops need a static sequence length")
    directions = ["forward", "reverse"] if attr(node, "direction", "forward") == "bidirectional" else \
        [attr(node, "direction", "forward")]
    return x, layout, steps, directions


def _clip(node, value):
    clip = attr(node, "clip")
    return torch.clamp(value, -clip, clip) if clip is not None else value


def _finish(layout, outputs, finals):
    y = torch.stack(outputs, 0)  # [seq, dirs, batch, hidden]
    y_h = torch.stack(finals, 0)  # [dirs, batch, hidden]
    if layout:
        y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
    return y, y_h


def _run(node, x, steps, directions, cell, initial):
    """Run `cell(d, x_t, state) -> (h, state)` for each direction; outputs per step and final states."""
    per_step = [[None] * len(directions) for _ in range(steps)]
    finals = []
    for d, direction in enumerate(directions):
        state = initial(d)
        order = range(steps) if direction == "forward" else reversed(range(steps))
        for t in order:
            h, state = cell(d, x[t], state)
            per_step[t][d] = h
        finals.append(state)
    return [torch.stack(hs, 0) for hs in per_step], finals


@lowers("RNN")
def rnn(ctx, node, x, w, r, b=None, sequence_lens=None, initial_h=None):
    x, layout, steps, directions = _setup(node, x)
    hidden = attr(node, "hidden_size")
    batch = x.size(1)

    def initial(d):
        return initial_h[d] if initial_h is not None else x.new_zeros(batch, hidden)

    def cell(d, x_t, h):
        z = x_t @ w[d].t() + h @ r[d].t()
        if b is not None:
            z = z + b[d, :hidden] + b[d, hidden:]
        h = torch.tanh(_clip(node, z))
        return h, h

    outputs, finals = _run(node, x, steps, directions, cell, initial)
    return _finish(layout, outputs, finals)


@lowers("GRU")
def gru(ctx, node, x, w, r, b=None, sequence_lens=None, initial_h=None):
    x, layout, steps, directions = _setup(node, x)
    hidden = attr(node, "hidden_size")
    batch = x.size(1)
    before_reset = attr(node, "linear_before_reset", 0)

    def initial(d):
        return initial_h[d] if initial_h is not None else x.new_zeros(batch, hidden)

    def cell(d, x_t, h):
        wz, wr, wh = w[d].split(hidden)
        rz, rr, rh = r[d].split(hidden)
        if b is not None:
            wbz, wbr, wbh, rbz, rbr, rbh = b[d].split(hidden)
        else:
            wbz = wbr = wbh = rbz = rbr = rbh = 0
        zt = torch.sigmoid(_clip(node, x_t @ wz.t() + h @ rz.t() + wbz + rbz))
        rt = torch.sigmoid(_clip(node, x_t @ wr.t() + h @ rr.t() + wbr + rbr))
        if before_reset:
            ht = torch.tanh(_clip(node, x_t @ wh.t() + rt * (h @ rh.t() + rbh) + wbh))
        else:
            ht = torch.tanh(_clip(node, x_t @ wh.t() + (rt * h) @ rh.t() + rbh + wbh))
        h = (1 - zt) * ht + zt * h
        return h, h

    outputs, finals = _run(node, x, steps, directions, cell, initial)
    return _finish(layout, outputs, finals)


@lowers("LSTM")
def lstm(ctx, node, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    x, layout, steps, directions = _setup(node, x)
    hidden = attr(node, "hidden_size")
    batch = x.size(1)
    if attr(node, "input_forget", 0):
        raise SlimgraphError("pytorch backend: LSTM input_forget is not supported")

    def initial(d):
        h = initial_h[d] if initial_h is not None else x.new_zeros(batch, hidden)
        c = initial_c[d] if initial_c is not None else x.new_zeros(batch, hidden)
        return h, c

    def cell(d, x_t, state):
        h, c = state
        gates = x_t @ w[d].t() + h @ r[d].t()
        if b is not None:
            gates = gates + b[d, : 4 * hidden] + b[d, 4 * hidden:]
        i, o, f, g = gates.split(hidden, dim=-1)
        pi, po, pf = p[d].split(hidden) if p is not None else (0, 0, 0)
        i = torch.sigmoid(_clip(node, i + pi * c))
        f = torch.sigmoid(_clip(node, f + pf * c))
        c = f * c + i * torch.tanh(_clip(node, g))
        o = torch.sigmoid(_clip(node, o + po * c))
        h = o * torch.tanh(c)
        return h, (h, c)

    outputs, finals = _run(node, x, steps, directions, cell, initial)
    y, y_h = _finish(layout, outputs, [h for h, _ in finals])
    y_c = torch.stack([c for _, c in finals], 0)
    if layout:
        y_c = y_c.transpose(0, 1)
    return y, y_h, y_c
