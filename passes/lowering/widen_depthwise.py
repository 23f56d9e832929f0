"""A depthwise conv whose output rows are not whole vectors computes whole-vector rows and keeps
the first ``W`` columns.

The depthwise rule (`schedules/cpu/depthwise.py`) vectorizes output rows along W. A row of 14
floats is not a whole number of 4-lane NEON vectors, so the rule falls back to 2-lane vectors
(half of every FMA wasted), and a row of 7 to one odd 7-lane vector that LLVM splits into
registers and shuffles. This pass gives such a conv more zero padding on the right, so that its
output rows are ``W' = ceil(W / lanes) * lanes`` wide, and slices the first ``W`` columns back
out; FuseOps fuses the slice into the conv's kernel as its epilogue, which the depthwise rule runs
in the register tile, so the extra columns never reach memory.

Measured, the conv alone, widened against as it was: on the emulated Cortex-A76 (instructions
per call) 32 channels x 5 at 14x14 302K -> 203K, 64 x 4 at 7x7 122K -> 82K, 64 x 2 at 10x10
145K -> 93K, 64 at 6x6 33K -> 18K, 512 at 2x2 32K -> 26K, 256 at 5x5 59K -> 55K; with AVX2
(time, 2 cores, two runs) 0.63-1.0x on the rows it widens there (14, 10, 7, 5 columns, 28 and
a stride-2 conv's 28), never slower. A row is widened while it at most doubles
(``MAX_WIDENING``: 2 -> 4 columns, not 1 -> 4).

Run after depthwise -> pointwise fusion (the fused kernel tiles its own rows) and before
legalization (the CPU compile pipeline does).
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes.lowering.call_rewriter import CallRewritePass, CallRewriter
from dwsep_compiler.passes.lowering.fuse_dwpw import depthwise_ok, is_conv

# Widen while the computed row is at most this much longer than the kept one.
MAX_WIDENING = 2.0


def widened_width(width: int, lanes: int) -> int | None:
    """The output width a depthwise row of ``width`` columns is computed at on ``lanes``-wide
    vectors, or None where it stays as it is (already whole vectors, or too much waste)."""
    if width % lanes == 0:
        return None
    wide = math.ceil(width / lanes) * lanes
    return wide if wide <= MAX_WIDENING * width else None


def _depthwise_width(call, vector_bytes: int) -> tuple[int, int] | None:
    """``(width, wide)`` if ``call`` is a depthwise conv2d this pass widens, else None."""
    if not depthwise_ok(call) or int(call.attrs.groups) == 1:  # one channel: a plain conv
        return None
    try:
        width = int(call.ty.shape[3])
    except (TypeError, ValueError):  # a symbolic output width: leave the call alone
        return None
    lanes = vector_bytes * 8 // tvm.DataType(str(call.ty.dtype)).bits
    wide = widened_width(width, lanes)
    return None if wide is None else (width, wide)


@mutator
class _Rewriter(CallRewriter):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_conv(call):
            return call
        found = _depthwise_width(call, self.vector_bytes)
        if found is None:
            return call
        width, wide = found
        attrs = call.attrs
        padding = [int(p) for p in attrs.padding]
        if len(padding) == 2:
            padding = padding * 2
        top, left, bottom, right = padding
        # Each extra output column needs `stride` more input columns.
        right += (wide - width) * int(attrs.strides[1])
        conv = self.builder_.emit(relax.op.nn.conv2d(
            call.args[0], call.args[1], strides=attrs.strides,
            padding=[top, left, bottom, right], dilation=attrs.dilation, groups=attrs.groups,
            data_layout="NCHW", kernel_layout="OIHW", out_dtype=str(call.ty.dtype)))
        self.rewritten += 1
        return relax.op.strided_slice(conv, axes=[3], begin=[0], end=[width])


@tvm.transform.module_pass(opt_level=0, name="WidenDepthwiseRows")
class WidenDepthwiseRows(CallRewritePass):
    """Rewrite every depthwise conv2d whose output width is not a whole number of vectors of
    ``vector_bytes`` (within `MAX_WIDENING`) into a wider conv and a slice (``rewritten``
    counts them)."""

    rewriter = _Rewriter

    def __init__(self, vector_bytes: int):
        super().__init__()
        self.vector_bytes = vector_bytes

    def make_rewriter(self, mod: tvm.IRModule):
        rewriter = super().make_rewriter(mod)
        rewriter.vector_bytes = self.vector_bytes
        return rewriter
