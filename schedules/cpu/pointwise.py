"""Pointwise (1x1) convolution on CPUs: a register-blocked GEMM.

NCHW, stride 1, no padding: ``out[n, co, p] = sum_ci W[co, ci] * x[n, ci, p]`` over pixels p.
The micro-kernel keeps a ``co_block x (vectors * lanes)`` tile of outputs in vector registers,
broadcasting one weight and loading one vector of pixels per FMA row; the epilogue (bias, ReLU,
clip, residual add) runs on the tile while it is hot. Pixel tiles x channel tiles are spread over
the cores.

Knobs (sampled with ``tunable=True``): ``co_block`` (output channels per tile) and ``vectors``
(registers per row of the tile); untuned values fill the target's vector registers.

Where the pixels are not whole vectors (49 or 196 per image on AVX-512),
`passes/relax_pack_weights.py` packs the weights into blocks of output channels and the
tile turns around: ``rows`` pixels x one channel block (whole vectors, contiguous weights), one
broadcast pixel per row of FMAs, accumulated in a local tile with the channels innermost and
written back to NCHW transposed, through the epilogue. Knob: ``rows``.

Where the input rows alias in L1 (more than 8 rows of a tile's input column share an L1 set),
each pixel tile's input column is either first copied into a contiguous buffer that every
channel block reads (`stage_input_tile`: 112x112 and 224x224 planes, copies of <= 16 KB), or
read in K blocks of rows that fit L1 (`pixel_tile_k_block`: 256x56x56), the accumulators of
all channel blocks waiting in memory between K blocks. Knob: ``k_block``.
"""

from __future__ import annotations

from math import gcd

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import (divisors, extents, find_pointwise, inline_epilogue, knob, largest_divisor,
                     vector_tile)
from .knobs import L1_DATA_BYTES, L1_SET_SPAN, cpu_knobs
from .packed import find_packed_conv, schedule_channel_tile


class Pointwise(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        blocks = find_pointwise(func)
        if blocks is None:
            packed = find_packed_conv(func, kernel_1x1=True)
            return None if packed is None else schedule_channel_tile(packed, target, tunable)
        sch = blocks.sch
        n, co, h, w, ci, kh, kw = extents(sch, blocks.conv)
        knobs = cpu_knobs(target)
        pixels = h * w
        tile, vector = vector_tile(pixels, knobs.lanes, max_vectors=2)
        if tile == vector == knobs.lanes and pixels // vector >= 8:
            # One register per row when no small count of vectors divides the pixels (28x28 =
            # 49 vectors on AVX-512): a weight broadcast per FMA. Two registers per row, the
            # last tile a tail that loop partitioning gives a clean body of its own: 512x28x28
            # -> 512 1.2-1.4x faster.
            tile = 2 * vector
        registers = max(1, -(-tile // knobs.lanes))
        co_block = largest_divisor(co, max(1, knobs.accumulators // registers))
        # Decided on the defaults: stage the input column, else K-block it, else neither.
        stage = stage_input_tile(ci, co // co_block, pixels, tile)
        k_block = None if stage else pixel_tile_k_block(ci, pixels, tile)
        if k_block is not None:
            k_block = knob(sch, tunable, k_block, divisors(ci, ci, multiple_of=MIN_K_BLOCK))
        vectors = knob(sch, tunable, tile // vector,
                       divisors(pixels // vector, 8) + ([2, 4] if pixels // vector >= 8 else []))
        co_block = knob(sch, tunable, co_block, divisors(co, knobs.accumulators))
        return self._schedule(blocks, knobs, co_block, vectors, vector, stage, k_block)

    def _schedule(self, blocks, knobs, co_block, vectors, vector: int, stage: bool = False,
                  k_block=None):
        sch = blocks.sch
        conv = blocks.conv
        if blocks.pad is not None:
            sch.compute_inline(blocks.pad)
        last = inline_epilogue(blocks)
        _, _, h, w, _, _, _ = extents(sch, conv)
        # One pixel axis: NCHW's H and W are contiguous, so the GEMM's N dimension is H*W.
        sch.transform_block_layout(conv, lambda n, f, y, x, c, ky, kx: (n, f, y * w + x, c, ky, kx))
        if last is not None:
            # The accumulator buffer gets the same flat pixel axis, so that the epilogue's tile
            # is exactly the GEMM tile (the 4-D region would over-approximate it).
            sch.transform_layout(conv, ("write", 0), lambda n, f, y, x: (n, f, y * w + x))
            sch.transform_block_layout(last, lambda n, f, y, x: (n, f, y * w + x))
        nn, ff, pix, rc, ry, rx = sch.get_loops(conv)
        fo, fi = sch.split(ff, [None, co_block])
        po, pv, pl = sch.split(pix, [None, vectors, vector])
        # Pixel tiles outside channel tiles: a tile's input column (all ci) stays in L1 while
        # every output-channel block consumes it.
        sch.reorder(nn, po, fo, rc, ry, rx, fi, pv, pl)
        if k_block is not None:
            # The tile's input column in K blocks that stay in L1 while every channel block
            # reads them; the accumulators (all channels x the tile) wait in memory between K
            # blocks. Pixel tiles alone over the cores; the epilogue after the last K block.
            rco, rc = sch.split(rc, [None, k_block])
            sch.reorder(po, rco, fo, rc)
            outer = sch.fuse(nn, po)
            sch.parallel(outer)
            tile_loop = outer
        elif stage:
            # The tile's input column copied once into a contiguous buffer, read there by
            # every channel block: pixel tiles alone over the cores.
            outer = sch.fuse(nn, po)
            sch.parallel(outer)
            staged = sch.cache_read(conv, 0, "global")
            sch.compute_at(staged, outer, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(staged)[-1])
            tile_loop = fo
        else:
            outer = sch.fuse(nn, po, fo)
            sch.parallel(outer)
            tile_loop = outer
        sch.unroll(fi)
        sch.unroll(pv)
        sch.vectorize(pl)
        if last is not None:
            sch.reverse_compute_at(last, tile_loop, preserve_unit_loops=True)
            sch.vectorize(sch.split(sch.get_loops(last)[-1], [None, vector])[1])
        sch.decompose_reduction(conv, rco if k_block is not None else rc)
        return sch


# At most this many input rows of a pixel tile may share an L1 set (L1 is 8-12 ways; the
# tile's weights and accumulators need some too).
ALIASED_ROWS = 8
# A K block of a pixel tile's input column: at most a quarter of L1 (64 channels x 32 pixels
# on AVX-512), at least MIN_K_BLOCK channels.
K_BLOCK_BYTES = L1_DATA_BYTES // 4
MIN_K_BLOCK = 16


def l1_set_offsets(pixels: int) -> int:
    """Distinct L1 set offsets of NCHW input rows ``pixels * 4`` bytes apart (rows a multiple
    of L1_SET_SPAN apart all share one)."""
    return L1_SET_SPAN // gcd((pixels * 4) % L1_SET_SPAN or L1_SET_SPAN, L1_SET_SPAN)


def stage_input_tile(channels: int, channel_blocks: int, pixels: int, tile: int) -> bool:
    """Copy each pixel tile's input column (all input channels) into a contiguous buffer?

    In NCHW the column's rows lie ``pixels * 4`` bytes apart; where that is a multiple of 1 KB
    (112x112: 49 KB, 224x224: 196 KB) the rows fall into the same few sets of L1 and evict each
    other before the next channel block reads them again. Staged when more than ALIASED_ROWS
    rows share a set, the copy is at most half of L1 (16 KB), and at least 16 channel blocks
    reuse it. Measured in-model (interleaved, 2-core AVX-512): VGG-19's 64x112x112 -> 128 0.8x
    the time, 128x112x112 -> 128 0.87-0.95x (rank 2: 128 -> 128 0.93x); 32 KB copies
    (256x56x56 -> 256 and -> 128) 0.9-1.2x, and ResNet-50 with its 56x56 layers staged 1-2%
    slower in all, so those are K-blocked instead (`pixel_tile_k_block`).
    """
    return (channels // l1_set_offsets(pixels) > ALIASED_ROWS
            and channels * tile * 4 <= L1_DATA_BYTES // 2 and channel_blocks >= 16)


def pixel_tile_k_block(channels: int, pixels: int, tile: int) -> int | None:
    """Input channels per K block of a ``tile``-pixel input column whose rows alias in L1 (more
    than ALIASED_ROWS per set; where it is not staged): the largest divisor of the channels
    with at most ALIASED_ROWS rows per set and at most K_BLOCK_BYTES; None where the rows do not
    alias or no such divisor of at least MIN_K_BLOCK exists.

    Measured standalone (2-core AVX-512, interleaved in rotated order, inputs at 4 addresses):
    VGG-19's 256x56x56 -> 256 0.87x the time (12.5 KB rows, 16 per set; blocks of 64), its
    28x28 layers (3 KB rows, 4-8 per set) 0.97-1.1x, so those stay whole.
    """
    offsets = l1_set_offsets(pixels)
    if channels // offsets <= ALIASED_ROWS:
        return None
    block = largest_divisor(channels, min(ALIASED_ROWS * offsets, K_BLOCK_BYTES // (4 * tile)))
    return block if block >= MIN_K_BLOCK else None
