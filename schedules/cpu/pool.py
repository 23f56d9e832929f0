"""Windowed pooling (max / average, NCHW) on CPUs: one output row per step, left for LLVM to
vectorize.

TOPI's pool is one reduction block ``pool_max`` / ``pool_sum`` over (n, c, oh, ow, kh, kw),
maybe after a padding block and before an averaging block. Rows of output (n, c, oh) spread over
the cores; within a row, the window is unrolled around a plain loop over the output columns,
which LLVM's loop vectorizer turns into wide loads and shuffles (a stride-2 window reads
interleaved columns: TVM's own vectorizer would gather them lane by lane). VGG-19's 2x2 stride-2
max pool at 64x224x224: 0.76 -> 0.39 ms (2-core AVX-512; onnxruntime 0.45), the fallback's one
parallel loop over every output element having computed each element's indices by division.
Global pools (a 1x1 output) are left to the reduction rule.

A pool strided along W with padding (ResNet's 3x3 stride-2 max pool after the stem) does not
read its padding in place: the bounds test at every tap keeps LLVM from the interleaved loads,
37-39 instructions per output on the emulated Cortex-A76. Bands of output rows build their
padded input rows first (as the depthwise rule does) and the window reads them
unconditionally: A76 64x112x112 -> 56x56 39 -> 16 instructions per output, 64x32x32 37 -> 18;
AVX2 (2 cores) 0.65x and 0.98x the time. Stride-1 pools keep the inlined padding: banded rows
were 1.4x slower with AVX2 at 192x28x28 (though 40 -> 8 instructions per output on the A76).

On NEON, rows of fewer than 16 outputs are unrolled with their window: LLVM's loop vectorizer
does not take loops that short, and leaves the ones it does not fully unroll itself scalar
(SqueezeNet's 3x3 stride-2 pool 64x31x31 -> 15x15: 38 -> 15 instructions per output on the
emulated A76; 2x2 stride 2 at 128x30x30: 10.9 -> 4.7; 7-wide rows were already unrolled by LLVM
and do not change). Not with AVX2's 8 lanes, where such a row is under two vectors: the 2x2 pool
took 1.09-1.43x the time unrolled (the 3x3 one 0.92-0.95x).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import column_stride, extents, iter_kinds, largest_divisor
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
from dwsep_compiler.schedules.cpu.tiling import BAND_ROWS

_POOL_BLOCKS = ("pool_max", "pool_sum")
_MAX_UNROLLED_TAPS = 16  # windows up to 4x4 unrolled (3x3 and 2x2 in practice)
# LLVM's loop vectorizer leaves a loop of fewer iterations scalar (its -vectorizer-min-trip-count)
SHORT_ROW = 16


class Pool(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        names = [sch.get(b).name_hint for b in blocks]
        kinds = [iter_kinds(sch, b) for b in blocks]
        pools = [i for i, k in enumerate(kinds) if "R" in k]
        if len(pools) != 1:
            return None
        index = pools[0]
        pool = blocks[index]
        if names[index] not in _POOL_BLOCKS or kinds[index] != "SSSSRR":
            return None
        if any(set(k) != {"S"} for i, k in enumerate(kinds) if i != index):
            return None
        n, c, oh, ow, kh, kw = extents(sch, pool)
        if oh * ow == 1:
            return None
        pads = blocks[:index]
        for block in blocks[index + 1:-1]:
            sch.compute_inline(block)
        strided = (column_stride(sch, pool) or 1) > 1
        n, c, oh, ow, kh, kw = sch.get_loops(pool)
        if pads and strided:
            # A strided window over padding: bands of output rows, each band's padded input
            # rows built once (compute_at the band), then read without a condition.
            bands, oh = sch.split(oh, [None, largest_divisor(int(sch.get(oh).extent),
                                                             BAND_ROWS)])
            rows = sch.fuse(n, c, bands)
            sch.parallel(rows)
            for block in pads:
                sch.compute_at(block, rows, preserve_unit_loops=True)
        else:
            rows = sch.fuse(n, c, oh)
            sch.parallel(rows)
            for block in pads:  # padding read in place, at the window's taps
                sch.compute_inline(block)
        if int(sch.get(kh).extent) * int(sch.get(kw).extent) <= _MAX_UNROLLED_TAPS:
            sch.unroll(kh)
            sch.unroll(kw)
            if int(sch.get(ow).extent) < SHORT_ROW and cpu_knobs(target).lanes <= 4:  # NEON
                # A short output row, window and all, as straight-line code: LLVM's SLP
                # vectorizer packs it where the loop vectorizer would not.
                sch.unroll(ow)
        if index + 1 < len(blocks):  # averaging: per row, after the row's sums
            sch.reverse_compute_at(blocks[-1], rows, preserve_unit_loops=True)
        sch.decompose_reduction(pool, kh)
        return sch
