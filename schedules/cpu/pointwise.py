"""Pointwise (1x1) convolution on CPUs: a register-blocked GEMM.

NCHW, stride 1, no padding: ``out[n, co, p] = sum_ci W[co, ci] * x[n, ci, p]`` over pixels p.
The micro-kernel keeps a ``co_block x (vectors * lanes)`` tile of outputs in vector registers,
broadcasting one weight and loading one vector of pixels per FMA row; the epilogue (bias, ReLU,
clip, residual add) runs on the tile while it is hot. Pixel tiles x channel tiles are spread over
the cores.

Knobs (sampled with ``tunable=True``): ``co_block`` (output channels per tile) and ``vectors``
(registers per row of the tile); untuned values fill the target's vector registers. Grouped 1x1
convs (ShuffleNet's) are a GEMM per group: ``co_block`` divides a group's output channels.

Where the pixels are not whole vectors (49 or 196 per image on AVX-512) and there are more than
64 input channels, `passes/lowering/pack_weights.py` packs the weights into blocks of output
channels and the tile turns around: ``rows`` pixels x one channel block (whole vectors, contiguous weights), one
broadcast pixel per row of FMAs, accumulated in a local tile with the channels innermost and
written back to NCHW transposed, through the epilogue. Knob: ``rows``.

On NEON, whose FMAs can take their scalar from a vector lane (FMLA by element), the same
pixel-vectorized tile reads packed weights: the packing pass stores them ``[O/b, C, b]``
(`common.lane_weight_block`: 8 channels, or 4) and each input channel's ``b`` weights are one
vector copy that the tile's rows read lane by lane, with the input channels unrolled
(`CPUKnobs.reduction_unroll`): 2 loads of weights and 3 of pixels per 24 FMAs, against 8 and 3
with a weight loaded per row. Emulated instructions per MAC / 4 on 128x28x28 -> 128: Cortex-A53
1.23 against 1.54, Cortex-A76 1.24 against 1.64.

Where the input rows alias in L1 (`stage_input_tile`: 56x56, 112x112 and 224x224 planes), each
pixel tile's input column is first copied into a contiguous buffer that every channel block
reads.
"""

from __future__ import annotations

from math import gcd

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (computes_wider, conv_input_read, divisors,
                                               extents, find_pointwise, float_constants,
                                               group_out_channels, in_channels, inline_epilogue,
                                               knob, largest_divisor, output_dtype)
from dwsep_compiler.schedules.cpu.knobs import L1_DATA_BYTES, L1_SET_SPAN, cpu_knobs
from dwsep_compiler.schedules.cpu.packed import (add_lane_weights, find_packed_conv,
                                                 packed_lane_block, schedule_channel_tile)
from dwsep_compiler.schedules.cpu.tiling import (schedule_tile_epilogue, tile_accumulators,
                                                 unroll_reduction, vector_tile)


class Pointwise(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        knobs = cpu_knobs(target, output_dtype(func))
        blocks = find_pointwise(func, grouped=True)
        block = None  # output channels per packed weight block (lane weights)
        if blocks is None:
            packed = find_packed_conv(func, kernel_1x1=True)
            if packed is None:
                return None
            _, _, h, w, _ = extents(packed.sch, packed.conv)
            block = packed_lane_block(packed, knobs, h * w)
            if block is None:
                return schedule_channel_tile(packed, target, tunable)
            blocks = packed
        sch = blocks.sch
        _, co, h, w, *_ = extents(sch, blocks.conv)
        group_co = co if block else group_out_channels(sch, blocks)  # co, but for grouped convs
        pixels = h * w
        tile, vector = vector_tile(pixels, knobs.lanes, max_vectors=2)
        if tile == vector == knobs.lanes and pixels // vector >= 8:
            # One register per row when no small count of vectors divides the pixels (28x28 =
            # 49 vectors on AVX-512): a weight broadcast per FMA. Two registers per row, the
            # last tile a tail that loop partitioning gives a clean body of its own: 512x28x28
            # -> 512 1.2-1.4x faster.
            tile = 2 * vector
        registers = max(1, -(-tile // knobs.lanes))
        co_block = block or largest_divisor(group_co, max(1, knobs.accumulators // registers))
        stage = stage_input_tile(in_channels(sch, blocks), co // co_block, pixels, tile)  # decided on the defaults
        whole = pixels // vector
        unrolled = knobs.unroll_epilogue and not any(computes_wider(sch, b)
                                                     for b in blocks.epilogue)
        accumulators = tile_accumulators(knobs, float_constants(sch, blocks.epilogue), unrolled)
        rows = accumulators // co_block  # pixel vectors per tile row that fit
        if (not stage and vector == knobs.lanes and tile == 2 * vector
                and (block is None or rows >= 3)
                and (whole % 3 == 0 or whole >= 12)):
            # Three registers per row where the input column is read in place: 3 x 8 tiles
            # load 11 values per 24 FMAs (2 x 8: 10 per 16), the last tile a tail where three
            # do not divide the vectors (at least 4 tiles then). Measured standalone (2-core
            # AVX-512): VGG-19's 512x28x28 -> 512 0.85x the time, 128x56x56 -> 256 0.87x;
            # ResNet-50's 28x28 and 56x56 layers 0.87-0.96x (one 1.02x). Staged columns keep
            # two (their copy grows with the tile).
            tile = 3 * vector
            co_block = block or largest_divisor(group_co, max(1, knobs.accumulators // 3))
        candidates = divisors(whole, 8) + ([2, 3, 4] if whole >= 8 else [])
        vectors = knob(sch, tunable, tile // vector,
                       [v for v in candidates if block is None or v <= rows])
        if block is None:
            co_block = knob(sch, tunable, co_block, divisors(group_co, knobs.accumulators))
        return self._schedule(blocks, knobs, co_block, vectors, vector, stage,
                              lane_weights=block is not None)

    def _schedule(self, blocks, knobs, co_block, vectors, vector: int, stage: bool = False,
                  lane_weights: bool = False):
        sch = blocks.sch
        conv = blocks.conv
        if blocks.pad is not None:
            sch.compute_inline(blocks.pad)
        last = inline_epilogue(blocks)
        loops = extents(sch, conv)
        w = loops[3]
        # One pixel axis: NCHW's H and W are contiguous, so the GEMM's N dimension is H*W.
        if len(loops) == 5:  # packed weights: the reduction is the input channels alone
            sch.transform_block_layout(conv, lambda n, f, y, x, c: (n, f, y * w + x, c))
        else:
            sch.transform_block_layout(
                conv, lambda n, f, y, x, c, ky, kx: (n, f, y * w + x, c, ky, kx))
        if last is not None:
            # The accumulator buffer gets the same flat pixel axis, so that the epilogue's tile
            # is exactly the GEMM tile (the 4-D region would over-approximate it).
            sch.transform_layout(conv, ("write", 0), lambda n, f, y, x: (n, f, y * w + x))
            sch.transform_block_layout(last, lambda n, f, y, x: (n, f, y * w + x))
        nn, ff, pix, *reduce = sch.get_loops(conv)
        fo, fi = sch.split(ff, [None, co_block])
        po, pv, pl = sch.split(pix, [None, vectors, vector])
        # Pixel tiles outside channel tiles: a tile's input column (all ci) stays in L1 while
        # every output-channel block consumes it.
        sch.reorder(nn, po, fo, *reduce, fi, pv, pl)
        if lane_weights:
            # Input channels unrolled (`knobs.reduction_unroll`): per step 16-24 FMAs and 2-3
            # loads, and the loop's counter and pointer updates once per unrolled iteration.
            reduce[-1], channel = unroll_reduction(sch, reduce[-1], knobs.reduction_unroll)
            add_lane_weights(sch, conv, channel)
        if stage:
            # The tile's input column copied once into a contiguous buffer, read there by
            # every channel block: pixel tiles alone over the cores.
            outer = sch.fuse(nn, po)
            sch.parallel(outer)
            staged = sch.cache_read(conv, conv_input_read(sch, conv), "global")
            # Copied with the same flat pixel axis: exactly the tile's pixels (in 4-D the copy
            # would be the bounding box of the image rows the tile touches: 7x larger at
            # 112x112, 3.5x at 56x56).
            sch.transform_layout(staged, ("write", 0), lambda n, c, y, x: (n, c, y * w + x))
            sch.transform_block_layout(staged, lambda n, c, y, x: (n, c, y * w + x))
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
            schedule_tile_epilogue(sch, last, tile_loop, vector, knobs.unroll_epilogue)
        sch.decompose_reduction(conv, reduce[0])
        return sch


def stage_input_tile(channels: int, channel_blocks: int, pixels: int, tile: int) -> bool:
    """Copy each pixel tile's input column (all input channels) into a contiguous buffer?

    In NCHW the column's rows lie ``pixels * 4`` bytes apart; where that distance has a large
    power-of-two factor the rows fall into a few sets of L1 (indexed within ``L1_SET_SPAN``;
    56x56: 16 set offsets, 112x112: 4, 224x224: 1) and evict each other before the next
    channel block reads them again. Staged when more than 8 rows share a set (the
    associativity of L1 is 8-12), the copy fits L1 (32 KB) and at least 8 channel blocks reuse
    it. Measured in-model against no staging (2-core AVX-512, interleaved builds): VGG-19 rank
    1's 64x112x112 -> 128 0.63x the time, 128x112x112 -> 128 0.64x, 256x56x56 -> 256 0.79x;
    ResNet-50's 256x56x56 -> 64 and -> 128 0.81x and 0.82x (8 and 16 channel blocks).
    """
    set_offsets = L1_SET_SPAN // gcd((pixels * 4) % L1_SET_SPAN or L1_SET_SPAN, L1_SET_SPAN)
    return (channels // set_offsets > 8 and channels * tile * 4 <= L1_DATA_BYTES
            and channel_blocks >= 8)
