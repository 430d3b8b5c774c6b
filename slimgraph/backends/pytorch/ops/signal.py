"""Signal processing: window functions (HannWindow, HammingWindow, BlackmanWindow → torch's
*_window), DFT (torch.fft, real or complex, one-sided, inverse), STFT (framing by unfold, then the
DFT) and MelWeightMatrix (runtime.mel_weight_matrix)."""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops._common import scalar, torch_dtype
from slimgraph.errors import SlimgraphError


def _window(make):
    def lower(ctx, node, size):
        length = scalar(size)
        dtype = torch_dtype(attr(node, "output_datatype", 1))
        # computed in float64 like the ONNX reference, then cast
        window = make(length, periodic=bool(attr(node, "periodic", 1)), dtype=torch.float64)
        return window.to(dtype)

    return lower


lowers("HannWindow", since=17, tensors=False)(_window(lambda n, **kw: torch.hann_window(n, **kw)))
# ONNX's Hamming coefficients are 25/46 and 21/46 (torch's default 0.54/0.46 rounds them)
lowers("HammingWindow", since=17, tensors=False)(
    _window(lambda n, **kw: torch.hamming_window(n, alpha=25 / 46, beta=21 / 46, **kw)))
lowers("BlackmanWindow", since=17, tensors=False)(_window(lambda n, **kw: torch.blackman_window(n, **kw)))


@lowers("STFT", since=17, tensors=False)
def stft(ctx, node, signal, frame_step, window=None, frame_length=None):
    """Frames of the signal (unfold), windowed, each through the DFT: [batch, frames, bins, 2]."""
    signal = ctx.tensor(signal)
    values = torch.complex(signal[..., 0], signal[..., 1]) if node.inputs[0].shape[-1] == 2 else signal[..., 0]
    if frame_length is not None:
        length = scalar(frame_length)
    elif window is not None:
        length = node.inputs[2].shape[0]
    else:
        raise SlimgraphError("pytorch backend: STFT needs a window or a frame_length")
    frames = values.unfold(1, length, scalar(frame_step))
    if window is not None:
        frames = frames * ctx.tensor(window)
    spectrum = torch.fft.fft(frames, dim=-1)
    if attr(node, "onesided", 1):
        spectrum = spectrum.narrow(-1, 0, length // 2 + 1)
    return torch.stack([spectrum.real, spectrum.imag], -1).to(torch_dtype(node.inputs[0].dtype))


@lowers("MelWeightMatrix", since=17, tensors=False)
def mel_weight_matrix(ctx, node, mel_bins, dft_length, sample_rate, lower_hertz, upper_hertz):
    arguments = [scalar(v) for v in (mel_bins, dft_length, sample_rate, lower_hertz, upper_hertz)]
    return ctx.call_or_fold(runtime.mel_weight_matrix, *arguments, torch_dtype(attr(node, "output_datatype", 1)))


def _dft(ctx, node, x, length, axis: int):
    """DFT over `axis` of a real ([..., 1]) or complex ([..., 2]) signal; output [..., 2], or
    [..., 1] for the inverse of a one-sided spectrum."""
    rank = len(node.inputs[0].shape)
    axis = axis % rank  # an axis of the full input (also when traced); the same index in the complex view
    signal = torch.complex(x[..., 0], x[..., 1]) if node.inputs[0].shape[-1] == 2 else x[..., 0]
    n = scalar(length) if length is not None else None
    inverse, onesided = attr(node, "inverse", 0), attr(node, "onesided", 0)
    dtype = torch_dtype(node.inputs[0].dtype)
    if inverse and onesided:  # one-sided spectrum → real signal
        return torch.fft.irfft(signal, n=n, dim=axis).unsqueeze(-1).to(dtype)
    transformed = (torch.fft.ifft if inverse else torch.fft.fft)(signal, n=n, dim=axis)
    if onesided:
        transformed = transformed.narrow(axis, 0, transformed.size(axis) // 2 + 1)
    return torch.stack([transformed.real, transformed.imag], -1).to(dtype)


@lowers("DFT", since=20, tensors=False)
def dft(ctx, node, x, length=None, axis=None):
    return _dft(ctx, node, ctx.tensor(x), length, scalar(axis) if axis is not None else -2)


@lowers("DFT", until=19, tensors=False)
def dft_attribute_axis(ctx, node, x, length=None):
    return _dft(ctx, node, ctx.tensor(x), length, attr(node, "axis", 1))
