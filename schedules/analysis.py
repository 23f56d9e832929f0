"""What the schedule rules of every target family share: finding a PrimFunc's conv blocks (as
TOPI legalizes a conv, or as our lowering passes build them; block names in
`dwsep_compiler.passes.names`), their loop extents, and picking tile sizes / tunable knobs."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.sym.pattern import detect_linear_equation

from dwsep_compiler.passes import names

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


def find_conv(func: tirx.PrimFunc, conv_names=(names.CONV2D, names.GROUP_CONV2D),
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
            if conv is not None or name not in conv_names or kinds != iters:
                return None
            conv = block
        elif "O" in kinds:
            return None
        elif conv is None:
            if pad is not None or name != names.PAD:
                return None
            pad = block
        else:
            epilogue.append(block)
    if conv is None:
        return None
    return ConvBlocks(sch, conv, pad, epilogue, sch.get(conv).name_hint)


def find_depthwise(func: tirx.PrimFunc) -> tuple[ConvBlocks, int] | None:
    """A depthwise conv PrimFunc (one input channel per group) and its depth multiplier r. A
    conv of a one-channel input is one too, legalized by TVM as a plain conv2d (one group):
    a grayscale model's first conv, factorized (ddddocr's 1 -> 2 3x3 stride 2 at 64 x 160,
    emulated A76: 127K -> 33K instructions on this rule's strided planes)."""
    blocks = find_conv(func, conv_names=(names.GROUP_CONV2D, names.CONV2D))
    if blocks is None:
        return None
    sch = blocks.sch
    _, out_channels, _, _, rc, _, _ = extents(sch, blocks.conv)
    if rc != 1:  # a grouped conv with several channels per group is not depthwise
        return None
    channels = in_channels(sch, blocks)
    if blocks.kind == names.CONV2D and channels != 1:
        return None
    if out_channels % channels:
        return None
    return blocks, out_channels // channels


def find_pointwise(func: tirx.PrimFunc, grouped: bool = False) -> ConvBlocks | None:
    """A 1x1 conv PrimFunc with stride 1 and no padding (a GEMM over the pixels); with
    ``grouped``, grouped ones too (a GEMM per group; not depthwise: one input channel per
    group is `find_depthwise`'s)."""
    blocks = find_conv(func, conv_names=(names.CONV2D, names.GROUP_CONV2D) if grouped
                       else (names.CONV2D,))
    if blocks is None:
        return None
    *_, rc, kh, kw = extents(blocks.sch, blocks.conv)
    if (kh, kw) != (1, 1) or not unit_stride_no_pad(blocks.sch, blocks):
        return None
    if blocks.kind == "group_conv2d_nchw" and rc == 1:
        return None
    return blocks


def conv_input_read(sch: s_tir.Schedule, conv) -> int:
    """Where a conv block's input is among its reads: the one before the weights, which come
    last (a bias folded into the conv by `fold_bias` is read first)."""
    return len(sch.get(conv).reads) - 2


def input_buffer(sch: s_tir.Schedule, blocks: ConvBlocks) -> tirx.Buffer:
    """The conv's input as the PrimFunc receives it (before any padding)."""
    if blocks.pad is not None:
        return sch.get(blocks.pad).reads[0].source
    return sch.get(blocks.conv).reads[conv_input_read(sch, blocks.conv)].source


def in_channels(sch: s_tir.Schedule, blocks: ConvBlocks) -> int:
    """Input channels of the conv (all groups)."""
    return int(input_buffer(sch, blocks).shape[1])


def group_out_channels(sch: s_tir.Schedule, blocks: ConvBlocks) -> int:
    """Output channels per group: all of them for a standard conv. Channel tiles of the
    grouped convs (ShuffleNet's 1x1, AlexNet's and ResNeXt's kxk) divide it, so that each tile
    reads one group's input channels."""
    _, out_channels, _, _, rc, _, _ = extents(sch, blocks.conv)
    return out_channels // (in_channels(sch, blocks) // rc)


def fused_dwpw_blocks(func: tirx.PrimFunc):
    """``(sch, pad, depthwise, pointwise, epilogue)`` of a PrimFunc made by
    `passes/lowering/fuse_dwpw.py` (blocks pad_temp, depthwise, pointwise, then injective
    epilogue blocks), else None. Shared by the CPU and the GPU fused rules."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    found = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if found[:3] != [names.PAD, names.FUSED_DEPTHWISE, names.FUSED_POINTWISE]:
        return None
    pad, dw, pw = (sch.get_sblock(n) for n in found[:3])
    if iter_kinds(sch, dw) != "SSSSRR" or iter_kinds(sch, pw) != "SSSSR":
        return None
    epilogue = [sch.get_sblock(n) for n in found[3:]]
    if any("R" in iter_kinds(sch, b) for b in epilogue):
        return None
    return sch, pad, dw, pw, epilogue


def output_dtype(func: tirx.PrimFunc) -> str:
    """The element type a PrimFunc writes (its last parameter is the output buffer, as Relax
    legalizes and our passes build them): what its vectors hold."""
    if not isinstance(func, tirx.PrimFunc) or not func.params:
        return "float32"
    dtype = getattr(func.params[-1].ty, "dtype", None)  # a buffer parameter's BufferType
    return str(dtype) if dtype is not None else "float32"


def extents(sch: s_tir.Schedule, block) -> list[int]:
    return [int(sch.get(loop).extent) for loop in sch.get_loops(block)]


def column_stride(sch: s_tir.Schedule, block) -> int | None:
    """The stride along W of a windowed block (conv, pool) over (n, c, y, x, ...): how far its
    input's column index moves per output column (the first read whose column moves at all:
    weights and a folded bias do not); None where that is not linear."""
    stmt = sch.get(block)
    x = stmt.iter_vars[3].var
    for read in stmt.reads:
        if len(read.region) < 4:
            continue
        coeffs = detect_linear_equation(read.region[3].min, [x])
        if len(coeffs) != 2:
            return None
        try:
            stride = int(coeffs[0])
        except (TypeError, ValueError):
            return None
        if stride:
            return stride
    return None


def unit_stride_no_pad(sch, blocks) -> bool:
    """Output pixels map 1:1 onto input pixels (a 1x1 conv with stride 1 and no padding)."""
    n, co, h, w, ci, kh, kw = extents(sch, blocks.conv)
    return [int(d) for d in input_buffer(sch, blocks).shape[2:]] == [h, w]


def inline_epilogue(blocks: ConvBlocks):
    """Fold a leading bias add into the conv (`fold_bias`), inline all but the last remaining
    epilogue block into it; return the last one (or None)."""
    sch = blocks.sch
    blocks.epilogue = fold_bias(sch, blocks.conv, blocks.epilogue)
    if not blocks.epilogue:
        return None
    for block in blocks.epilogue[:-1]:
        sch.compute_inline(block)
    return blocks.epilogue[-1]


def fold_bias(sch: s_tir.Schedule, conv, epilogue: list) -> list:
    """Start the ``conv`` block's reduction at its bias instead of at zero, where the first
    ``epilogue`` block adds one (``out = conv + b``, ``b`` any other buffer: a per-channel
    bias or a residual): each output then costs no add of its own after the reduction. Exact
    (the same terms, summed in another order); TVM's ``fuse_reduction_epilogue`` also fuses
    ``max(conv + b, 0)`` and clips, which would apply them at every step of the sum, so only a
    plain add is folded. Returns the epilogue blocks left."""
    if len(epilogue) < 2:
        # The bias alone: the tile accumulates in the intermediate buffer that TVM compacts
        # into registers; folded, it would accumulate in the output, through memory (ddddocr's
        # 96 -> 48 1x1 at 16x40 + bias, emulated A76: 2.7x the instructions).
        return epilogue
    store = sch.get(epilogue[0]).body
    written = sch.get(conv).writes[0].source
    if not (isinstance(store, tirx.BufferStore) and isinstance(store.value, tirx.Add)):
        return epilogue
    terms = (store.value.a, store.value.b)
    if not all(isinstance(t, tvm.ir.expr.TensorLoad) for t in terms):
        return epilogue
    if sum(t.source.same_as(written) for t in terms) != 1:
        return epilogue
    try:
        sch.fuse_reduction_epilogue(conv, epilogue[0])
    except s_tir.ScheduleError:
        return epilogue  # a form TVM's pattern match refuses: the add stays in the epilogue
    return epilogue[1:]


def _subexpressions(expr):
    """``expr`` and every expression under it (arithmetic, casts, selects, calls)."""
    yield expr
    children = [getattr(expr, name, None) for name in ("a", "b", "value", "condition",
                                                       "true_value", "false_value")]
    children += list(getattr(expr, "args", []))
    for child in children:
        if isinstance(child, tvm.ir.expr.Expr) and hasattr(child, "ty"):
            yield from _subexpressions(child)


def computes_wider(sch: s_tir.Schedule, block) -> bool:
    """Does ``block`` compute in a wider float type than it stores (a float16 output whose
    expression passes through float32, as the fast sigmoid's does)?"""
    store = sch.get(block).body
    stored = tvm.DataType(str(store.value.ty)).bits

    def bits(expr) -> int:
        dtype = tvm.DataType(str(expr.ty))
        return dtype.bits if dtype.type_code == tvm.DataTypeCode.FLOAT else 0

    return max(bits(expr) for expr in _subexpressions(store.value)) > stored


def float_constants(sch: s_tir.Schedule, blocks) -> int:
    """How many distinct float constants the values of ``blocks`` use (a fast sigmoid's: its
    polynomial's coefficients, the clamp's bounds, log2 e, 1)."""
    return len({(str(expr.ty), float(expr.value)) for block in blocks
                for expr in _subexpressions(sch.get(block).body.value)
                if isinstance(expr, tvm.tirx.FloatImm)})


def largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """The largest d <= limit dividing n (and a multiple of ``multiple_of`` if possible)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


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
