"""Depthwise convolution (group = in_channels, depth multiplier r) on CPUs.

Output rows are cut into bands (`common.row_band`); each band's padded input rows are built
once (compute_at the band, so they stay in L1; whole-vector copies where the rows are whole
vectors, `common.build_padded_rows`) and read by the channel's r output channels.
Output rows are vectorized along W; a register tile holds several output rows x vectors, and
where the registers allow, all r outputs of the channel (`register_tile`), while the kh x kw
taps stream over it, the taps outside the rows, so that one load of an input row at a tap
serves every row and output of the tile that reads it (3x3, 7 rows: 27 loads per 63 FMAs
instead of 63; 4 rows x 2 outputs: 18 per 72). Channels x bands spread over the cores.

The epilogue (bias, activation, and the slice of rows `widen_depthwise.py` widened to whole
vectors) runs inside the register tile: the accumulators go through it straight to the
output, the last vector of a widened row stored partially (loop partitioning gives it its own
body). Run after the band instead, the conv's outputs made a round trip through a band-sized
buffer, which past TVM's 1 KB stack limit came from the runtime's workspace pool on every
band. Emulated Cortex-A76, Fashion's 32 x 5 depthwise at 14x14 (widened to 16): 180K ->
160K instructions in the kernel, 32K -> 9K outside it; AVX-512, 2 cores, medians of
interleaved runs (`bench/ab.py`): 0.77-0.80x the time at 14x14 to 56x56, level at 7x7 (not
widened).

A strided conv's padded plane is stored as ``stride`` planes of every stride-th column, so that
each tap's vector of outputs is one contiguous load rather than a gather (3x3 stride 2 at
56x56-14x14: 1.8-1.9x; ResNet's 3-channel 7x7 stem: 3.9x).

Knobs (sampled with ``tunable=True``): ``vectors`` per row, ``band_rows``, ``rows`` per
register tile.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (column_stride, divisors, extents, find_depthwise,
                                               inline_epilogue, knob, largest_divisor,
                                               output_dtype)
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
from dwsep_compiler.schedules.cpu.tiling import (build_padded_rows, build_phase_planes, row_band,
                                               schedule_tile_epilogue, vector_tile)


# Output rows per register tile, at most (and tuning's candidates).
ROW_TILE_LIMIT = 8


def register_tile(band_rows: int, row_vectors: int, vectors: int, knobs,
                  multiplier: int = 1) -> tuple[int, int, int]:
    """The register tile of a depthwise conv: ``(outputs, rows, vectors)``, output channels of
    one input channel (its depth multiplier r, or 1) x output rows x vectors per row.

    Each tap's load of an input row serves every output row of the tile that reads it (3 loads
    per output row instead of 9 with a 3x3 kernel and many rows) and every output channel of
    the tile (the r outputs all read the same input channel), so both come first: the r
    outputs where that still leaves at least 2 rows, rows as the largest divisor of the band
    that leaves registers for the kh x kw weights and the loads (12 of 32), then as many of the
    ``vectors`` per row as still fit.

    Emulated Cortex-A76, 3x3, r outputs in the tile against one: 24 x 2 at 32 x 80 (4 rows x 2
    outputs against 8 rows) 0.88x the instructions, with bias + ReLU 0.93x; stride 2 0.85x;
    16 x 3 at 56 x 56 0.87x. Bands of 7 rows keep one output: 7 x 2 accumulators measured
    0.93-0.99x at 28 x 28 but 1.05x at 14 x 14 (spilled), 8 x 2 spilled at 32 x 80 (1.08x)."""
    budget = knobs.accumulators - 12
    if budget < 2:
        return 1, 1, vectors
    if multiplier > 1:
        rows = largest_divisor(band_rows, min(budget // multiplier, ROW_TILE_LIMIT))
        if rows > 1:
            return multiplier, rows, largest_divisor(
                row_vectors, max(1, min(vectors, budget // (rows * multiplier))))
    rows = largest_divisor(band_rows, min(budget, ROW_TILE_LIMIT))
    if rows == 1:
        return 1, 1, vectors
    return 1, rows, largest_divisor(row_vectors, max(1, min(vectors, budget // rows)))


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
        h = extents(sch, blocks.conv)[2]
        band = row_band(h) or h
        outputs, rows, per_row = register_tile(band, w // vector, tile // vector, knobs,
                                               multiplier)
        vectors = knob(sch, tunable, per_row, divisors(w // vector, 8))
        band_rows = knob(sch, tunable, band, divisors(h, 16) + [h])
        rows = knob(sch, tunable, rows, divisors(band, ROW_TILE_LIMIT))
        return self._schedule(blocks, knobs, multiplier, outputs, vectors, vector, band_rows,
                              rows, tunable)

    def _schedule(self, blocks, knobs, multiplier: int, outputs: int, vectors, vector: int,
                  band_rows, rows, tunable: bool):
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
        # Several output rows (and the channel's r outputs, where `register_tile` takes them)
        # per register tile, the taps outside them: the tile's loads of one input row at one
        # tap are the same vector, which LLVM then loads once.
        yo, yi = sch.split(yy, [None, rows])
        if outputs > 1:
            sch.reorder(nn, ch, yb, yo, xo, rc, ky, kx, j, yi, xv, xl)
            sch.unroll(j)
        else:
            sch.reorder(nn, ch, yb, j, yo, xo, rc, ky, kx, yi, xv, xl)
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
            if stride and stride > 1:
                build_phase_planes(sch, blocks.pad, outer, stride, knobs.lanes, tunable)
            else:
                build_padded_rows(sch, blocks.pad, outer, knobs.lanes, tunable)
        sch.unroll(ky)
        sch.unroll(kx)
        sch.unroll(yi)
        sch.unroll(xv)
        sch.vectorize(xl)
        if last is not None:
            sch.reverse_compute_at(last, xo, preserve_unit_loops=True)
            # Unrolled on every CPU (the tile is a few vectors; x86 measured faster too).
            schedule_tile_epilogue(sch, last, xo, knobs.lanes, unroll=True)
        sch.decompose_reduction(conv, rc)
        return sch
