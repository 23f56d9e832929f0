"""A strided 1x1 convolution reads one input pixel in ``sh * sw``: subsample, then a stride-1
pointwise conv.

``conv2d(x, W, strides=(sh, sw))`` with a 1x1 kernel and no padding (ResNet's downsampling
projections) becomes ``conv2d(strided_slice(x, [2, 3], strides=(sh, sw)), W)``. The slice is a
small copy (1 / (sh * sw) of the input) with a kernel of its own, and the conv is then a
plain pointwise GEMM over contiguous pixels (`schedules/cpu/pointwise.py`), instead of a direct
convolution whose every vector load is a stride-2 gather (measured, ResNet-50's 1024x14x14 ->
2048x7x7 projection: 3.2 ms as a direct conv).

Run before legalization (the CPU compile pipeline does).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes.lowering.fuse_dwpw import is_conv, layout_ok
from dwsep_compiler.passes.lowering.call_rewriter import CallRewritePass, CallRewriter


def _strided_pointwise(call) -> tuple[int, int] | None:
    """``(sh, sw)`` if ``call`` is a strided 1x1 conv2d this pass rewrites, else None."""
    attrs = call.attrs
    x, w = call.args
    try:
        w_shape = [int(d) for d in w.ty.shape]
        x_shape = [int(d) for d in x.ty.shape]
        strides = [int(s) for s in attrs.strides]
    except (AttributeError, TypeError, ValueError):  # symbolic shapes: leave them alone
        return None
    if (len(x_shape) != 4 or w_shape[2:] != [1, 1] or int(attrs.groups) != 1
            or not layout_ok(attrs) or any(int(p) != 0 for p in attrs.padding)
            or strides == [1, 1]):
        return None
    return strides[0], strides[1]


@mutator
class _Rewriter(CallRewriter):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_conv(call):
            return call
        strides = _strided_pointwise(call)
        if strides is None:
            return call
        sh, sw = strides
        x, w = call.args
        _, _, out_h, out_w = (int(d) for d in call.ty.shape)
        sliced = self.builder_.emit(relax.op.strided_slice(
            x, axes=[2, 3], begin=[0, 0], end=[(out_h - 1) * sh + 1, (out_w - 1) * sw + 1],
            strides=[sh, sw]))
        self.rewritten += 1
        return relax.op.nn.conv2d(sliced, w, strides=1, padding=0, dilation=1, groups=1,
                                  data_layout="NCHW", kernel_layout="OIHW",
                                  out_dtype=str(call.ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="StridedPointwiseToSlice")
class StridedPointwiseToSlice(CallRewritePass):
    """Rewrite every strided 1x1 conv2d (no padding, NCHW) into a strided slice of its input
    followed by a stride-1 1x1 conv2d (``rewritten`` counts them)."""

    rewriter = _Rewriter
