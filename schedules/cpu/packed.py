"""The channel-vectorized tile, shared by the pointwise and the standard-conv rules.

Where a conv's pixels do not fill vector registers (7x7, 14x14, 28x28 or 56x56 outputs on
AVX-512), `passes/lowering/pack_weights.py` packs its weight into blocks of ``b`` output channels
(``[O/b, C, b]`` for 1x1, ``[O/b, C, kh, kw, b]`` otherwise) and this tile turns the GEMM around:
``rows`` pixels x one channel block (whole vectors, contiguous weights), one broadcast input
pixel per row of FMAs, accumulated in a local tile with the channels innermost and written back
to NCHW transposed, through the epilogue. With more than K_BLOCK input channels the reduction
runs in K blocks (`k_blocked`), each block's weights reused from L1 by every pixel tile. The
padded input (if any) is materialized once by a parallel, vectorized copy. Knobs: ``rows``,
``k_block``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.target import Target

from dwsep_compiler.passes import names
from dwsep_compiler.schedules.analysis import (ConvBlocks, conv_input_read, divisors, extents,
                                               find_conv, inline_epilogue, knob,
                                               largest_divisor)
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
from dwsep_compiler.schedules.cpu.tiling import (channel_tile, copy_padded_input, lane_pixels,
                                                 schedule_tile_epilogue, unroll_reduction)

# Input channels per K block. In-model, interleaved (2-core AVX-512): ResNet-50 rank 1 0.93x the
# time (its 14x14 layers 256 -> 1024 and 1024 -> 256 0.82-0.85x, 2048x7x7 -> 512 0.8x),
# VGG-19 rank 1's 512x14x14 pointwise 0.8-0.85x, the original ResNet-50 0.96x (its 3x3 convs at
# 14x14 0.75x), the original VGG-19's 256x56x56 3x3 conv 0.8-0.9x. Standalone (warm caches)
# 1024x14x14 -> 256 1.18x faster; 64 and 256 measured slower than 128.
K_BLOCK = 128


def k_blocked(channels: int, channel_blocks: int, cores: int) -> bool:
    """K-block the channel tile? Where there are more input channels than one K block and
    enough output-channel blocks to spread over the cores (the K-blocked loop nest runs the
    channel blocks alone in parallel)."""
    return channels > K_BLOCK and channel_blocks >= 2 * cores


def find_packed_conv(func: tirx.PrimFunc, kernel_1x1: bool) -> ConvBlocks | None:
    """A conv with packed weights as the packing pass makes it: [pad_temp ->] conv2d_packed ->
    [injective epilogue]; ``kernel_1x1`` selects the pointwise form (one reduction axis)."""
    return find_conv(func, conv_names=(names.PACKED_CONV,), iters="SSSSR" if kernel_1x1 else "SSSSRRR")


def packed_lane_block(blocks: ConvBlocks, knobs, vectorized: int) -> int | None:
    """Read back which tile a packed conv was packed for: its weight block ``b`` where it keeps
    the pixel-vectorized tile with lane weights (FMA by lane, and the ``vectorized`` extent,
    pixels or an output row, is whole vectors: `passes/lowering/pack_weights.py` packed it with
    `common.lane_weight_block`), None where it takes the channel-vectorized tile."""
    block = int(blocks.sch.get(blocks.conv).reads[-1].source.shape[-1])
    if not knobs.fma_by_lane or vectorized % knobs.lanes or block % knobs.lanes:
        return None
    return block


def add_lane_weights(sch, conv, step):
    """Copy the packed weights a tile reads in one reduction ``step`` (``b`` channels,
    contiguous in ``[O/b, C, (kh, kw,) b]``) into a buffer, as whole vectors, so that LLVM keeps
    them in registers and each FMA row takes its weight from a lane (FMLA by element) instead
    of loading it on its own. The buffer is global-scope: TVM makes a small one a stack slot,
    which LLVM promotes to registers; a local-scope one is a workspace allocation, stored and
    reloaded on every step."""
    weights = sch.cache_read(conv, len(sch.get(conv).reads) - 1, "global")
    sch.compute_at(weights, step, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(weights)[-1])


def add_lane_pixels(sch, conv):
    """Copy the input pixels a pointwise tile reads in one reduction step (its ``rows`` pixels
    of one input channel, contiguous in NCHW) into a buffer, as vectors, so that each FMA row
    takes its pixel from a lane (FMLA by element) instead of a broadcast load of its own; LLVM
    reads the vectors straight from the input and drops the buffer (global scope, as in
    `add_lane_weights`). For tiles that are whole image rows or lie within one, at least a
    vector of pixels. Emulated Cortex-A76, 1x1 conv + ReLU, instructions: 64 -> 128 at 7x7
    201K -> 180K, 32 -> 128 at 13x13 387K -> 334K, 512 -> 1000 at 3x3 1.80M -> 1.62M,
    256 -> 512 at 5x5 1.24M -> 1.18M; a 3-pixel tile (16 -> 64 at 27x27) was 15% worse,
    hence at least a vector."""
    pixels = sch.cache_read(conv, conv_input_read(sch, conv), "global", consumer_blocks=[conv])
    sch.compute_at(pixels, sch.get_loops(conv)[-4], preserve_unit_loops=True)
    sch.vectorize(sch.fuse(*sch.get_loops(pixels)[-2:]))


def schedule_channel_tile(blocks: ConvBlocks, target: Target, tunable: bool):
    sch = blocks.sch
    conv = blocks.conv
    knobs = cpu_knobs(target, str(sch.get(conv).writes[0].source.dtype))
    loops = extents(sch, conv)
    _, co, h, w = loops[:4]
    weight = sch.get(conv).reads[-1].source
    block = int(weight.shape[-1])
    vectors = block // knobs.lanes
    pixels = h * w
    pointwise = len(loops) == 5
    lane_width = w if knobs.fma_by_lane and pointwise else None
    tile = channel_tile(pixels, co, knobs.lanes, knobs.accumulators, lane_width)
    limit = max(1, knobs.accumulators // vectors)
    rows = tile[1] if tile is not None and tile[0] == block else largest_divisor(pixels, limit)
    rows = knob(sch, tunable, rows, divisors(pixels, limit))
    channels = loops[4]
    blocked = k_blocked(channels, co // block, knobs.cores)
    if blocked:
        k_block = knob(sch, tunable, largest_divisor(channels, K_BLOCK),
                       [d for d in divisors(channels, 4 * K_BLOCK) if d >= K_BLOCK // 4])
    last = inline_epilogue(blocks)
    if pointwise:
        sch.transform_block_layout(conv, lambda n, f, y, x, c: (n, f, y * w + x, c))
    else:
        sch.transform_block_layout(
            conv, lambda n, f, y, x, c, ky, kx: (n, f, y * w + x, c, ky, kx))
    # The accumulator tile is global-scope for the reason `add_lane_weights` gives: under
    # 1 KB TVM makes it a stack slot; local scope made it a workspace allocation, an
    # alloc/free through the runtime's pool on every tile (light_squeezenet on the emulated
    # A76: 1.8M of 7.9M instructions per inference were the pool, outside model.so).
    write_back = sch.cache_write(conv, 0, "global")
    # The tile: one flat pixel axis (so that it compacts to exactly rows x block, with
    # constant indices that LLVM keeps in registers), channels innermost (whole vectors).
    sch.transform_layout(conv, ("write", 0), lambda n, f, y, x: (n, y * w + x, f))
    nn, ff, pix, *reduce = sch.get_loops(conv)
    fo, fi = sch.split(ff, [None, block])
    fv, fl = sch.split(fi, [None, knobs.lanes])
    po, pi = sch.split(pix, [None, rows])
    if blocked:
        # Input channels in blocks of K_BLOCK: a channel block's weights for one K block stay
        # in L1 while every pixel tile reads them; the tiles' accumulators wait in the local
        # buffer (all pixels x one channel block) between K blocks.
        rco, rci = sch.split(reduce[0], [None, k_block])
        sch.reorder(nn, fo, rco, po, rci, *reduce[1:], pi, fv, fl)
        outer = sch.fuse(nn, fo)
        channels_loop = rci
    else:
        sch.reorder(nn, fo, po, *reduce, pi, fv, fl)
        outer = sch.fuse(nn, fo, po)
        channels_loop = reduce[0]
    if pointwise:
        # Input channels unrolled (`knobs.reduction_unroll`), as in the pixel-vectorized tile.
        channels_loop, _ = unroll_reduction(sch, channels_loop, knobs.reduction_unroll)
    # The accumulators are zeroed before the outermost reduction loop: the K blocks, or the
    # input channels.
    first_reduction = rco if blocked else channels_loop
    sch.parallel(outer)
    sch.unroll(pi)
    sch.unroll(fv)
    sch.vectorize(fl)
    if lane_width and lane_pixels(rows, w, knobs.lanes):
        add_lane_pixels(sch, conv)
    if blocks.pad is not None:
        copy_padded_input(sch, blocks.pad, knobs.lanes)
    if last is not None:
        sch.compute_inline(write_back)  # the epilogue reads the local tile directly
        write_back = last
    # The write-back iterates the same flat pixels: a tile of rows that crosses image rows is
    # then exactly its pixels (in 4-D it would be a bounding box of whole rows).
    sch.transform_block_layout(write_back, lambda n, f, y, x: (n, f, y * w + x))
    sch.reverse_compute_at(write_back, outer, preserve_unit_loops=True)
    # Not unrolled where K-blocked: that write-back covers every pixel of a channel block.
    schedule_tile_epilogue(sch, write_back, outer, None, knobs.unroll_epilogue and not blocked)
    sch.decompose_reduction(conv, first_reduction)
    return sch
