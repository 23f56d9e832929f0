"""Pointwise (1x1) convolution on mobile GPUs (OpenCL): a register-tiled GEMM.

NCHW, stride 1, no padding: ``out[n, o, p] = sum_c W[o, c] * x[n, c, p]`` over the H*W pixels p.
Each work-item holds a ``co_tile x px_tile`` tile of outputs in private registers (4 x 4 by
default): per input channel it loads ``px_tile`` pixels (one ``float4`` when the pixel count is a
multiple of 4, then every tile starts 16-byte aligned) and ``co_tile`` weights, and does
``co_tile x px_tile`` multiply-adds. A work-group is ``ty x tx`` work-items (channel tiles x pixel
tiles; neighbouring work-items read neighbouring pixels). With local memory, each step over
``k_tile`` input channels first stages the group's ``k_tile x (tx * px_tile)`` pixels and
``(ty * co_tile) x k_tile`` weights in __local memory (cooperative, vectorized loads), every
candidate within the device's local memory. The epilogue (bias, ReLU, clip, residual add) runs
on the register tile, stored as ``float4``.

Knobs (sampled with ``tunable=True``): ``co_tile``, ``px_tile``, ``tx``, ``ty``, ``k_tile``.
Every combination of the candidates schedules the same way (only split factors change), so
MetaSchedule may replay the trace with any decisions.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (conv_input_read, divisors, extents, find_pointwise,
                                               inline_epilogue, knob, largest_divisor)
from dwsep_compiler.schedules.gpu.knobs import gpu_knobs, is_gpu

PIXEL_THREADS = (8, 16, 32, 64)  # tx candidates: work-items along pixels
CHANNEL_THREADS = (1, 2, 4)  # ty candidates: work-items along output channels
K_TILES = (4, 8, 16)  # input channels staged in local memory per step
MIN_LOCAL_CHANNELS = 8  # fewer input channels: no reuse worth a local-memory stage


def _pow2_at_least(n: int, candidates) -> int:
    return next((c for c in candidates if c >= n), candidates[-1])


class Pointwise(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def __init__(self, local_memory: bool = True):
        self.local_memory = local_memory  # stage x and W tiles in __local memory when it fits

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not is_gpu(target):
            return None
        blocks = find_pointwise(func)
        if blocks is None:
            return None
        sch = blocks.sch
        n, co, h, w, ci, kh, kw = extents(sch, blocks.conv)
        knobs = gpu_knobs(target)
        pixels = h * w
        if pixels % knobs.lanes == 0:
            vector = knobs.lanes  # float4 loads and stores: every candidate is whole vectors
            px_tiles = [t for t in (vector, 2 * vector) if pixels % t == 0]
        else:
            vector = 1
            px_tiles = divisors(pixels, knobs.lanes)
        px_default = max(t for t in px_tiles if t <= knobs.lanes)
        co_tiles = divisors(co, 8)
        co_default = largest_divisor(co, 4)
        tx_all = [t for t in PIXEL_THREADS if t * max(CHANNEL_THREADS) <= knobs.max_threads] \
            or [max(1, knobs.max_threads // max(CHANNEL_THREADS))]
        if pixels == 1:
            # One pixel (a 1x1 map: ResNet's last stage at low resolution): the write-back's
            # index does not involve threadIdx.x, and TVM drops its guard, so idle work-items
            # stored their unset registers over the result. One work-item along pixels.
            tx_all = [1]
        ty_all = list(CHANNEL_THREADS)
        tx_default = _pow2_at_least(-(-pixels // px_default), tx_all)
        ty_default = _pow2_at_least(-(-co // co_default), ty_all)

        def largest(default, candidates):  # the largest value any decision may pick
            return max(candidates) if tunable else default

        # Local memory per staged input channel, at the largest tile any decision may pick.
        per_channel = 4 * (largest(px_default, px_tiles) * largest(tx_default, tx_all)
                           + largest(co_default, co_tiles) * largest(ty_default, ty_all))
        k_tiles = [k for k in K_TILES if k * per_channel <= knobs.local_memory and k <= ci]
        use_local = self.local_memory and ci >= MIN_LOCAL_CHANNELS and bool(k_tiles)

        px_tile = knob(sch, tunable, px_default, px_tiles)
        co_tile = knob(sch, tunable, co_default, co_tiles)
        tx = knob(sch, tunable, tx_default, tx_all)
        ty = knob(sch, tunable, ty_default, ty_all)
        k_tile = knob(sch, tunable, max(k for k in k_tiles if k <= 8), k_tiles) if use_local \
            else None
        return self._schedule(blocks, px_tile, co_tile, tx, ty, k_tile, vector)

    def _schedule(self, blocks, px_tile, co_tile, tx, ty, k_tile, vector: int):
        sch = blocks.sch
        conv = blocks.conv
        if blocks.pad is not None:
            sch.compute_inline(blocks.pad)
        last = inline_epilogue(blocks)
        if last is None:
            last = sch.cache_write(conv, 0, "local")
        else:
            sch.set_scope(conv, 0, "local")
        _, _, h, w, _, _, _ = extents(sch, conv)

        def flat(n, c, y, x):
            return (n, c, y * w + x)

        # One pixel axis: NCHW's H and W are contiguous, so the GEMM's N dimension is H*W.
        sch.transform_block_layout(conv, lambda n, f, y, x, c, ky, kx: (n, f, y * w + x, c, ky, kx))
        sch.transform_layout(conv, ("write", 0), flat)
        sch.transform_block_layout(last, flat)
        if k_tile is not None:
            # only the GEMM reads the staged copy (a residual Add of x reads x itself)
            x_read = conv_input_read(sch, conv)
            x_local = sch.cache_read(conv, x_read, "shared", consumer_blocks=[conv])
            w_local = sch.cache_read(conv, x_read + 1, "shared", consumer_blocks=[conv])
            sch.transform_layout(x_local, ("write", 0), flat)
            sch.transform_block_layout(x_local, flat)

        nn, ff, pix, rc, ry, rx = sch.get_loops(conv)
        fb, ft, fi = sch.split(ff, [None, ty, co_tile])
        pb, pt, pi = sch.split(pix, [None, tx, px_tile])
        if k_tile is not None:
            ko, ki = sch.split(rc, [None, k_tile])
            sch.reorder(nn, fb, pb, ft, pt, ko, ry, rx, ki, fi, pi)
        else:
            ko = rc
            sch.reorder(nn, fb, pb, ft, pt, ko, ry, rx, fi, pi)
        group = sch.fuse(nn, fb, pb)
        sch.bind(group, "blockIdx.x")
        sch.bind(ft, "threadIdx.y")
        sch.bind(pt, "threadIdx.x")
        sch.unroll(fi)
        if vector > 1:
            sch.vectorize(sch.split(pi, [None, vector])[1])
        else:
            sch.unroll(pi)
        if k_tile is not None:
            sch.unroll(ki)
            for stage, lanes in ((x_local, vector), (w_local, 1)):
                sch.compute_at(stage, ko, preserve_unit_loops=True)
                loops = sch.get_loops(stage)
                depth = next(i for i, loop in enumerate(loops)
                             if sch.get(loop).same_as(sch.get(ko)))
                fused = sch.fuse(*loops[depth + 1:])
                if lanes > 1:
                    _, tyy, txx, lane = sch.split(fused, [None, ty, tx, lanes])
                    sch.vectorize(lane)
                else:
                    _, tyy, txx = sch.split(fused, [None, ty, tx])
                sch.bind(tyy, "threadIdx.y")
                sch.bind(txx, "threadIdx.x")
        sch.reverse_compute_at(last, pt, preserve_unit_loops=True)
        inner = sch.get_loops(last)[-1]
        if vector > 1:
            sch.vectorize(sch.split(inner, [None, vector])[1])
        sch.decompose_reduction(conv, ko)
        return sch
