"""Packing is bit-identical to onnxruntime's MatMulNBitsQuantizer, and decodes to what MatMulNBits computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxruntime.capi._pybind_state import quantize_matmul_2bits, quantize_matmul_4bits, quantize_matmul_8bits
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from slimgraph.ir.nbits import pack, quantize_rtn, roundf, unpack
from slimgraph.measure import evaluate
from slimgraph.passes import Pipeline

ORT_KERNELS = {2: quantize_matmul_2bits, 4: quantize_matmul_4bits, 8: quantize_matmul_8bits}


def ort_packing(weight: np.ndarray, bits: int, block: int, symmetric: bool):
    k, n = weight.shape
    blocks = -(-k // block)
    padded = np.pad(weight, ((0, blocks * block - k), (0, 0)))
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    zero_points = np.zeros((n, -(-blocks // (8 // bits))), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    ORT_KERNELS[bits](packed, padded, scales, zero_points, block, n, blocks * block, symmetric)
    return packed, scales, zero_points


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_arrays_round_trip_with_codes_packed(bits):
    """`--resume` checkpoints store a weight as `to_arrays`: codes packed, as small as in the model."""
    weight = np.random.default_rng(bits).standard_normal((100, 24)).astype(np.float32)
    q = quantize_rtn(weight, bits, 32, symmetric=False)
    arrays = q.to_arrays()
    assert arrays["packed_codes"].nbytes == q.codes.nbytes * bits // 8
    back = type(q).from_arrays(arrays)
    np.testing.assert_array_equal(back.codes, q.codes)
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("shape", [(384, 96), (100, 33)], ids=["even", "ragged"])
def test_bit_identical_to_onnxruntime_kernels(bits, block, symmetric, shape):
    rng = np.random.default_rng(bits * 1000 + block)
    weight = rng.standard_normal(shape).astype(np.float32) * 0.2
    weight[rng.random(shape) < 0.02] = 0.0
    weight[:, 0] = 0.0  # an all-zero column: scale 0
    packed, scales, zero_points = ort_packing(weight, bits, block, symmetric)
    q = quantize_rtn(weight, bits, block, symmetric)
    np.testing.assert_array_equal(q.packed_b(), packed)
    np.testing.assert_array_equal(q.scales, scales)
    if not symmetric:
        np.testing.assert_array_equal(q.packed_zero_points(), zero_points)


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
def test_whole_model_matches_matmul_nbits_quantizer(minilm, bits, symmetric):
    """Every MatMul of MiniLM: our B, scales and zero points equal ORT's quantizer's, byte for byte."""
    proto = ir.serde.serialize_model(minilm)
    theirs = MatMulNBitsQuantizer(proto, bits=bits, block_size=32, is_symmetric=symmetric)
    theirs.process()
    ort_inits = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.model.model.graph.initializer}
    Pipeline.parse(f"quantize-weights{{bits={bits},symmetric={str(symmetric).lower()}}}").run(minilm, verify=False)
    compared = 0
    for node in minilm.graph:
        if node.op_type != "MatMulNBits" or not node.inputs[1].name.startswith("encoder"):
            continue
        weight = node.inputs[1].name.rsplit(".q", 1)[0]
        np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), ort_inits[f"{weight}_Q{bits}"])
        np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), ort_inits[f"{weight}_scales"])
        if not symmetric:
            np.testing.assert_array_equal(node.inputs[3].const_value.numpy(), ort_inits[f"{weight}_zero_points"])
        compared += 1
    assert compared == 36  # q, k, v, o, up, down in 6 layers (the pooler is a Gemm, which ORT skips)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmul_nbits_computes_the_dequantized_weight(mlp_model, bits):
    """MatMulNBits(x) == x @ dequantize(codes) + bias: the rewrite is exact up to the weight rounding."""
    from slimgraph.ir.edit import weight_matrix
    from slimgraph.ir.structure import find_linears
    from slimgraph.measure.inputs import sample_inputs

    feeds = sample_inputs(mlp_model, batch=4)
    expected = {}
    fake = mlp_model.clone()
    for linear in find_linears(fake):
        q = quantize_rtn(weight_matrix(linear), bits, 16, False)
        value = linear.node.inputs[1]
        value.const_value = ir.tensor(q.dequantize(), name=value.name)
    expected = evaluate.run(fake, feeds)["y"]
    Pipeline.parse(f"quantize-weights{{bits={bits},group_size=16}}").run(mlp_model)
    got = evaluate.run(mlp_model, feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_roundf_rounds_halves_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4], np.float32)
    np.testing.assert_array_equal(roundf(x), [1, 2, 3, -1, -3, 0, 2])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
    codes = np.random.default_rng(0).integers(0, 1 << bits, (3, 64)).astype(np.uint8)
    np.testing.assert_array_equal(unpack(pack(codes, bits), bits), codes)
