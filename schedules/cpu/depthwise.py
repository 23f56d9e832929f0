"""Depthwise convolution (group = in_channels, depth multiplier r) on CPUs.

Output rows are cut into bands (`common.row_band`); each band's padded input rows are built
once (compute_at the band, so they stay in L1; whole-vector copies where the rows are whole
vectors, `common.build_padded_rows`) and read by the channel's r output channels.
Output rows are vectorized along W, several vectors per row in registers while the kh x kw taps
stream over them. Channels x bands spread over the cores.

A strided conv's padded plane is stored as ``stride`` planes of every stride-th column, so that
each tap's vector of outputs is one contiguous load rather than a gather (3x3 stride 2 at
56x56-14x14: 1.8-1.9x; ResNet's 3-channel 7x7 stem: 3.9x).

Knobs (sampled with ``tunable=True``): ``vectors`` per row tile, ``band_rows``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (column_stride, divisors, extents, find_depthwise,
                                               inline_epilogue, knob, output_dtype)
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
from dwsep_compiler.schedules.cpu.tiling import build_padded_rows, row_band, vector_tile


class Depthwise(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        found = find_depthwise(func)
        if found is None:
            return None
        blocks, multiplier = found
        sch = blocks.sch
        w = extents(sch, blocks.conv)[3]
        knobs = cpu_knobs(target, output_dtype(func))
        tile, vector = vector_tile(w, knobs.lanes, max_vectors=4)
        vectors = knob(sch, tunable, tile // vector, divisors(w // vector, 8))
        h = extents(sch, blocks.conv)[2]
        band_rows = knob(sch, tunable, row_band(h) or h, divisors(h, 16) + [h])
        return self._schedule(blocks, knobs, multiplier, vectors, vector, band_rows, tunable)

    def _schedule(self, blocks, knobs, multiplier: int, vectors, vector: int, band_rows,
                  tunable: bool):
        sch = blocks.sch
        conv = blocks.conv
        stride = column_stride(sch, conv) if blocks.pad is not None else None
        last = inline_epilogue(blocks)
        r = multiplier
        sch.transform_block_layout(
            conv, lambda n, f, y, x, c, ky, kx: (n, f // r, f % r, y, x, c, ky, kx))
        nn, ch, j, yy, xx, rc, ky, kx = sch.get_loops(conv)
        xo, xv, xl = sch.split(xx, [None, vectors, vector])
        # Bands of output rows, each with its own padded rows (built per band, shared by the r
        # outputs of a channel), spread over the cores with the channels.
        yb, yy = sch.split(yy, [None, band_rows])
        sch.reorder(nn, ch, yb, j, yy, xo, rc, ky, kx, xv, xl)
        outer = sch.fuse(nn, ch, yb)
        sch.parallel(outer)
        if blocks.pad is not None:
            if stride and stride > 1:
                # A strided conv's vector of outputs reads every stride-th input column: store
                # the padded plane as `stride` planes of columns x = i * stride + phase, so each
                # tap's vector is one contiguous load instead of a gather.
                sch.transform_layout(blocks.pad, ("write", 0),
                                     lambda n, c, y, x: (n, c, y, x % stride, x // stride),
                                     pad_value=0.0)
            sch.compute_at(blocks.pad, outer, preserve_unit_loops=True)
            pad_loops = sch.get_loops(blocks.pad)
            if stride and stride > 1:
                # Copy phase by phase: contiguous stores into each phase's plane (vectorized in
                # the natural order they were scatters, 4x slower than the conv at 14x14).
                columns, phase = sch.split(pad_loops[-1], [None, stride])
                sch.reorder(phase, columns)
                sch.vectorize(sch.split(columns, [None, knobs.lanes])[1])
            else:
                build_padded_rows(sch, blocks.pad, outer, knobs.lanes, tunable)
        sch.unroll(ky)
        sch.unroll(kx)
        sch.unroll(xv)
        sch.vectorize(xl)
        if last is not None:
            sch.reverse_compute_at(last, outer, preserve_unit_loops=True)
            sch.vectorize(sch.split(sch.get_loops(last)[-1], [None, knobs.lanes])[1])
        sch.decompose_reduction(conv, rc)
        return sch

