"""Convs whose output rows are not whole vectors: output channels in the vectors, weights
packed into channel blocks at compile time.

A float32 (or float16) NCHW ``conv2d`` with a constant OIHW weight and groups = 1 whose pixels do not fill
vector registers (1x1: the pixel count per image is not a multiple of the target's lanes, with
more than `MAX_UNPACKED_POINTWISE_CHANNELS` input channels on x86; larger kernels: the output row
is not, e.g. ResNet-50's and VGG's 56, 28, 14 and 7 on AVX-512)
becomes a call of ``conv2d_packed``: the same computation, its weight repacked into blocks of
``b`` output channels that are whole vectors, ``[O / b, C, b]`` for 1x1 and
``[O / b, C, kh, kw, b]`` otherwise (`schedules.cpu.tiling.channel_tile` picks ``b`` and the pixel
tile). `schedules/cpu/packed.py` keeps a ``pixels x b`` tile of outputs in registers, one
broadcast input pixel per row of FMAs, and writes the tile back to NCHW transposed; the block
makes each tile's weights one contiguous run (the plain ``[C, O]`` transpose measured 1.7x
slower: each input channel's row is 8 KB away, on another page). Measured on AVX-512, 2
threads, against the pixel-vectorized kernels (7 or 14 of 16 lanes): 512x7x7 -> 2048
pointwise 2.5x faster, 2048x7x7 -> 512 2.8x, 14x14 pointwise layers 1.2x.

On targets whose FMAs take their scalar from a vector lane (NEON), the convs whose pixels
(pointwise) or output rows *are* whole vectors are packed too, with ``b`` from
`schedules.cpu.tiling.lane_weight_block`: the pixel-vectorized tiles of
`schedules/cpu/pointwise.py` and `conv2d.py` stay and load each reduction step's ``b``
weights as vectors.

The pass can record which weight each packed one replaces (``origins``: the tuning gate finds a
layer's kernels by their ONNX weights).

Run before legalization and after `FuseDepthwisePointwise` (the CPU compile pipeline does).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes import names
from dwsep_compiler.passes.lowering.call_rewriter import (CallRewritePass, CallRewriter,
                                                          constant_value)
from dwsep_compiler.passes.lowering.fuse_dwpw import FLOAT_DTYPES, is_conv, layout_ok
from dwsep_compiler.schedules.cpu.tiling import channel_tile, lane_weight_block

# Pointwise convs with at most this many input channels stay pixel-vectorized (partial
# vectors): the packed tile writes its outputs back to NCHW transposed, a cost the reduction
# amortizes only over enough input channels. Measured in-model against packing them (2-core
# AVX-512, interleaved builds): SqueezeNet rank 1 0.75x the time (its 16 -> 64 at 55x55,
# 32 -> 128 at 27x27, 48 -> 192 and 64 -> 256 at 13x13, the stem's 3 -> 64 at 111x111), ZFNet
# rank 1 0.91x, AlexNet 0.98x, the original SqueezeNet 0.95x; Fashion, ddddocr, Inception-v2
# and ResNet-50 unchanged (0.97-1.01x). 64 and 128 measured alike on SqueezeNet; standard kxk
# convs keep packing at any width (SqueezeNet's 3x3 unpacked: 1.05x slower).
# x86 only: NEON's 4-lane registers hold no useful partial tile of such pixel counts (49
# pixels: one odd 7-wide vector split by LLVM), and packing measured (emulated Cortex-A76,
# instructions) 64 -> 128 at 7x7 12.1 -> 2.1x the FMA floor, 32 -> 128 at 13x13 9.9 -> 2.4x,
# 16 -> 64 at 27x27 4.1 -> 3.4x.
MAX_UNPACKED_POINTWISE_CHANNELS = 64


def packed_pointwise(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """``out[n, o, y, x] = sum_c x[n, c, y, x] * w[o // b, c, o % b]`` (``w``: [O/b, C, b])."""
    batch, channels, height, width = x.shape
    blocks, _, block = w.shape
    rc = te.reduce_axis((0, channels), name="rc")
    return te.compute(
        (batch, blocks * block, height, width),
        lambda n, o, y, z: te.sum(x[n, rc, y, z] * w[o // block, rc, o % block], axis=rc),
        name=names.PACKED_CONV)


def packed_conv(x: te.Tensor, w: te.Tensor, strides, padding, dilation) -> te.Tensor:
    """A conv over packed ``[O/b, C, kh, kw, b]`` weights (``padding``: top, left, bottom,
    right), its input padded by a ``pad_temp`` stage."""
    batch, channels, height, width = (int(d) for d in x.shape)
    blocks, _, kh, kw, block = (int(d) for d in w.shape)
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    padded = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right], name=names.PAD)
    rc = te.reduce_axis((0, channels), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (batch, blocks * block, out_h, out_w),
        lambda n, o, y, z: te.sum(
            padded[n, rc, y * sh + ry * dh, z * sw + rx * dw]
            * w[o // block, rc, ry, rx, o % block], axis=[rc, ry, rx]),
        name=names.PACKED_CONV)


def pack_weight(weight: np.ndarray, block: int) -> np.ndarray:
    """OIHW -> ``[O / block, C, block]`` (1x1) or ``[O / block, C, kh, kw, block]``."""
    out_channels, in_channels, kh, kw = weight.shape
    packed = weight.reshape(out_channels // block, block, in_channels, kh, kw)
    packed = packed.transpose(0, 2, 3, 4, 1)
    if (kh, kw) == (1, 1):
        packed = packed.reshape(out_channels // block, in_channels, block)
    return np.ascontiguousarray(packed)


@mutator
class _Rewriter(CallRewriter):
    def __init__(self, mod: tvm.IRModule, lanes: int, accumulators: int,
                 track_origins: bool = False, fma_by_lane: bool = False):
        super().__init__(mod, track_origins)
        self.lanes = lanes
        self.accumulators = accumulators
        self.fma_by_lane = fma_by_lane

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_conv(call):
            return call
        attrs = call.attrs
        x, w = call.args
        weight = constant_value(self, w)
        try:
            x_shape = [int(d) for d in x.ty.shape]
            w_shape = [int(d) for d in w.ty.shape]
        except (AttributeError, TypeError, ValueError):  # symbolic shapes: leave them alone
            return call
        dtype = str(call.ty.dtype)
        if (weight is None or len(x_shape) != 4 or int(attrs.groups) != 1
                or not layout_ok(attrs) or dtype not in FLOAT_DTYPES
                or str(x.ty.dtype) != dtype or weight.dtype != np.dtype(dtype)):
            return call
        lanes = self.lanes * 4 // weight.dtype.itemsize  # float16: twice the float32 lanes
        _, _, out_h, out_w = (int(d) for d in call.ty.shape)
        pointwise = (w_shape[2:] == [1, 1] and all(int(p) == 0 for p in attrs.padding)
                     and all(int(s) == 1 for s in attrs.strides))
        # The pixel-vectorized kernels vectorize the pixels (pointwise) or an output row.
        if (out_h * out_w if pointwise else out_w) % lanes == 0:
            block = lane_weight_block(w_shape[0], lanes) if self.fma_by_lane else None
            if block is None:
                return call
        elif (pointwise and not self.fma_by_lane
              and w_shape[1] <= MAX_UNPACKED_POINTWISE_CHANNELS):
            return call
        else:
            lane_width = out_w if pointwise and self.fma_by_lane else None
            tile = channel_tile(out_h * out_w, w_shape[0], lanes, self.accumulators, lane_width)
            if tile is None:
                return call
            block, _ = tile
        packed = pack_weight(weight, block)
        self.replaced(packed, weight)
        packed = relax.const(packed, dtype)
        self.rewritten += 1
        if pointwise:
            return self.builder_.call_te(packed_pointwise, x, packed,
                                         primfunc_name_hint=names.PACKED_CONV)
        return self.builder_.call_te(
            packed_conv, x, packed, [int(s) for s in attrs.strides],
            [int(p) for p in attrs.padding], [int(d) for d in attrs.dilation],
            primfunc_name_hint=names.PACKED_CONV)


@tvm.transform.module_pass(opt_level=0, name="PackConvWeights")
class PackConvWeights(CallRewritePass):
    """Rewrite the conv2d calls whose pixels (pointwise) or output rows are not whole vectors of
    ``lanes`` (float32 lanes of a vector register; float16 convs get twice as many) into
    `packed_pointwise` / `packed_conv` calls with packed constant weights (``rewritten`` counts
    them). With ``fma_by_lane`` (NEON) the convs whose pixels or rows are
    whole vectors are packed too, in blocks of `lane_weight_block` channels: the
    pixel-vectorized tiles then load each reduction step's weights for their rows as vectors."""

    drop_unused = True

    def __init__(self, lanes: int, accumulators: int, track_origins: bool = False,
                 fma_by_lane: bool = False):
        super().__init__(track_origins)
        self.lanes = lanes
        self.accumulators = accumulators
        self.fma_by_lane = fma_by_lane

    def make_rewriter(self, mod):
        return _Rewriter(mod, self.lanes, self.accumulators, track_origins=self.track_origins,
                         fma_by_lane=self.fma_by_lane)
