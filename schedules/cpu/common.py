"""Block analysis shared by the CPU rules: find the conv block and its elementwise epilogue."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx



@dataclass
class ConvBlocks:
    sch: s_tir.Schedule
    conv: s_tir.schedule.SBlockRV
    pad: s_tir.schedule.SBlockRV | None
    epilogue: list  # injective blocks after the conv, in order
    kind: str  # "conv2d_nchw" | "group_conv2d_nchw"


def iter_kinds(sch: s_tir.Schedule, block) -> str:
    """'S'/'R'/'O' per block iter (spatial, reduction, other)."""
    kinds = {0: "S", 2: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in sch.get(block).iter_vars)


def find_conv(func: tirx.PrimFunc, names=("conv2d_nchw", "group_conv2d_nchw"),
              iters: str = "SSSSRRR") -> ConvBlocks | None:
    """The NCHW conv PrimFunc as TOPI legalizes it: [pad] -> conv -> [injective epilogue]."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    conv = pad = None
    epilogue = []
    for block in sch.get_child_blocks(root):
        name = sch.get(block).name_hint
        kinds = iter_kinds(sch, block)
        if "R" in kinds:
            if conv is not None or name not in names or kinds != iters:
                return None
            conv = block
        elif "O" in kinds:
            return None
        elif conv is None:
            if pad is not None or name != "pad_temp":
                return None
            pad = block
        else:
            epilogue.append(block)
    if conv is None:
        return None
    return ConvBlocks(sch, conv, pad, epilogue, sch.get(conv).name_hint)


def find_depthwise(func: tirx.PrimFunc) -> tuple[ConvBlocks, int] | None:
    """A depthwise conv PrimFunc (one input channel per group) and its depth multiplier r."""
    blocks = find_conv(func, names=("group_conv2d_nchw",))
    if blocks is None:
        return None
    sch = blocks.sch
    _, out_channels, _, _, rc, _, _ = extents(sch, blocks.conv)
    if rc != 1:  # a grouped conv with several channels per group is not depthwise
        return None
    channels = in_channels(sch, blocks)
    if out_channels % channels:
        return None
    return blocks, out_channels // channels


def find_pointwise(func: tirx.PrimFunc, grouped: bool = False) -> ConvBlocks | None:
    """A 1x1 conv PrimFunc with stride 1 and no padding (a GEMM over the pixels); with
    ``grouped``, grouped ones too (a GEMM per group; not depthwise: one input channel per
    group is `find_depthwise`'s)."""
    blocks = find_conv(func, names=("conv2d_nchw", "group_conv2d_nchw") if grouped
                       else ("conv2d_nchw",))
    if blocks is None:
        return None
    *_, rc, kh, kw = extents(blocks.sch, blocks.conv)
    if (kh, kw) != (1, 1) or not unit_stride_no_pad(blocks.sch, blocks):
        return None
    if blocks.kind == "group_conv2d_nchw" and rc == 1:
        return None
    return blocks


def input_buffer(sch: s_tir.Schedule, blocks: ConvBlocks) -> tirx.Buffer:
    """The conv's input as the PrimFunc receives it (before any padding)."""
    source = blocks.pad if blocks.pad is not None else blocks.conv
    return sch.get(source).reads[0].source


def in_channels(sch: s_tir.Schedule, blocks: ConvBlocks) -> int:
    """Input channels of the conv (all groups)."""
    return int(input_buffer(sch, blocks).shape[1])


def group_out_channels(sch: s_tir.Schedule, blocks: ConvBlocks) -> int:
    """Output channels per group: all of them for a standard conv. Channel tiles of the
    grouped convs (ShuffleNet's 1x1, AlexNet's and ResNeXt's kxk) divide it, so that each tile
    reads one group's input channels."""
    _, out_channels, _, _, rc, _, _ = extents(sch, blocks.conv)
    return out_channels // (in_channels(sch, blocks) // rc)


def channel_tile(pixels: int, out_channels: int, lanes: int,
                 accumulators: int) -> tuple[int, int] | None:
    """The register tile of a channel-vectorized conv (`packed.py`): ``(block, rows)``,
    ``block`` output channels (whole vectors; the weight packing of
    `passes/lowering/pack_weights.py`) by ``rows`` output pixels (dividing ``pixels``), with the
    most FMAs per load that the ``accumulators`` allow; None when no vector multiple divides
    ``out_channels``."""
    best = None
    for vectors in ((4, 2, 1) if lanes <= 4 else (2, 1)):
        block = vectors * lanes
        if out_channels % block:
            continue
        rows = largest_divisor(pixels, max(1, accumulators // vectors))
        intensity = vectors * rows / (vectors + rows)
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


def fused_dwpw_blocks(func: tirx.PrimFunc):
    """``(sch, pad, depthwise, pointwise, epilogue)`` of a PrimFunc made by
    `passes/lowering/fuse_dwpw.py` (blocks pad_temp, depthwise, pointwise, then injective
    epilogue blocks), else None. Shared by the CPU and the GPU fused rules."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if names[:3] != ["pad_temp", "depthwise", "pointwise"]:
        return None
    pad, dw, pw = (sch.get_sblock(n) for n in names[:3])
    if iter_kinds(sch, dw) != "SSSSRR" or iter_kinds(sch, pw) != "SSSSR":
        return None
    epilogue = [sch.get_sblock(n) for n in names[3:]]
    if any("R" in iter_kinds(sch, b) for b in epilogue):
        return None
    return sch, pad, dw, pw, epilogue


def extents(sch: s_tir.Schedule, block) -> list[int]:
    return [int(sch.get(loop).extent) for loop in sch.get_loops(block)]


def unit_stride_no_pad(sch, blocks) -> bool:
    """Output pixels map 1:1 onto input pixels (a 1x1 conv with stride 1 and no padding)."""
    n, co, h, w, ci, kh, kw = extents(sch, blocks.conv)
    return [int(d) for d in input_buffer(sch, blocks).shape[2:]] == [h, w]


def inline_epilogue(blocks: ConvBlocks):
    """Inline all but the last epilogue block into it; return the last one (or None)."""
    sch = blocks.sch
    if not blocks.epilogue:
        return None
    for block in blocks.epilogue[:-1]:
        sch.compute_inline(block)
    return blocks.epilogue[-1]


def copy_padded_input(sch: s_tir.Schedule, pad, lanes: int) -> None:
    """Materialize the padded input once: a parallel copy, vectorized along W."""
    loops = sch.get_loops(pad)
    sch.parallel(sch.fuse(*loops[:2]))
    sch.vectorize(sch.split(loops[-1], [None, lanes])[1])


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
    if not tunable and width % lanes == 0 and width >= 2 * lanes:
        loops = sch.get_loops(pad)
        below = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(under)))
        try:
            sch.decompose_padding(pad, loops[below + 1])  # ``pad`` is now the in-bound copy
        except s_tir.ScheduleError:
            # TVM's pattern match fails on some bands (one output row per band: the rows are
            # indexed by the fused parallel loop alone); the schedule is left unchanged.
            pass
    sch.vectorize(sch.split(sch.get_loops(pad)[-1], [None, lanes])[1])


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


def largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """The largest d <= limit dividing n (and a multiple of ``multiple_of`` if possible)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


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


def knob(sch: s_tir.Schedule, tunable: bool, default: int, candidates):
    """A schedule knob: ``default`` (untuned), or with ``tunable`` a sampled decision over
    ``candidates`` (the default among them) that MetaSchedule's search mutates."""
    if not tunable:
        return default
    values = sorted({int(c) for c in candidates} | {int(default)})
    if len(values) == 1:
        return default
    return sch.sample_categorical(values, [1.0 / len(values)] * len(values))


def divisors(n: int, limit: int, multiple_of: int = 1) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0 and d % multiple_of == 0]
