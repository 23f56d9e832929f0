"""CPU register and cache tiles: channel blocks for packed weights, padded input rows, row bands,
vector tiles. Used by the CPU rules only (the GPU rules tile for work-groups instead)."""

from __future__ import annotations

from tvm import s_tir

from dwsep_compiler.schedules.analysis import computes_wider, divisors, largest_divisor


def lane_pixels(rows: int, width: int, lanes: int) -> bool:
    """Does a pointwise channel tile of ``rows`` pixels, on an image ``width`` pixels wide, read
    its pixels as vectors and multiply by lane (NEON: `packed.add_lane_pixels`)? Where the tile
    is whole image rows or lies within one (its pixels contiguous) and fills a vector."""
    return rows >= lanes and (rows % width == 0 or width % rows == 0)


def channel_tile(pixels: int, out_channels: int, lanes: int, accumulators: int,
                 lane_width: int | None = None) -> tuple[int, int] | None:
    """The register tile of a channel-vectorized conv (`packed.py`): ``(block, rows)``,
    ``block`` output channels (whole vectors; the weight packing of
    `passes/lowering/pack_weights.py`) by ``rows`` output pixels (dividing ``pixels``), with the
    most FMAs per load that the ``accumulators`` allow; None when no vector multiple divides
    ``out_channels``. ``lane_width``: the image width of a pointwise conv on NEON, whose tiles
    of `lane_pixels` load a vector of pixels where others load each pixel (SqueezeNet's
    16 -> 64 at 27x27: 16 channels x 3 pixels without, 8 x 9 with)."""
    best = None
    for vectors in ((4, 2, 1) if lanes <= 4 else (2, 1)):
        block = vectors * lanes
        if out_channels % block:
            continue
        for rows in divisors(pixels, max(1, accumulators // vectors)):
            loads = rows
            if lane_width and lane_pixels(rows, lane_width, lanes):
                loads = -(-rows // lanes)
            intensity = vectors * rows / (vectors + loads)
            if best is None or intensity > best[0]:
                best = (intensity, block, rows)
    return None if best is None else best[1:]


def lane_weight_block(out_channels: int, lanes: int) -> int | None:
    """The packing block ``b`` (output channels) of a conv whose pixel-vectorized tile takes
    its weights from vector lanes (FMA by lane, NEON; pointwise and standard convs): two
    vectors of weights per reduction step (8 rows x 3 pixel vectors fill 24 accumulators,
    2 + 3 loads per 24 FMAs), one where two do not divide the channels; None where no whole
    vector does."""
    for block in (2 * lanes, lanes):
        if out_channels % block == 0:
            return block
    return None


# Iterations a register tile's reduction loop keeps after `unroll_reduction`, at least. With
# fewer, LLVM unrolls the rest of the loop too and the straight-line body spills the tile (a
# 48 -> 24 1x1 conv + SiLU at 32x80, emulated A76: 2.70M instructions with 4 steps per
# iteration, 3.49M with 16, i.e. 3 iterations). ddddocr's backbone 38.9M -> 37.8M against
# unrolling 16 steps wherever they divide; ResNet-50 rank 1 59.4M both ways.
MIN_REDUCTION_ITERATIONS = 8


def unroll_reduction(sch: s_tir.Schedule, loop, steps: int):
    """Unroll up to ``steps`` iterations of a register tile's reduction ``loop`` (the largest
    divisor of its extent that leaves `MIN_REDUCTION_ITERATIONS`): the loop's own counter,
    pointer updates and branch then come once per unrolled iteration. Returns ``(outer,
    inner)``: the loops after the split, or ``loop`` twice where fewer than 2 steps divide
    it."""
    extent = int(sch.get(loop).extent)
    unrolled = largest_divisor(extent, min(steps, extent // MIN_REDUCTION_ITERATIONS))
    if unrolled < 2:
        return loop, loop
    outer, inner = sch.split(loop, [None, unrolled])
    sch.unroll(inner)
    return outer, inner


# Vector temporaries an unrolled epilogue needs beside its constants (the fast sigmoid's
# scaled input, its integer part and fraction, the polynomial's running value).
EPILOGUE_TEMPORARIES = 4


def tile_accumulators(knobs, constants: int, unrolled: bool) -> int:
    """Accumulators a register tile may hold when its epilogue uses ``constants`` float
    constants and is ``unrolled`` through the tile (`schedule_tile_epilogue`). The registers
    the reduction loaded into are free in the epilogue; constants and temporaries beyond them
    take accumulators' registers, else LLVM spills the constants and reloads or re-broadcasts
    them for every vector. Emulated Cortex-A76, ddddocr's 48 -> 192 1x1 + SiLU at 16x40 (11
    constants): 8 channels x 2 vectors 2.55M instructions, x 3 vectors 2.63M. A looped
    epilogue (x86, or computed wider than the tile) re-creates its constants per iteration
    anyway, and keeps the full tile."""
    if not unrolled:
        return knobs.accumulators
    spare = knobs.registers - knobs.accumulators
    return max(1, knobs.accumulators - max(0, constants + EPILOGUE_TEMPORARIES - spare))


def schedule_tile_epilogue(sch: s_tir.Schedule, block, under, vector: int | None,
                           unroll: bool) -> None:
    """Schedule a register tile's epilogue or write-back (``block``, computed at the tile's
    loop ``under``): its pixels vectorized by ``vector`` where they are the contiguous axis
    (None: a transposed write-back, each pixel a lane of another accumulator), and with
    ``unroll`` its other loops unrolled. Each accumulator is then read at a constant index, so
    LLVM keeps the tile in the registers it was accumulated in instead of storing it to the
    tile's stack slot and reloading it, and the epilogue's constants are materialized once per
    tile, not once per channel row (the fast sigmoid's
    nine were re-broadcast on every row: LLVM does not hoist them past a loop that needs every
    register). Emulated Cortex-A76: ddddocr's 96 -> 192 1x1 + SiLU at 16x40 (8 channels x 2
    vectors per tile) 27 -> ~20 instructions of epilogue per output vector, the kernel
    12.97M -> 12.46M; SqueezeNet's 16 -> 64 at 15x15 (channel tile, 5 pixels x 16 channels,
    written back transposed) 650K -> 535K.

    An epilogue that computes wider than it stores keeps its loop (a float16 tile's sigmoid
    runs in float32: two vectors per accumulator, and unrolled over the tile they ran out of
    registers: ddddocr fp16 24.85M -> 25.59M, where SqueezeNet, Fashion and ResNet-50 fp16,
    with plain epilogues, gained 4.3%, 2.6% and 0.3%)."""
    lanes = sch.split(sch.get_loops(block)[-1], [None, vector])[1] if vector else None
    if unroll and not computes_wider(sch, block):
        loops = sch.get_loops(block)
        for loop in loops[loop_index(sch, loops, under) + 1:-1 if lanes is not None else None]:
            sch.unroll(loop)
    if lanes is not None:
        sch.vectorize(lanes)


def loop_index(sch: s_tir.Schedule, loops, loop) -> int:
    """Where ``loop`` is among ``loops`` (a block's loops, outermost first)."""
    return next(i for i, each in enumerate(loops) if sch.get(each).same_as(sch.get(loop)))


def copy_padded_input(sch: s_tir.Schedule, pad, lanes: int) -> None:
    """Materialize the padded input once: a parallel copy, vectorized along W."""
    loops = sch.get_loops(pad)
    sch.parallel(sch.fuse(*loops[:2]))
    sch.vectorize(sch.split(loops[-1], [None, lanes])[1])


# Vectors per padded row up to which its copy is unrolled (`build_padded_rows`).
UNROLLED_COPY_VECTORS = 64


def build_padded_rows(sch: s_tir.Schedule, pad, under, lanes: int, tunable: bool) -> None:
    """Build a kernel's padded input rows (``pad`` computed at loop ``under``) with whole-vector
    copies where the rows are whole vectors: zeros over the region, then the in-bound rows
    copied without a condition. A copy that tests the pad condition per element (or that
    ends in a partial vector) is scalarized by LLVM: element by element, as long as the
    conv itself at 112x112 (VGG-19 rank 1: 64x112x112 0.26 -> 0.17 ms; rank 2 0.37 -> 0.28 ms;
    AVX-512). Where the rows are not whole vectors (56, 28, 14 on AVX-512) the conditional
    copy measured faster (1.05-1.09x).

    Not in ``tunable`` spaces: TVM 0.27 cannot print a trace with ``decompose_padding`` (its
    printer takes the loop as a LoopRV and is given its name), and MetaSchedule prints every
    design space. Tuning still measures the untuned schedule first, as each task's baseline
    record, so a search that finds nothing faster keeps it."""
    width = int(sch.get(pad).reads[0].source.shape[-1])
    decomposed = False
    if not tunable and width % lanes == 0 and width >= 2 * lanes:
        loops = sch.get_loops(pad)
        try:
            # ``pad`` is now the in-bound copy
            sch.decompose_padding(pad, loops[loop_index(sch, loops, under) + 1])
            decomposed = True
        except s_tir.ScheduleError:
            # TVM's pattern match fails on some bands (one output row per band: the rows are
            # indexed by the fused parallel loop alone); the schedule is left unchanged.
            pass
    chunks, lane = sch.split(sch.get_loops(pad)[-1], [None, lanes])
    sch.vectorize(lane)
    if decomposed and width // lanes <= UNROLLED_COPY_VECTORS:
        # A row's copy as a loop is what LLVM turns into a ``memcpy`` call where the padded
        # rows are a stack buffer (`passes.lowering.stack_scratch`): it then knows they alias
        # nothing. Unrolled, the copies stay vector moves (24 x 2 depthwise at 32 x 80,
        # emulated A76: 537K -> 525K instructions per call, ten 320-byte calls per band gone).
        sch.unroll(chunks)


def build_phase_planes(sch: s_tir.Schedule, pad, under, stride: int, lanes: int,
                       tunable: bool) -> None:
    """Build a strided kernel's padded input rows as ``stride`` planes of every stride-th
    column (``pad`` computed at loop ``under``, its buffer already laid out as
    ``[.., phase, column]``).

    Phase by phase, the stores into a plane are contiguous. Where the in-bound rows are whole
    chunks of ``stride x lanes`` columns (and outside tuning, as `build_padded_rows`), the
    padding is decomposed: zeros over the planes, then the in-bound columns copied without a
    bounds test, each chunk read once into a small buffer that LLVM keeps in registers and
    splits into its phases with shuffles (UZP1/UZP2 on NEON). Otherwise LLVM copies element by
    element under the bounds test (a scalar load, a scalar store and three address
    instructions each): a 24 -> 48 3x3 stride-2 depthwise at 32x80, emulated Cortex-A76,
    496K -> 241K instructions (lane-by-lane gathers without the chunk buffer: 361K).
    """
    loops = sch.get_loops(pad)
    width = int(sch.get(pad).reads[0].source.shape[-1])
    if not tunable and width % (stride * lanes) == 0:
        try:
            zeros = sch.decompose_padding(pad, loops[loop_index(sch, loops, under) + 1])
        except s_tir.ScheduleError:
            zeros = None  # TVM's pattern match refuses some bands (see build_padded_rows)
        if zeros is not None:
            _store_by_phase(sch, zeros, stride, lanes)
            chunks, phase = sch.split(sch.get_loops(pad)[-1], [None, stride])
            chunk, lane = sch.split(chunks, [None, lanes])
            sch.reorder(chunk, phase, lane)
            sch.unroll(phase)
            sch.vectorize(lane)
            staged = sch.cache_read(pad, 0, "global")
            sch.compute_at(staged, chunk, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(staged)[-1])
            return
    _store_by_phase(sch, pad, stride, lanes)


def _store_by_phase(sch: s_tir.Schedule, block, stride: int, lanes: int) -> None:
    """Iterate a block's columns phase by phase (contiguous stores into each phase's plane),
    vectorized: in their natural order they are scatters, 4x slower than the conv at 14x14."""
    columns, phase = sch.split(sch.get_loops(block)[-1], [None, stride])
    sch.reorder(phase, columns)
    sch.vectorize(sch.split(columns, [None, lanes])[1])


# Output rows per band for the kernels that build padded input rows per band (depthwise, fused
# DW+PW). Measured in-model (2-core AVX-512, VGG-19 and ResNet-50 rank 1) against whole planes:
# depthwise 256x56x56 and 512x14x14 3x3 0.78x the time, 128x56x56 0.83x, ResNet-50's 3-channel
# 7x7 stride-2 stem 0.92x (its 3 planes no longer leave a core idle), 64x112x112 and 256x28x28
# 1.1-1.15x (VGG-19 in all: 0.84 ms less); the fused 64x224x224 DW+PW 0.85-0.9x against one row.
BAND_ROWS = 8


def row_band(height: int) -> int | None:
    """Rows per band: the largest divisor of ``height`` <= BAND_ROWS, or None where that is
    BAND_ROWS / 2 or less (17, 13 rows): bands of one or two rows would build each padded
    row up to three times."""
    band = largest_divisor(height, BAND_ROWS)
    return band if 2 * band > BAND_ROWS else None


def vector_tile(extent: int, lanes: int, max_vectors: int) -> tuple[int, int]:
    """A tile of ``extent`` that divides it: ``(tile, vector)`` with ``tile = k * vector``.

    Whole vectors when ``lanes`` divides the extent. Otherwise partial registers (e.g. 7 of 8
    lanes for 14x14 = 196 pixels, 7 of 16 for 7x7 = 49), up to ``max_vectors`` of them, which
    the micro-kernels pair with more channel rows: an odd vector wider than a register is split
    by LLVM into registers plus shuffles (a 49-wide vector: 360 inserts/permutes per tile,
    ResNet-50's 512x7x7 -> 2048 pointwise 15.6 ms against 1.1 ms with 7-wide vectors,
    AVX-512) or a masked tail (14-wide on AVX2: 4x slower). Only when few lanes divide the
    extent (a prime, say) is one odd vector of up to two registers used. These tiles never
    carry a predicate inside the vector (that serializes the kernel); a rule may still tile
    whole vectors with a tail that loop partitioning cleans (`pointwise.py` at 28x28).
    """
    if extent % lanes == 0:
        vectors = largest_divisor(extent // lanes, max_vectors)
        return vectors * lanes, lanes
    width = largest_divisor(extent, lanes)
    if width < max(2, lanes // 4):
        width = largest_divisor(extent, 2 * lanes)
        return width, width
    # Several partial registers per row where the extent allows: 14x14 = 196 pixels on AVX-512
    # as 2 x 14 lanes (with 8 channel rows) measured 25-35% faster than 1 x 14 (with 16).
    return width * largest_divisor(extent // width, max_vectors), width
