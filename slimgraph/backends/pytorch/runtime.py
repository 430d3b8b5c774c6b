"""Helpers the generated code calls for ops that plain torch expressions cannot state: their
output's shape depends on the input values, or they loop. Each uses only torch; saving a
module copies the source of those it calls into its `model.py`, which so stays free of slimgraph."""

from __future__ import annotations

import math

import torch


def non_max_suppression(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
                        score_threshold: float | None, center_point_box: int) -> torch.Tensor:
    """ONNX NonMaxSuppression: per batch and class, the highest-scoring boxes (ties: lower index
    first), each kept unless its IoU with a kept box is above the threshold. → [selected, 3]."""
    if center_point_box:  # [x_center, y_center, width, height]
        low, high = boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2
    else:  # two corners, in either order
        low, high = torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])
    area = (high - low).prod(-1)
    overlap = (torch.minimum(high[:, :, None], high[:, None]) - torch.maximum(low[:, :, None], low[:, None]))
    intersection = overlap.clamp(min=0).prod(-1)
    union = area[:, :, None] + area[:, None] - intersection
    valid = (intersection > 0) & (area[:, :, None] > 0) & (area[:, None] > 0) & (union > 0)
    suppresses = valid & (intersection / union > iou_threshold)  # [batch, box, box]
    selected = []
    for batch in range(scores.size(0)):
        for cls in range(scores.size(1)):
            kept: list[int] = []
            for box in torch.sort(scores[batch, cls], descending=True, stable=True).indices.tolist():
                if len(kept) >= max_per_class:
                    break
                if score_threshold is not None and not scores[batch, cls, box] > score_threshold:
                    break  # sorted: every later box scores lower still
                if not any(suppresses[batch, box, other] for other in kept):
                    kept.append(box)
                    selected.append([batch, cls, box])
    return torch.tensor(selected, dtype=torch.int64, device=boxes.device).reshape(-1, 3)


def mixture_of_experts(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc1_bias: torch.Tensor | None,
                       fc2: torch.Tensor, fc2_bias: torch.Tensor | None, k: int, activation: str,
                       normalize_routing: bool, alpha: float = 1.0, beta: float = 0.0,
                       limit: float = float("inf")) -> torch.Tensor:
    """com.microsoft.MoE as ONNX Runtime computes it: each token goes to the k experts with the
    highest softmax(router) probability, weighted by it (renormalized over the k if asked);
    expert e is fc2[e] · act(fc1[e] · x + b1) + b2 (weights [experts, out, in])."""
    tokens = x.reshape(-1, x.size(-1))
    probabilities = torch.softmax(router_logits.reshape(tokens.size(0), -1).float(), -1)
    weights, experts = torch.topk(probabilities, k, -1)
    if normalize_routing:
        weights = weights / weights.sum(-1, keepdim=True)
    output = torch.zeros_like(tokens, dtype=torch.float32)
    for expert in range(fc1.size(0)):
        token, slot = torch.where(experts == expert)
        if token.numel() == 0:
            continue
        hidden = tokens[token] @ fc1[expert].t()
        if fc1_bias is not None:
            hidden = hidden + fc1_bias[expert]
        if activation == "swiglu":  # interleaved [gate, linear, gate, linear, ...]
            gate, linear = hidden[:, 0::2].clamp(max=limit), hidden[:, 1::2].clamp(-limit, limit)
            hidden = gate * torch.sigmoid(alpha * gate) * (linear + beta)
        elif activation == "gelu":
            hidden = torch.nn.functional.gelu(hidden, approximate="tanh")
        elif activation == "relu":
            hidden = torch.relu(hidden)
        elif activation == "silu":
            hidden = torch.nn.functional.silu(hidden)
        result = hidden @ fc2[expert].t()
        if fc2_bias is not None:
            result = result + fc2_bias[expert]
        output.index_add_(0, token, result.float() * weights[token, slot, None])
    return output.to(x.dtype).reshape(x.shape)


def if_then_else(condition: torch.Tensor, then_branch, then_arguments: list, else_branch,
                 else_arguments: list) -> tuple:
    """ONNX If: one branch runs, as Python would (the branches may differ in shapes)."""
    return then_branch(*then_arguments) if bool(condition) else else_branch(*else_arguments)


def loop(body, trip_count: torch.Tensor | None, condition: torch.Tensor | None, carried: list,
         captured: list) -> tuple:
    """ONNX Loop: body(iteration, condition, *carried) → (condition, *carried, *scan outputs),
    run while the condition holds and fewer than trip_count iterations ran. The scan outputs
    of all iterations are stacked."""
    limit = int(trip_count) if trip_count is not None else None
    keep_going = bool(condition) if condition is not None else True
    iteration, scanned = 0, []
    device = next((t.device for t in (trip_count, condition, *carried) if t is not None), None)
    while keep_going and (limit is None or iteration < limit):
        results = body(torch.tensor(iteration, device=device), torch.tensor(keep_going, device=device), *carried,
                       *captured)
        keep_going = bool(results[0])
        carried = list(results[1:1 + len(carried)])
        scanned.append(results[1 + len(carried):])
        iteration += 1
    stacked = [torch.stack(list(values)) for values in zip(*scanned)]
    return (*carried, *stacked)


def scan(body, states: list, sequences: list, input_axes: list[int], input_reversed: list[int],
         output_axes: list[int], output_reversed: list[int], captured: list) -> tuple:
    """ONNX Scan (opset 9+): body(*states, *slices) → (*states, *outputs) for each position
    along the inputs' scan axes (backwards where reversed); the outputs are stacked along
    their axes."""
    length = sequences[0].size(input_axes[0])
    outputs = []
    for step in range(length):
        slices = [sequence.select(axis, length - 1 - step if backwards else step)
                  for sequence, axis, backwards in zip(sequences, input_axes, input_reversed)]
        results = body(*states, *slices, *captured)
        states = list(results[:len(states)])
        outputs.append(results[len(states):])
    stacked = []
    for values, axis, backwards in zip(zip(*outputs), output_axes, output_reversed):
        values = list(reversed(values)) if backwards else list(values)
        stacked.append(torch.stack(values, axis if axis >= 0 else axis + values[0].dim() + 1))
    return (*states, *stacked)


def resize_matrix(length_in: int, length_out: int | None, scale, roi_start=0.0, roi_end=1.0, mode: str = "nearest",
                  transform: str = "half_pixel", nearest_mode: str = "round_prefer_floor", cubic_a: float = -0.75,
                  exclude_outside: int = 0, antialias: int = 0,
                  extrapolation: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX Resize along one axis as (M [out, in], offset [out]): resizing v gives M @ v + offset.
    `scale` (and the roi) may be a Python number or a 0-D tensor known only at run time; so may
    the lengths. `length_out` None: floor(length_in · scale) (of the roi's share of it, for
    tf_crop_and_resize), as ONNX defines the output shape."""
    f64 = torch.float64
    if length_out is None:
        share = float(roi_end) - float(roi_start) if transform == "tf_crop_and_resize" else 1.0
        length_out = math.floor(int(length_in) * share * float(scale))
    length_in, length_out = int(length_in), int(length_out)
    if length_in == length_out and math.isclose(float(scale), 1.0) and (float(roi_start), float(roi_end)) == (0, 1):
        return torch.eye(length_in, dtype=f64), torch.zeros(length_out, dtype=f64)  # not resized (as the reference)
    scale = torch.as_tensor(scale, dtype=f64)
    y = torch.arange(length_out, dtype=f64)
    width = scale * length_in  # the output length before rounding
    if transform == "align_corners":
        x = torch.where(width == 1, torch.zeros_like(y), y * (length_in - 1) / (width - 1))
    elif transform == "asymmetric":
        x = y / scale
    elif transform == "pytorch_half_pixel":
        x = torch.where(width == 1, torch.full_like(y, -0.5), (y + 0.5) / scale - 0.5)
    elif transform == "half_pixel_symmetric":
        shift = length_in / 2 * (1 - length_out / width)
        x = shift + (y + 0.5) / scale - 0.5
    elif transform == "tf_crop_and_resize":  # (the roi in float32 and this order of operations: as the ONNX reference)
        start, end = torch.as_tensor(roi_start, dtype=torch.float32), torch.as_tensor(roi_end, dtype=torch.float32)
        span = (end - start).double()
        x = torch.where(width == 1, span * (length_in - 1) / 2 + torch.zeros_like(y),
                        y * span * (length_in - 1) / (width - 1)) + (start * (length_in - 1)).double()
    else:  # half_pixel
        x = (y + 0.5) / scale - 0.5
    if mode == "nearest":
        rounded = {"round_prefer_floor": torch.ceil(x - 0.5), "round_prefer_ceil": torch.floor(x + 0.5),
                   "floor": torch.floor(x), "ceil": torch.ceil(x)}[nearest_mode]
        neighbors, weights = rounded.long().unsqueeze(1), torch.ones(length_out, 1, dtype=f64)
    else:
        base = torch.floor(x)
        ratio = (x - base).unsqueeze(1)
        reach = 1 if mode == "linear" else 2  # the kernel's support: |d| < reach (in input steps)
        shrink = torch.clamp(scale, max=1.0) if antialias else torch.ones((), dtype=f64)
        first = torch.floor(-reach / shrink) + 1  # the antialiased kernel widens by 1 / scale
        count = int(2 - 2 * first)
        steps = first + torch.arange(count, dtype=f64)
        distance = ((steps - ratio) * shrink).abs()
        if mode == "linear":
            weights = (1 - distance).clamp(min=0)
        else:
            a = cubic_a
            weights = torch.where(distance <= 1, ((a + 2) * distance - (a + 3)) * distance * distance + 1,
                                  torch.where(distance < 2, ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a,
                                              torch.zeros_like(distance)))
        neighbors = (base.unsqueeze(1) + steps).long()
        if antialias:
            weights = weights / weights.sum(1, keepdim=True)
    if exclude_outside:  # outside weights drop out, the rest renormalized (a row left empty stays zero)
        weights = torch.where((neighbors < 0) | (neighbors >= length_in), torch.zeros_like(weights), weights)
        total = weights.sum(1, keepdim=True)
        weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    matrix = torch.zeros(length_out, length_in, dtype=f64)
    matrix.scatter_add_(1, neighbors.clamp(0, length_in - 1), weights)  # beyond the edge: the edge value
    offset = torch.zeros(length_out, dtype=f64)
    if transform == "tf_crop_and_resize":
        outside = (x < 0) | (x > length_in - 1)
        matrix = torch.where(outside.unsqueeze(1), torch.zeros_like(matrix), matrix)
        offset = torch.where(outside, torch.full_like(offset, extrapolation), offset)
    return matrix, offset


def ngram_counts(x: torch.Tensor, grams: list[list[int]], columns: list[int], width: int, min_length: int,
                 max_length: int, max_skip: int) -> torch.Tensor:
    """ONNX TfIdfVectorizer's counts: [rows, width], column columns[g] counting how often gram g
    occurs in each row, its items `skip + 1` apart for every skip up to max_skip (unigrams once)."""
    rows = x.reshape(-1, x.size(-1)) if x.dim() > 0 else x.reshape(1, 1)
    counts = torch.zeros(rows.size(0), width, dtype=torch.float32, device=x.device)
    for length in range(min_length, max_length + 1):
        chosen = [g for g, gram in enumerate(grams) if len(gram) == length]
        if not chosen:
            continue
        pool = torch.tensor([grams[g] for g in chosen], dtype=rows.dtype, device=x.device)  # [G, length]
        target = torch.tensor([columns[g] for g in chosen], device=x.device)
        for distance in range(1, (max_skip + 1 if length > 1 else 1) + 1):
            starts = rows.size(1) - distance * (length - 1)
            if starts <= 0:
                break
            windows = torch.stack([rows[:, k * distance:k * distance + starts] for k in range(length)], -1)
            matches = (windows.unsqueeze(2) == pool).all(-1).sum(1)  # [rows, G]
            counts.index_add_(1, target, matches.to(torch.float32))
    return counts.reshape(width) if x.dim() < 2 else counts


def roi_align(x: torch.Tensor, rois: torch.Tensor, batch_indices: torch.Tensor, output_height: int,
              output_width: int, sampling_ratio: int, spatial_scale: float, mode: str,
              half_pixel: bool) -> torch.Tensor:
    """ONNX RoiAlign: each region [x1, y1, x2, y2] of image batch_indices[n] cut into
    output_height × output_width bins, each the average (or max) of bilinear samples on a grid."""
    channels, height, width = x.shape[1:]
    pooled = []
    for n in range(rois.size(0)):
        start_x, start_y, end_x, end_y = (rois[n].double() * spatial_scale - (0.5 if half_pixel else 0.0)).tolist()
        roi_height, roi_width = end_y - start_y, end_x - start_x
        if not half_pixel:
            roi_height, roi_width = max(roi_height, 1.0), max(roi_width, 1.0)
        bin_height, bin_width = roi_height / output_height, roi_width / output_width
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_height / output_height)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_width / output_width)
        rows = _roi_axis(start_y, bin_height, grid_h, output_height, height, x.device)  # each [bins, grid]
        columns = _roi_axis(start_x, bin_width, grid_w, output_width, width, x.device)
        image = x[int(batch_indices[n])].double()
        samples = []
        for y_index, y_weight in ((rows[0], rows[2]), (rows[1], rows[3])):
            for x_index, x_weight in ((columns[0], columns[2]), (columns[1], columns[3])):
                weight = y_weight[:, :, None, None] * x_weight[None, None]  # [OH, gh, OW, gw]
                samples.append(weight * image[:, y_index[:, :, None, None], x_index[None, None]])
        valid = rows[4][:, :, None, None] & columns[4][None, None]
        if mode == "avg":
            result = (sum(samples) * valid).sum((2, 4)) / max(grid_h * grid_w, 1)
        else:  # the largest weighted corner of any sample (as the ONNX reference and ORT)
            result = (torch.stack(samples).amax(0) * valid).amax((2, 4))
        pooled.append(result)
    if not pooled:
        return x.new_zeros(0, channels, output_height, output_width)
    return torch.stack(pooled).to(x.dtype)


def _roi_axis(start: float, bin_size: float, grid: int, bins: int, size: int, device: torch.device):
    """Sample positions along one axis: (low index, high index, low weight, high weight, valid)."""
    steps = torch.arange(max(bins, grid), dtype=torch.float64, device=device)
    positions = start + steps[:bins, None] * bin_size + (steps[None, :grid] + 0.5) * bin_size / grid
    valid = (positions >= -1.0) & (positions <= size)
    positions = positions.clamp(min=0)
    low = positions.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    fraction = torch.where(edge, torch.zeros_like(positions), positions - low)
    return low, high, 1 - fraction, fraction, valid



def scan_batched(body, sequence_lens: torch.Tensor | None, states: list, sequences: list, input_reversed: list[int],
                 output_count: int, captured: list) -> tuple:
    """ONNX Scan of opset 8: a batch axis first and the scan axis second; batch entry b scans its
    first sequence_lens[b] steps (its outputs are zero past them)."""
    length = sequences[0].size(1)
    finals, outputs = [], []
    for b in range(sequences[0].size(0)):
        steps = int(sequence_lens[b]) if sequence_lens is not None else length
        result = scan(body, [state[b] for state in states], [sequence[b, :steps] for sequence in sequences],
                      [0] * len(sequences), input_reversed, [0] * output_count, [0] * output_count, captured)
        finals.append(result[:len(states)])
        outputs.append([torch.nn.functional.pad(o, [0, 0] * (o.dim() - 1) + [0, length - steps])
                        for o in result[len(states):]])
    return (*[torch.stack(list(values)) for values in zip(*finals)],
            *[torch.stack(list(values)) for values in zip(*outputs)])


def mel_weight_matrix(mel_bins: int, dft_length: int, sample_rate: int, lower_hertz: float, upper_hertz: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """ONNX MelWeightMatrix [dft_length // 2 + 1, mel_bins]: triangular filters between mel-spaced
    spectrum bins (each rises from its left neighbour's bin to its own, falls to its right's)."""
    def to_mel(hertz: float) -> float:
        return 2595 * math.log10(1 + hertz / 700)

    low, high = to_mel(lower_hertz), to_mel(upper_hertz)
    mels = torch.arange(mel_bins + 2, dtype=torch.float64) * ((high - low) / (mel_bins + 2)) + low
    hertz = 700 * (torch.pow(10.0, mels / 2595) - 1)
    bins = torch.div((dft_length + 1) * hertz, sample_rate, rounding_mode="floor").long().tolist()
    weights = torch.zeros(dft_length // 2 + 1, mel_bins, dtype=torch.float64)
    for i in range(mel_bins):
        left, center, right = bins[i], bins[i + 1], bins[i + 2]
        if center == left:
            weights[center, i] = 1
        else:
            weights[left:center + 1, i] = (torch.arange(left, center + 1) - left) / (center - left)
        if right > center:
            weights[center:right, i] = (right - torch.arange(center, right)) / (right - center)
    return weights.to(dtype)


def tree_ensemble(x: torch.Tensor, features: torch.Tensor, splits: torch.Tensor, modes: torch.Tensor,
                  members: torch.Tensor, true_ids: torch.Tensor, false_ids: torch.Tensor, true_leaf: torch.Tensor,
                  false_leaf: torch.Tensor, missing_goes_true: torch.Tensor, leaf_weights: torch.Tensor,
                  leaf_targets: torch.Tensor, roots: torch.Tensor, root_is_leaf: torch.Tensor, depth: int,
                  targets: int, aggregate: int) -> torch.Tensor:
    """ai.onnx.ml TreeEnsemble: every sample walks every tree at once, one level per step (a
    node's comparison by its mode: <=, <, >=, >, ==, !=, member of a set), then the leaves'
    weights are summed, averaged, or reduced by min or max per target."""
    node = roots.expand(x.size(0), -1)  # [samples, trees]: a node index, or a leaf index once at_leaf
    at_leaf = root_is_leaf.expand(x.size(0), -1)
    for _ in range(depth):
        inner = torch.where(at_leaf, torch.zeros_like(node), node)
        value = torch.gather(x, 1, features[inner])
        split = splits[inner]
        outcomes = torch.stack([value <= split, value < split, value >= split, value > split, value == split,
                                value != split, (value.unsqueeze(-1) == members[inner]).any(-1)], -1)
        goes_true = outcomes.gather(-1, modes[inner].unsqueeze(-1)).squeeze(-1)
        goes_true = goes_true | (missing_goes_true[inner] & torch.isnan(value))
        node = torch.where(at_leaf, node, torch.where(goes_true, true_ids[inner], false_ids[inner]))
        at_leaf = at_leaf | torch.where(goes_true, true_leaf[inner], false_leaf[inner])
    weights, target = leaf_weights[node].to(x.dtype), leaf_targets[node]
    if aggregate in (0, 1):  # AVERAGE, SUM
        total = torch.zeros(x.size(0), targets, dtype=x.dtype, device=x.device).scatter_add(1, target, weights)
        return total / node.size(1) if aggregate == 0 else total
    start = torch.finfo(x.dtype).max if aggregate == 2 else torch.finfo(x.dtype).min
    reduced = torch.full((x.size(0), targets), start, dtype=x.dtype, device=x.device).scatter_reduce(
        1, target, weights, "amin" if aggregate == 2 else "amax")
    reached = torch.zeros_like(reduced).scatter_add(1, target, torch.ones_like(weights)) > 0
    return torch.where(reached, reduced, torch.zeros_like(reduced))  # a target no leaf names: 0, as ORT


def col2im(x: torch.Tensor, image: list[int], block: list[int], dilations: list[int], pads: list[int],
           strides: list[int]) -> torch.Tensor:
    """ONNX Col2Im in any number of dimensions: each column of x [N, C·prod(block), L] holds one
    block's values; they are summed back into the padded image, whose pads are then cut off."""
    dims = len(image)
    padded = [size + pads[d] + pads[d + dims] for d, size in enumerate(image)]
    spans = [(p - (dilation * (b - 1) + 1)) // stride + 1
             for p, b, dilation, stride in zip(padded, block, dilations, strides)]

    def grid(sizes: list[int]) -> torch.Tensor:  # every index of an array of these sizes, [count, dims]
        axes = torch.meshgrid(*[torch.arange(s, device=x.device) for s in sizes], indexing="ij")
        return torch.stack(axes, -1).reshape(-1, dims)

    places = grid(block)[:, None] * torch.tensor(dilations, device=x.device) \
        + grid(spans)[None] * torch.tensor(strides, device=x.device)  # [kernel, blocks, dims]
    place_values = torch.tensor([math.prod(padded[d + 1:]) for d in range(dims)], device=x.device)
    flat = (places * place_values).sum(-1).reshape(-1)
    batch, channels = x.size(0), x.size(1) // math.prod(block)
    summed = torch.zeros(batch, channels, math.prod(padded), dtype=x.dtype, device=x.device)
    summed.index_add_(2, flat, x.reshape(batch, channels, -1))
    result = summed.reshape(batch, channels, *padded)
    for d in range(dims):
        result = result.narrow(2 + d, pads[d], image[d])
    return result


# --- recurrent ops (RNN, GRU, LSTM, com.microsoft.DynamicQuantizeLSTM) ------------------------
# The cells are plain torch code: with a static sequence length the lowering calls them while
# tracing (the steps unrolled into the forward); otherwise `recurrent` loops over the steps at
# run time. Weights per direction are [input, gates·hidden] (x @ w), gates in ONNX order.


def recurrent_matmul(a: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                     zero_point: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """a @ weight. With a scale, weight holds 8-bit codes and `a` is quantized to uint8 (min/max
    including 0, round half to even) as ONNX Runtime's DynamicQuantizeLSTM does: the inputs of
    the whole sequence at once; the hidden state [batch, hidden] in blocks of `rows` batch rows,
    one per thread (`ort_lstm_rows`). (qa - za) @ (qw - zw), the integer sums exact (float64),
    then as float32 times the float32 product of the scales, as ORT's int8 GEMM writes them."""
    if scale is None:
        return a @ weight
    if rows is None:
        low, high = torch.clamp(torch.amin(a), max=0.0), torch.clamp(torch.amax(a), min=0.0)
    else:  # per block of rows: scatter into zeros, so each range includes 0
        block = torch.arange(a.size(0), device=a.device) // rows
        zeros = a.new_zeros((a.size(0) + rows - 1) // rows)
        low = zeros.scatter_reduce(0, block, torch.amin(a, -1), "amin")[block].unsqueeze(-1)
        high = zeros.scatter_reduce(0, block, torch.amax(a, -1), "amax")[block].unsqueeze(-1)
    a_scale = (high - low) / 255.0
    a_scale = torch.where(a_scale == 0, torch.ones_like(a_scale), a_scale)
    a_zero = torch.clamp(torch.round(-low / a_scale), 0, 255)
    codes = torch.clamp(torch.round(a / a_scale) + a_zero, 0, 255)
    zero = zero_point.to(torch.float64) if zero_point is not None else 0.0
    sums = (codes - a_zero).to(torch.float64) @ (weight.to(torch.float64) - zero)
    return sums.to(a.dtype) * (a_scale * scale.to(a.dtype))


def ort_lstm_rows(batch: int, hidden: int, threads: int) -> int:
    """How many batch rows ONNX Runtime's LSTM quantizes its hidden state over at once: it splits
    the batch into one block per thread, ceil(batch / threads) rows each, when batch > 4 or
    (batch >= 2 and hidden <= 256); otherwise the whole batch is one block."""
    if batch > 4 or (batch >= 2 and hidden <= 256):
        return (batch + threads - 1) // threads
    return max(batch, 1)


def rnn_cell(xw: torch.Tensor, h: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, clip: float | None,
             r_scale=None, r_zero=None, rows=None) -> torch.Tensor:
    """One RNN step (tanh); xw = x_t @ w, already computed."""
    z = xw + recurrent_matmul(h, r, r_scale, r_zero, rows)
    if b is not None:
        hidden = r.size(-1)
        z = z + b[:hidden] + b[hidden:]
    return torch.tanh(torch.clamp(z, -clip, clip) if clip is not None else z)


def gru_cell(xw: torch.Tensor, h: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, clip: float | None,
             linear_before_reset: int, r_scale=None, r_zero=None, rows=None) -> torch.Tensor:
    """One GRU step, gates z, r, h."""
    hidden = h.size(-1)
    xz, xr, xh = xw.split(hidden, dim=-1)
    rz, rr, rh = r.split(hidden, dim=-1)
    if b is not None:
        wbz, wbr, wbh, rbz, rbr, rbh = b.split(hidden)
        xz, xr, xh = xz + wbz, xr + wbr, xh + wbh
    else:
        rbz = rbr = rbh = 0.0

    def limit(value):
        return torch.clamp(value, -clip, clip) if clip is not None else value

    hz = recurrent_matmul(h, torch.cat([rz, rr], -1), r_scale, r_zero, rows)
    z = torch.sigmoid(limit(xz + hz[..., :hidden] + rbz))
    reset = torch.sigmoid(limit(xr + hz[..., hidden:] + rbr))
    if linear_before_reset:
        candidate = torch.tanh(limit(xh + reset * (recurrent_matmul(h, rh, r_scale, r_zero, rows) + rbh)))
    else:
        candidate = torch.tanh(limit(xh + recurrent_matmul(reset * h, rh, r_scale, r_zero, rows) + rbh))
    return (1 - z) * candidate + z * h


def lstm_cell(xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None,
              p: torch.Tensor | None, clip: float | None, r_scale=None, r_zero=None, rows=None) -> tuple:
    """One LSTM step, gates i, o, f, c, with optional peepholes p = (pi, po, pf): → (h, c)."""
    hidden = h.size(-1)
    gates = xw + recurrent_matmul(h, r, r_scale, r_zero, rows)
    if b is not None:
        gates = gates + (b[: 4 * hidden] + b[4 * hidden:])  # (as ORT adds them: Wb + Rb first)
    i, o, f, g = gates.split(hidden, dim=-1)

    def limit(value):
        return torch.clamp(value, -clip, clip) if clip is not None else value

    if p is not None:
        pi, po, pf = p.split(hidden)
        i, f = i + pi * c, f + pf * c
    c = torch.sigmoid(limit(f)) * c + torch.sigmoid(limit(i)) * torch.tanh(limit(g))
    if p is not None:
        o = o + po * c
    return torch.sigmoid(limit(o)) * torch.tanh(c), c


def recurrent(kind: str, xw: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, p: torch.Tensor | None,
              h: torch.Tensor, c: torch.Tensor | None, lengths: torch.Tensor | None, reverse: bool,
              clip: float | None, linear_before_reset: int, r_scale=None, r_zero=None, threads: int = 1) -> tuple:
    """One direction of a recurrent op over a sequence of run-time length: xw [seq, batch, gates·hidden]
    (the inputs already multiplied by the weights). → (outputs [seq, batch, hidden], final h, final c).
    With `lengths`, batch entry i runs for lengths[i] steps (reverse: from its last valid step);
    its outputs after that are zeros and its final state is the one after its last step. With
    r_scale (8-bit R), the hidden state is quantized in ORT's blocks of rows for `threads`."""
    steps = xw.size(0)
    if steps == 0:
        return h.new_zeros((0, *h.shape)), h, c
    rows = ort_lstm_rows(h.size(0), h.size(1), threads) if r_scale is not None else None
    outputs = [h] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        if kind == "lstm":
            new_h, new_c = lstm_cell(xw[t], h, c, r, b, p, clip, r_scale, r_zero, rows)
        elif kind == "gru":
            new_h, new_c = gru_cell(xw[t], h, r, b, clip, linear_before_reset, r_scale, r_zero, rows), c
        else:
            new_h, new_c = rnn_cell(xw[t], h, r, b, clip, r_scale, r_zero, rows), c
        if lengths is not None:
            valid = (lengths > t).unsqueeze(-1)
            new_h = torch.where(valid, new_h, h)
            new_c = torch.where(valid, new_c, c) if c is not None else None
            outputs[t] = torch.where(valid, new_h, torch.zeros_like(new_h))
        else:
            outputs[t] = new_h
        h, c = new_h, new_c
    return torch.stack(outputs, 0), h, c
