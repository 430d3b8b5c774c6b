"""com.microsoft.MatMulNBits through the Triton kernels (interpreted) against ONNX Runtime and the PyTorch
backend: every bit width, block sizes, with and without zero points (packed and float), bias, the GEMV
(one row) and GEMM (several rows) paths, small GPU tiles and the interpreter's wide ones, ternary weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from slimgraph.ir.nbits import unpack
from slimgraph.passes import Pipeline
from tests.backends.triton.helpers import GPU_SETTINGS, assert_matches, linear_model

K, N = 72, 40  # K not a whole number of blocks (padded), N not a power of two


def _quantized(text: str, k: int = K, n: int = N, bias: bool = False) -> ir.Model:
    model = linear_model(k, n, bias=bias)
    Pipeline.parse(text).run(model, verify=False)
    assert [node.op_type for node in model.graph] == ["MatMulNBits"]
    return model


def _feeds(rows: int, k: int = K) -> dict:
    return {"x": np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)}


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64])
@pytest.mark.parametrize("symmetric", [False, True], ids=["zero-points", "symmetric"])
@pytest.mark.parametrize("tiles", ["gpu", "interpreter"])
def test_bits_blocks_zero_points(bits, group_size, symmetric, tiles):
    model = _quantized(f"quantize-weights{{bits={bits},group_size={group_size},symmetric={str(symmetric).lower()}}}",
                       bias=bits == 4)
    launch = GPU_SETTINGS if tiles == "gpu" else None
    for rows in (1, 5):  # GEMV, GEMM
        artifact = assert_matches(model, _feeds(rows), launch=launch)
    (spec,) = {call.spec for call in artifact.plan.calls}
    assert (spec.bits, spec.block_size, spec.zero_points, spec.bias) == (
        bits, group_size, "default" if symmetric else "packed", bits == 4)


@pytest.mark.parametrize("group_size", [128, 256])
def test_large_blocks(group_size):
    model = _quantized(f"quantize-weights{{bits=4,group_size={group_size}}}", k=300, n=24)
    for rows in (1, 3):
        assert_matches(model, _feeds(rows, k=300), launch=GPU_SETTINGS)


def test_float_zero_points():
    """Zero points in the scales' dtype, [N, blocks] (ONNX Runtime takes them as well as packed ones)."""
    model = _quantized("quantize-weights{bits=4,group_size=16}")
    node = next(iter(model.graph))
    packed = node.inputs[3]
    blocks = -(-K // 16)
    unpacked = unpack(packed.const_value.numpy().reshape(N, -1), 4)[:, :blocks].astype(np.float32)
    floats = ir.Value(name="linear.weight.zero_points_float", const_value=ir.tensor(unpacked),
                      type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([N, blocks]))
    model.graph.register_initializer(floats)
    node.replace_input_with(3, floats)
    for rows in (1, 4):
        artifact = assert_matches(model, _feeds(rows))
    assert artifact.plan.calls[0].spec.zero_points == "float"


def test_rows_from_leading_axes():
    """x of any rank: the leading axes are rows (batch · sequence)."""
    model = _quantized("quantize-weights{bits=4}")
    artifact = assert_matches(model, _feeds(6))
    x = _feeds(6)["x"].reshape(2, 3, K)
    flat = artifact(x=x.reshape(6, K))["y"]
    assert np.array_equal(artifact.module(__import__("torch").from_numpy(x))[0].numpy().reshape(6, N), flat)


@pytest.mark.parametrize("variant", ["mixpe", "lut"])
@pytest.mark.parametrize("method", ["absmean", "tequila"])
def test_ternary(variant, method):
    """`ternarize` writes 2-bit codes with zero point 1: the ternary GEMV (MixPE selects or T-MAC's table);
    tequila's dead-zone bias (an Add) becomes the kernel's epilogue."""
    model = linear_model(K, N)
    Pipeline.parse(f"ternarize{{method={method},group_size=16}}").run(model, verify=False)
    for rows in (1, 5):
        artifact = assert_matches(model, _feeds(rows), ternary=variant, launch=GPU_SETTINGS)
    (call,) = artifact.plan.calls
    assert call.spec.ternary == variant
    assert (call.spec.epilogue is not None) == (method == "tequila")
    assert call.launcher.endswith("_ternary")


def test_two_bit_weights_that_are_not_ternary_take_the_general_kernel():
    model = _quantized("quantize-weights{bits=2,group_size=16}")
    assert_matches(model, _feeds(1))
    artifact = assert_matches(model, _feeds(1))
    assert artifact.plan.calls[0].spec.ternary is None
