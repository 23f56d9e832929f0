"""Multiply-accumulate and parameter counts: the one place they are computed.

MACs are counted for the actual input shapes, batch included. A model's total counts the ops
that do multiply-accumulates (Conv, ConvTranspose, Gemm, MatMul); elementwise ops count 0.
"""

from __future__ import annotations

import math

import onnx

from dwsep_compiler.model import ModelView, attribute


# Every count takes (batch,) out_channels, in_channels, kernel, [out_spatial] in this order, the
# order of an OIHW weight's dimensions; a factorized count takes its rank by keyword.


def conv_macs(batch: int, out_channels: int, in_channels_per_group: int,
              kernel: tuple[int, ...], out_spatial: tuple[int, ...]) -> int:
    return batch * out_channels * in_channels_per_group * math.prod(kernel) * math.prod(out_spatial)


def conv_params(out_channels: int, in_channels_per_group: int, kernel: tuple[int, ...],
                bias: bool) -> int:
    return out_channels * in_channels_per_group * math.prod(kernel) + (out_channels if bias else 0)


def factorized_macs(batch: int, out_channels: int, in_channels: int, kernel: tuple[int, ...],
                    out_spatial: tuple[int, ...], *, rank: int) -> int:
    """Depthwise (M*r filters of kh*kw) plus pointwise (N x M*r): r*(kh*kw + N)*M per pixel."""
    taps = math.prod(kernel)
    return batch * rank * (taps + out_channels) * in_channels * math.prod(out_spatial)


def factorized_params(out_channels: int, in_channels: int, kernel: tuple[int, ...], bias: bool,
                      *, rank: int) -> int:
    taps = math.prod(kernel)
    return in_channels * rank * taps + out_channels * in_channels * rank + (out_channels if bias else 0)


def reduces_macs(out_channels: int, kernel: tuple[int, ...], *, rank: int) -> bool:
    """True when r*(kh*kw + N) < N*kh*kw, i.e. the rewrite cuts multiply-accumulates."""
    taps = math.prod(kernel)
    return rank * (taps + out_channels) < out_channels * taps


def node_macs(node: onnx.NodeProto, view: ModelView) -> int:
    """MACs of one node (0 for ops without multiply-accumulates or with unknown shapes)."""
    shapes = view.shapes
    op = node.op_type
    if op == "Conv":
        w = shapes.get(node.input[1])
        x = shapes.get(node.input[0])
        y = shapes.get(node.output[0])
        if w is None or x is None or y is None:
            return 0
        return conv_macs(x[0], w[0], w[1], tuple(w[2:]), tuple(y[2:]))
    if op == "ConvTranspose":
        w = shapes.get(node.input[1])  # [C_in, C_out/group, *k]
        x = shapes.get(node.input[0])
        if w is None or x is None:
            return 0
        return x[0] * w[0] * w[1] * math.prod(w[2:]) * math.prod(x[2:])
    if op == "Gemm":
        a = shapes.get(node.input[0])
        y = shapes.get(node.output[0])
        if a is None or y is None:
            return 0
        k = a[0] if attribute(node, "transA", 0) else a[1]
        return y[0] * y[1] * k
    if op == "MatMul":
        a = shapes.get(node.input[0])
        y = shapes.get(node.output[0])
        if a is None or y is None:
            return 0
        return math.prod(y) * a[-1]
    return 0


def model_macs(view: ModelView) -> int:
    return sum(node_macs(node, view) for node in view.model.graph.node)
