"""Fused depthwise + pointwise convolution on CPUs: the depthwise output never hits memory.

For each output row y the depthwise results of all ``M*r`` channels are computed into a small
buffer (``M*r x width`` floats, L2-resident), then the pointwise GEMM consumes it from cache
with the same register-blocked micro-kernel as `pointwise.py`, one block of output channels at
a time across the whole row, and the epilogue (bias, ReLU, add) writes each tile while it is
hot. Bands of output rows (`common.row_band`, where one row's padded input rows overflow L1;
else single rows) spread over the cores, each building its padded input rows once. Knobs
(sampled with ``tunable=True``): ``co_block``, ``vectors``, ``band_rows``. Pairs up with
`dwsep_compiler.passes.lowering.fuse_dwpw`, which makes these PrimFuncs.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (divisors, fold_bias, fused_dwpw_blocks, knob,
                                               largest_divisor, output_dtype)
from dwsep_compiler.schedules.cpu.knobs import L1_DATA_BYTES, cpu_knobs
from dwsep_compiler.schedules.cpu.tiling import row_band, vector_tile


class FusedDepthwisePointwise(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        found = fused_dwpw_blocks(func)
        if found is None:
            return None
        sch, pad, dw, pw, epilogue = found
        epilogue = fold_bias(sch, pw, epilogue)
        for block in epilogue[:-1]:
            sch.compute_inline(block)
        last = epilogue[-1] if epilogue else None

        knobs = cpu_knobs(target, output_dtype(func))
        b, n, y, x, rc = sch.get_loops(pw)
        out_channels, width = int(sch.get(n).extent), int(sch.get(x).extent)
        tile, vector = vector_tile(width, knobs.lanes, max_vectors=2)
        registers = max(1, -(-tile // knobs.lanes))
        co_block = largest_divisor(out_channels, max(1, knobs.accumulators // registers))
        vectors = knob(sch, tunable, tile // vector, divisors(width // vector, 4))
        co_block = knob(sch, tunable, co_block, divisors(out_channels, knobs.accumulators))
        height = int(sch.get(y).extent)
        # Where one output row's padded input rows (all channels) overflow L1, bands of rows
        # build them once per band rather than once per output row (each row kh times).
        _, channels, _, padded_w = (int(d) for d in sch.get(pad).writes[0].source.shape)
        taps = int(sch.get(sch.get_loops(dw)[-2]).extent)
        spill = channels * taps * padded_w * 4 > L1_DATA_BYTES
        band_rows = knob(sch, tunable, (row_band(height) or 1) if spill else 1,
                         divisors(height, 16))

        xo, xv, xl = sch.split(x, [None, vectors, vector])
        no, ni = sch.split(n, [None, co_block])
        yb, y = sch.split(y, [None, band_rows])
        # Channel blocks outside the row's segments: a tile's output rows are written along
        # the image row, co_block streams at a time (segments outside channel blocks wrote
        # every output plane per segment, 128 bytes each, and the stores missed): in-model
        # (VGG-19 rank 1, AVX-512, interleaved builds) the 64x224x224 pair 3.80 -> 3.51 ms,
        # the 3-channel one 0.96 -> 0.70 ms, the model 0.985x; standalone 0.91x and 0.68x.
        sch.reorder(b, yb, y, no, xo, rc, ni, xv, xl)
        outer = sch.fuse(b, yb)
        sch.parallel(outer)
        sch.unroll(ni)
        sch.unroll(xv)
        sch.vectorize(xl)

        # The depthwise row of all channels, right before the channel blocks that read it.
        sch.compute_at(dw, y, preserve_unit_loops=True)
        db, c, dy, dx, ry, rx = sch.get_loops(dw)[-6:]
        # The row in segments of the GEMM tile's width, each segment's sums in registers.
        dxs, dxo, dxl = sch.split(dx, [None, vectors, vector])
        sch.reorder(db, dy, c, dxs, ry, rx, dxo, dxl)
        sch.unroll(ry)
        sch.unroll(rx)
        # Taps and vectors unrolled together: LLVM keeps each vector's sum in a register across
        # the taps. With the vector loop rolled, each tap stored and reloaded it, and the first
        # reload (a zmm load over the init's two ymm stores) stalled on store forwarding: the
        # 64x224x224 pair 4.1-4.7 -> 2.8-2.9 ms standalone, 4.1 -> 3.7 ms in VGG-19 (AVX-512).
        sch.unroll(dxo)
        sch.vectorize(dxl)
        # The padded input rows this band of output rows reads: built once, for all segments.
        sch.compute_at(pad, outer, preserve_unit_loops=True)

        if last is not None:
            sch.reverse_compute_at(last, xo, preserve_unit_loops=True)
            sch.vectorize(sch.split(sch.get_loops(last)[-1], [None, vector])[1])
        sch.decompose_reduction(pw, rc)
        sch.decompose_reduction(dw, ry)
        return sch
