"""ONNX Attention (opset 23+), following the ONNX reference implementation step by step:
3-D inputs split into heads, past key/value concatenated, boolean or additive masks (padded to
the key length), causal and sliding-window biases aligned bottom-right, grouped-query heads
repeated, softcap, the four qk_matmul_output modes, and fully masked rows giving zeros."""

from __future__ import annotations

import math

import onnx_ir as ir
import torch

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops._common import torch_dtype


def _minus_inf_where_false(ctx, allowed, dtype):
    zero = ctx.call(torch.zeros, (), dtype=dtype)
    return torch.where(allowed, zero, ctx.call(torch.full, (), float("-inf"), dtype=dtype))


@lowers("Attention", since=23)
def attention(ctx, node, q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    q_heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
    q_shape = node.inputs[0].shape
    three_d = len(q_shape) == 3
    if three_d:
        batch, q_len, _ = ctx.dims(node.inputs[0], q)
        q = q.reshape(batch, q_len, q_heads, -1).transpose(1, 2)
        k = k.reshape(batch, ctx.dims(node.inputs[1], k)[1], kv_heads, -1).transpose(1, 2)
        v = v.reshape(batch, ctx.dims(node.inputs[2], v)[1], kv_heads, -1).transpose(1, 2)
        head_size = q_shape[2] // q_heads
    else:
        head_size = q_shape[3]
    half = node.inputs[0].dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    if half:  # like the reference's numpy, compute in float32 and round once at the end
        out_dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None and node.inputs[3].dtype != ir.DataType.BOOL else mask
        past_key = past_key.float() if past_key is not None else None
        past_value = past_value.float() if past_value is not None else None
    scale = attr(node, "scale")
    root = math.sqrt(scale if scale is not None else 1 / math.sqrt(head_size))
    if past_key is not None:
        k = torch.cat([past_key, k], 2)
        v = torch.cat([past_value, v], 2)
    present_key, present_value = k, v
    q_len, kv_len = q.size(2), k.size(2)
    dtype = q.dtype
    # factory functions get traced sizes through ctx.call (fx cannot pass them positionally)
    bias = ctx.call(torch.zeros, [q_len, kv_len], dtype=dtype)
    boolean_mask = mask is not None and node.inputs[3].dtype == ir.DataType.BOOL
    if mask is not None:
        fill = False if boolean_mask else float("-inf")
        mask = torch.nn.functional.pad(mask, (0, kv_len - mask.size(-1)), value=fill)
        if boolean_mask:
            mask = _minus_inf_where_false(ctx, mask, dtype)
    queries = ctx.call(torch.arange, q_len).reshape(q_len, 1)
    keys = ctx.call(torch.arange, kv_len).reshape(1, kv_len)
    if nonpad_kv_seqlen is not None and past_key is None:
        offset = (nonpad_kv_seqlen.reshape(-1) - q_len).reshape(-1, 1, 1)  # per batch
    else:
        offset = past_key.size(2) if past_key is not None else 0
    if attr(node, "is_causal", 0):
        base = mask if mask is not None else bias
        causal = _minus_inf_where_false(ctx, keys <= queries + offset, dtype)
        bias = base + (causal.unsqueeze(1) if nonpad_kv_seqlen is not None and past_key is None else causal)
    elif mask is not None:
        bias = bias + mask
    left, right = attr(node, "left_window_size", -1), attr(node, "right_window_size", -1)
    if left >= 0 or right >= 0:
        distance = queries + offset - keys
        allowed = torch.ones_like(distance, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (distance <= left)
        if right >= 0:
            allowed = allowed & (-distance <= right)
        window = _minus_inf_where_false(ctx, allowed, dtype)
        bias = bias + (window.unsqueeze(1) if nonpad_kv_seqlen is not None and past_key is None else window)
    if nonpad_kv_seqlen is not None:
        padding = ctx.call(torch.arange, kv_len).reshape(1, kv_len) < nonpad_kv_seqlen.reshape(-1, 1)
        bias = bias + _minus_inf_where_false(ctx, padding, dtype).reshape(-1, 1, 1, kv_len)
    k_count = kv_heads if kv_heads is not None else node.inputs[1].shape[1]
    if q_heads is None:
        q_heads = q_shape[1]
    if isinstance(q_heads, int) and isinstance(k_count, int) and q_heads != k_count and q_heads % k_count == 0:
        k = k.repeat_interleave(q_heads // k_count, dim=1)
        v = v.repeat_interleave(q_heads // k_count, dim=1)
    scores = torch.matmul(q * root, k.transpose(-1, -2) * root)
    softcap = attr(node, "softcap", 0.0)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    with_bias = scores + bias
    mode = attr(node, "qk_matmul_output_mode", 0)
    qk_output = with_bias if mode == 2 else scores
    precision = attr(node, "softmax_precision")
    if precision is not None:
        with_bias = with_bias.to(torch_dtype(precision))
    # softmax where a row of -inf (nothing to attend) gives zeros, not NaN
    row_max = torch.amax(with_bias, -1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    exp = torch.exp(with_bias - row_max)
    total = exp.sum(-1, keepdim=True)
    probabilities = exp / torch.where(total == 0, torch.ones_like(total), total)
    masked_rows = torch.isneginf(torch.amax(bias, -1, keepdim=True))
    probabilities = torch.where(masked_rows, torch.zeros_like(probabilities), probabilities)
    if mode == 3:
        qk_output = probabilities
    output = torch.matmul(probabilities.to(dtype), v)
    if three_d:
        output = output.transpose(1, 2).reshape(output.size(0), output.size(2), -1)
    if half:
        return (output.to(out_dtype), present_key.to(out_dtype), present_value.to(out_dtype),
                qk_output.to(out_dtype))
    return output, present_key, present_value, qk_output.to(dtype)



@lowers("RotaryEmbedding", since=23)
def rotary_embedding(ctx, node, x, cos_cache, sin_cache, position_ids=None):
    """As the ONNX reference: rotate the first rotary_embedding_dim channels of every head."""
    shape = node.inputs[0].shape
    four_d = len(shape) == 4
    if four_d:
        x = x.transpose(1, 2)  # [batch, seq, heads, head]
        head_size = shape[3]
    else:
        head_size = shape[2] // attr(node, "num_heads")
        x = x.reshape(x.size(0), x.size(1), attr(node, "num_heads"), head_size)
    rotary = attr(node, "rotary_embedding_dim", 0) or head_size
    rotate, keep = x[..., :rotary], x[..., rotary:]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids], sin_cache[position_ids]
    cos, sin = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)
    if attr(node, "interleaved", 0):
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate[..., : rotary // 2], rotate[..., rotary // 2:]
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if attr(node, "interleaved", 0):
        rotated = torch.stack([real, imag], -1).flatten(-2)
    else:
        rotated = torch.cat([real, imag], -1)
    y = torch.cat([rotated, keep], -1)
    if four_d:
        return y.transpose(1, 2)
    return y.reshape(y.size(0), y.size(1), -1)


@lowers("LinearAttention", since=27)
def linear_attention(ctx, node, query, key, value, past_state=None, decay=None, beta=None):
    """As the ONNX reference: the recurrent state update, token by token (the length is static),
    in float32; update_rule linear, gated, delta or gated_delta; grouped KV heads."""
    rule = attr(node, "update_rule", "gated_delta")
    q_heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    steps = node.inputs[0].shape[1]
    d_k = node.inputs[0].shape[2] // q_heads
    d_v = node.inputs[2].shape[2] // kv_heads
    group = q_heads // kv_heads
    batch = query.size(0)

    def heads(x, count):  # (B, T, H*D) → (B, H, T, D), float32
        return x.reshape(batch, steps, count, -1).transpose(1, 2).float()

    q, k, v = heads(query, q_heads), heads(key, kv_heads), heads(value, kv_heads)
    if gating:
        decay_heads = heads(decay, kv_heads)  # (B, H_kv, T, 1 or d_k)
    if delta:
        beta_heads = beta.reshape(batch, steps, node.inputs[5].shape[-1], 1).transpose(1, 2).float()
    state = past_state.float() if past_state is not None else ctx.call(
        torch.zeros, [batch, kv_heads, d_k, d_v], dtype=torch.float32)
    scale = attr(node, "scale") or 1.0 / math.sqrt(d_k)
    outputs = []
    for i in range(steps):
        k_t, v_t = k[:, :, i, :], v[:, :, i, :]
        if gating:
            state = state * torch.exp(decay_heads[:, :, i, :]).unsqueeze(-1)
        if delta:
            retrieved = torch.einsum("bhdm,bhd->bhm", state, k_t)
            v_t = beta_heads[:, :, i, :] * (v_t - retrieved)
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        shared = state if group == 1 else state.repeat_interleave(group, dim=1)
        outputs.append(scale * torch.einsum("bhd,bhdm->bhm", q[:, :, i, :], shared))
    output = torch.stack(outputs, 2).transpose(1, 2).reshape(batch, steps, q_heads * d_v).to(query.dtype)
    return output, state.to(past_state.dtype if past_state is not None else query.dtype)


@lowers("FlexAttention", domain="ai.onnx.preview")
def flex_attention(ctx, node, q, k, v):
    """softmax(score_mod(Q·Kᵀ · scale)), prob_mod on the result, then · V; the modifiers are
    subgraphs (submodules). K/V heads are shared by contiguous groups of query heads."""
    q_heads, kv_heads = node.inputs[0].shape[1], node.inputs[1].shape[1]
    if q_heads != kv_heads:
        k, v = k.repeat_interleave(q_heads // kv_heads, 1), v.repeat_interleave(q_heads // kv_heads, 1)
    double = node.inputs[0].dtype == ir.DataType.DOUBLE
    precision = torch_dtype(attr(node, "softmax_precision", ir.DataType.DOUBLE if double else ir.DataType.FLOAT))
    scale = attr(node, "scale", 1.0 / math.sqrt(node.inputs[0].shape[3]))
    scores = torch.matmul(q.to(precision), k.to(precision).transpose(-1, -2)) * scale
    if attr(node, "score_mod") is not None:
        scores = ctx.call_subgraph(attr(node, "score_mod"), "score_mod", scores)[0]
    probabilities = torch.softmax(scores, -1)
    if attr(node, "prob_mod") is not None:
        probabilities = ctx.call_subgraph(attr(node, "prob_mod"), "prob_mod", probabilities)[0]
    return torch.matmul(probabilities, v.to(precision)).to(v.dtype)
