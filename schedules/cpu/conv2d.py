"""Standard and grouped convolution (any kernel) on CPUs: direct convolution, register-blocked.

The convs the rewrite leaves alone (skipped layers, ``--rank full`` comparisons, the original
model) must not become the slow path. Output tile: ``co_block`` channels x ``vectors * lanes``
pixels of one row in vector registers; the reduction runs over input channels and taps. The
padded input is materialized once (a parallel, vectorized copy); the epilogue runs per row tile.

Knobs (sampled with ``tunable=True``): ``co_block``, ``vectors``. For grouped convs (AlexNet's,
ResNeXt's; the rewrite skips them) ``co_block`` divides a group's output channels, so that a tile
reads one group's inputs; depthwise convs are `depthwise.py`'s.

Where an output row is not whole vectors (56, 28, 14, 7 pixels on AVX-512) the weights are
packed into blocks of output channels and the tile turns around (`packed.py`). On NEON (FMA by
lane) the convs whose rows are whole vectors are packed too and keep this tile: each tap's
weights for the tile's channels are one vector copy that the rows read by lane.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (divisors, extents, find_conv, group_out_channels,
                                               inline_epilogue, knob, largest_divisor, output_dtype)
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
from dwsep_compiler.schedules.cpu.packed import (add_lane_weights, find_packed_conv,
                                                 packed_lane_block, schedule_channel_tile)
from dwsep_compiler.schedules.cpu.tiling import copy_padded_input, vector_tile


class Conv2D(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        knobs = cpu_knobs(target, output_dtype(func))
        blocks = find_conv(func)
        block = None  # output channels per packed weight block (lane weights)
        if blocks is None:
            packed = find_packed_conv(func, kernel_1x1=False)
            if packed is None:
                return None
            block = packed_lane_block(packed, knobs, extents(packed.sch, packed.conv)[3])
            if block is None:
                return schedule_channel_tile(packed, target, tunable)
            blocks = packed
        sch = blocks.sch
        n, co, h, w, ci, kh, kw = extents(sch, blocks.conv)
        tile, vector = vector_tile(w, knobs.lanes, max_vectors=2)
        if block is not None:
            # The block is fixed by the packing; the row takes what accumulators are left.
            vectors = knob(sch, tunable, largest_divisor(w // vector, knobs.accumulators // block),
                           divisors(w // vector, knobs.accumulators // block))
            return self._schedule(blocks, knobs, block, vectors, vector, lane_weights=True)
        group_co = group_out_channels(sch, blocks)  # co, but for grouped convs
        registers = max(1, -(-tile // knobs.lanes))
        co_block = largest_divisor(group_co, max(1, knobs.accumulators // registers))
        vectors = knob(sch, tunable, tile // vector, divisors(w // vector, 4))
        co_block = knob(sch, tunable, co_block, divisors(group_co, knobs.accumulators))
        return self._schedule(blocks, knobs, co_block, vectors, vector)

    def _schedule(self, blocks, knobs, co_block, vectors, vector, lane_weights=False):
        sch = blocks.sch
        conv = blocks.conv
        last = inline_epilogue(blocks)
        nn, ff, yy, xx, rc, ry, rx = sch.get_loops(conv)
        fo, fi = sch.split(ff, [None, co_block])
        xo, xv, xl = sch.split(xx, [None, vectors, vector])
        # Rows outside channel tiles: the kh input rows stay in cache across channel blocks.
        sch.reorder(nn, yy, fo, xo, rc, ry, rx, fi, xv, xl)
        if lane_weights:  # packed weights: one vector copy per tap and input channel
            add_lane_weights(sch, conv, rx)
        outer = sch.fuse(nn, yy, fo)
        sch.parallel(outer)
        sch.unroll(fi)
        sch.unroll(xv)
        sch.vectorize(xl)
        if blocks.pad is not None:
            copy_padded_input(sch, blocks.pad, knobs.lanes)
        if last is not None:
            sch.reverse_compute_at(last, outer, preserve_unit_loops=True)
            sch.vectorize(sch.split(sch.get_loops(last)[-1], [None, knobs.lanes])[1])
        sch.decompose_reduction(conv, rc)
        return sch
