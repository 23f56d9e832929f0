"""Pointwise convs whose pixels do not fill vector registers: output channels in the vectors,
weights packed into channel blocks at compile time.

A 1x1 ``conv2d`` (stride 1, no padding, NCHW, float32, constant OIHW weight) whose pixel count
per image is not a multiple of the target's vector lanes (ResNet-50's 14x14 = 196 and 7x7 = 49
layers on AVX-512) becomes a call of ``conv2d_packed``: the same GEMM, its weight repacked into
``[O / b, C, b]``, blocks of ``b`` output channels that are whole vectors
(`schedules.cpu.common.channel_tile` picks ``b`` and the pixel tile). `schedules/cpu/pointwise.py`
keeps a ``pixels x b`` tile of outputs in registers, one broadcast input pixel per row of FMAs,
and writes the tile back to NCHW transposed; the block makes each tile's weights one contiguous
run (the plain ``[C, O]`` transpose measured 1.7x slower: each input channel's row is 8 KB
away, on another page). Measured on AVX-512, 2 threads, against the pixel-vectorized kernel
(7 or 14 of 16 lanes): 512x7x7 -> 2048 2.5x faster, 2048x7x7 -> 512 2.8x, 14x14 layers 1.3x.

`unpack_weight` inverts the packing; the pass records which weight each packed one replaces
(``origins``: the tuning gate finds a layer's kernels by its weights).

Run before legalization and after `FuseDepthwisePointwise` (the CPU compile pipeline does).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import mutator

from .relax_fuse_dwpw import _is_conv, _layout_ok
from .relax_rewrite import CallRewritePass, CallRewriter, constant_value, digest

PACKED_NAME = "conv2d_packed"  # the PrimFunc's compute block (`schedules.cpu.pointwise`)


def packed_pointwise(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """``out[n, o, y, x] = sum_c x[n, c, y, x] * w[o // b, c, o % b]`` (``w``: [O/b, C, b])."""
    batch, channels, height, width = x.shape
    blocks, _, block = w.shape
    rc = te.reduce_axis((0, channels), name="rc")
    return te.compute(
        (batch, blocks * block, height, width),
        lambda n, o, y, z: te.sum(x[n, rc, y, z] * w[o // block, rc, o % block], axis=rc),
        name=PACKED_NAME)


def pack_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """OIHW ``[O, C, 1, 1]`` -> ``[O / block, C, block]``."""
    out_channels, in_channels = weight.shape[:2]
    return np.ascontiguousarray(
        weight.reshape(out_channels // block, block, in_channels).transpose(0, 2, 1))


def unpack_weight(packed: np.ndarray) -> np.ndarray:
    """``[O / b, C, b]`` -> OIHW ``[O, C, 1, 1]`` (inverse of `pack_weight`)."""
    blocks, in_channels, block = packed.shape
    return np.ascontiguousarray(
        packed.transpose(0, 2, 1).reshape(blocks * block, in_channels, 1, 1))


@mutator
class _Rewriter(CallRewriter):
    def __init__(self, mod: tvm.IRModule, lanes: int, accumulators: int):
        super().__init__(mod)
        self.lanes = lanes
        self.accumulators = accumulators

    def visit_call_(self, call):
        from dwsep_compiler.schedules.cpu.common import channel_tile

        call = super().visit_call_(call)
        if not _is_conv(call):
            return call
        attrs = call.attrs
        x, w = call.args
        weight = constant_value(self, w)
        try:
            x_shape = [int(d) for d in x.ty.shape]
            w_shape = [int(d) for d in w.ty.shape]
        except (AttributeError, TypeError, ValueError):  # symbolic shapes: leave them alone
            return call
        if (weight is None or len(x_shape) != 4 or w_shape[2:] != [1, 1]
                or int(attrs.groups) != 1 or not _layout_ok(attrs)
                or any(int(p) != 0 for p in attrs.padding)
                or any(int(s) != 1 for s in attrs.strides)
                or str(call.ty.dtype) != "float32" or str(x.ty.dtype) != "float32"
                or weight.dtype != np.float32):
            return call
        pixels = x_shape[2] * x_shape[3]
        if pixels % self.lanes == 0:  # whole vectors of pixels: the pixel-vectorized GEMM
            return call
        tile = channel_tile(pixels, w_shape[0], self.lanes, self.accumulators)
        if tile is None:
            return call
        block, _ = tile
        packed = pack_weight(weight, block)
        self.origins[digest(packed)] = digest(weight)
        packed = relax.const(packed, "float32")
        self.rewritten += 1
        return self.builder_.call_te(packed_pointwise, x, packed, primfunc_name_hint=PACKED_NAME)


@tvm.transform.module_pass(opt_level=0, name="PackPointwiseWeights")
class PackPointwiseWeights(CallRewritePass):
    """Rewrite the pointwise conv2d calls whose pixels are not whole vectors of ``lanes`` into
    `packed_pointwise` calls with packed constant weights (``rewritten`` counts them)."""

    drop_unused = True

    def __init__(self, lanes: int, accumulators: int):
        super().__init__()
        self.lanes = lanes
        self.accumulators = accumulators

    def rewriter(self, mod):
        return _Rewriter(mod, self.lanes, self.accumulators)
