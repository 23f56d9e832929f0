"""A transposed convolution is a convolution over the stride-dilated input: rewrite it into one,
so that the conv rules schedule it.

``conv2d_transpose(x, W, strides=s, padding=p, output_padding=q, dilation=d)`` (NCHW, weight
IOHW ``[C, O, kh, kw]``, groups = 1, a constant weight) becomes
``conv2d(dilate(x, s), W', padding=d * (k - 1) - p (+ q at the bottom / right), dilation=d)``
with ``W'[o, c, i, j] = W[c, o, kh - 1 - i, kw - 1 - j]`` folded at compile time. The dilation
(``s - 1`` zeros between input pixels) is a copy with a kernel of its own; the conv is then a
plain stride-1 conv (`schedules/cpu/conv2d.py`, or the packed tile), with the zero taps computed
like the others. TVM 0.27 legalizes ``conv2d_transpose`` into a loop nest that only the generic
fallback schedules: a small decoder (two 4x4 stride-2 transposed convs at 56x56 and 112x112)
took 819 ms against onnxruntime's 10.

Transposed convs that are grouped, have symbolic shapes, another layout or a padding larger
than the dilated kernel are left alone. Run before legalization (the CPU compile pipeline does).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, topi
from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes.lowering.call_rewriter import CallRewritePass, CallRewriter, constant_value, is_op


def as_conv_weight(weight: np.ndarray) -> np.ndarray:
    """IOHW transposed-conv weight -> the OIHW weight of the equivalent conv (flipped taps)."""
    return np.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def conv_padding(kernel, dilation, padding, output_padding) -> list[int] | None:
    """The equivalent conv's padding (top, left, bottom, right), or None where a side would be
    negative (the transposed conv crops more than its dilated kernel covers)."""
    (kh, kw), (dh, dw) = kernel, dilation
    top, left, bottom, right = padding
    oph, opw = output_padding
    pads = [dh * (kh - 1) - top, dw * (kw - 1) - left,
            dh * (kh - 1) - bottom + oph, dw * (kw - 1) - right + opw]
    return pads if min(pads) >= 0 else None


@mutator
class _Rewriter(CallRewriter):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_op(call, "relax.nn.conv2d_transpose"):
            return call
        attrs = call.attrs
        x, w = call.args
        weight = constant_value(self, w)
        try:
            x_shape = [int(d) for d in x.ty.shape]
            strides = [int(s) for s in attrs.strides]
            dilation = [int(d) for d in attrs.dilation]
            padding = [int(p) for p in attrs.padding]
            output_padding = [int(p) for p in attrs.output_padding]
        except (AttributeError, TypeError, ValueError):  # symbolic shapes: leave them alone
            return call
        if (weight is None or weight.ndim != 4 or len(x_shape) != 4 or int(attrs.groups) != 1
                or attrs.data_layout != "NCHW" or attrs.kernel_layout != "IOHW"
                or attrs.out_layout not in ("", "NCHW") or weight.dtype != np.float32
                or str(x.ty.dtype) != "float32" or str(call.ty.dtype) != "float32"):
            return call
        pads = conv_padding(weight.shape[2:], dilation, padding, output_padding)
        if pads is None:
            return call
        # A guard against attributes read otherwise than the importer wrote them: the conv
        # over the dilated input must have the transposed conv's shape.
        out_hw = [(size - 1) * s + 1 + pads[i] + pads[i + 2] - d * (k - 1) for i, (size, s, d, k)
                  in enumerate(zip(x_shape[2:], strides, dilation, weight.shape[2:]))]
        if [x_shape[0], weight.shape[1], *out_hw] != [int(d) for d in call.ty.shape]:
            return call
        conv_weight = as_conv_weight(weight)
        self.replaced(conv_weight, weight)
        if strides != [1, 1]:
            x = self.builder_.emit_te(topi.nn.dilate, x, [1, 1, *strides],
                                      primfunc_name_hint="dilate")
        self.rewritten += 1
        return relax.op.nn.conv2d(x, relax.const(conv_weight, "float32"), strides=1,
                                  padding=pads, dilation=dilation, groups=1, data_layout="NCHW",
                                  kernel_layout="OIHW", out_dtype="float32")


@tvm.transform.module_pass(opt_level=0, name="ConvTransposeToConv")
class ConvTransposeToConv(CallRewritePass):
    """Rewrite every constant-weight, ungrouped NCHW ``conv2d_transpose`` into a stride
    dilation of its input and a stride-1 ``conv2d`` (``rewritten`` counts them)."""

    rewriter = _Rewriter
    drop_unused = True
