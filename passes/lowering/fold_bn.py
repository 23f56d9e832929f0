"""Fold an inference batch_norm into the conv2d (with or without bias add) that feeds it.

``batch_norm(conv2d(x, W) [+ b], gamma, beta, mean, var)[0]`` with constant ``W``, ``b`` and
statistics becomes ``conv2d(x, W') + b'`` (`initialization.lowrank.fold_batch_norm`, the same
function the ONNX pass folds with), computed in numpy: no kernel is built to fold it. TVM's
`FoldBatchnormToConv2D` only matches ``batch_norm(conv2d(x, W))`` with a literal constant ``W``;
the ONNX frontend emits ``batch_norm(add(conv2d(x, W), reshape(b)))`` for convs with a bias, and
some exporters store constant-filled weights as ``broadcast_to`` (`call_rewriter.constant_value`
sees through both).

Two users: `relax_factorize` folds first so that `FactorizeConv2D` sees the same kernels as the
ONNX pass; the compile pipelines (``decompose_rest=True``) fold so that the conv ends in a bias
add that fuses into its kernel with the ReLU after it, instead of a separate batch-norm kernel
reading and writing the whole activation again (light_resnet50: 53 of them; onnxruntime folds
them too), and decompose every other batch norm into elementwise ops
(`relax.transform.DecomposeOpsForInference`) that fuse into the producer's kernel.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from dwsep_compiler.initialization.lowrank import fold_batch_norm

from dwsep_compiler.passes.lowering.fuse_dwpw import is_conv, layout_ok
from dwsep_compiler.passes.lowering.call_rewriter import CallRewritePass, CallRewriter, bound_value, constant_value, is_op


@mutator
class _Rewriter(CallRewriter):
    def _conv_and_bias(self, expr):
        """``(conv call, bias values or None)`` if ``expr`` is conv2d [+ constant bias]."""
        expr = bound_value(self, expr)
        bias = None
        if is_op(expr, "relax.add"):
            lhs, rhs = (bound_value(self, a) for a in expr.args)
            conv, other = (lhs, expr.args[1]) if is_conv(lhs) else (rhs, expr.args[0])
            if not is_conv(conv):
                return None, None
            bias = constant_value(self, other)
            n = int(conv.ty.shape[1])
            if bias is None or bias.shape not in ((n,), (1, n, 1, 1), (n, 1, 1)):
                return None, None  # not a per-channel bias
            bias = bias.reshape(n)
            expr = conv
        return (expr, bias) if is_conv(expr) else (None, None)

    def visit_tuple_getitem_(self, op):
        op = super().visit_tuple_getitem_(op)
        if op.index != 0:
            return op
        bn = bound_value(self, op.tuple_value)
        if (not is_op(bn, "relax.nn.batch_norm") or int(bn.attrs.axis) != 1
                or bool(getattr(bn.attrs, "training", False))):
            return op
        conv, bias = self._conv_and_bias(bn.args[0])
        if conv is None or not layout_ok(conv.attrs):
            return op
        weight = constant_value(self, conv.args[1])
        stats = [constant_value(self, a) for a in bn.args[1:]]
        if weight is None or any(s is None for s in stats) or weight.dtype != np.float32:
            return op
        gamma, beta, mean, var = (np.asarray(s, dtype=np.float32).reshape(-1) for s in stats)
        if not bn.attrs.scale:
            gamma = np.ones_like(gamma)
        if not bn.attrs.center:
            beta = np.zeros_like(beta)
        folded, shift = fold_batch_norm(np.ascontiguousarray(weight), bias, gamma, beta, mean,
                                        var, float(bn.attrs.epsilon))
        self.replaced(folded, weight)
        attrs = conv.attrs
        new_conv = self.builder_.emit(relax.op.nn.conv2d(
            conv.args[0], relax.const(folded), strides=attrs.strides, padding=attrs.padding,
            dilation=attrs.dilation, groups=attrs.groups, data_layout="NCHW",
            kernel_layout="OIHW", out_dtype="float32"))
        self.rewritten += 1
        return relax.op.add(new_conv, relax.const(shift.reshape(1, -1, 1, 1)))


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNormIntoConv2D")
class FoldBatchNormIntoConv2D(CallRewritePass):
    """Fold every inference batch norm that follows a conv2d with constant weights into it
    (``rewritten`` counts them); with ``decompose_rest`` decompose the other batch norms into
    elementwise ops. What the folding left unused is dropped."""

    rewriter = _Rewriter
    drop_unused = True

    def __init__(self, decompose_rest: bool = False, track_origins: bool = False):
        super().__init__(track_origins)
        self.decompose_rest = decompose_rest

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        mod = super().transform_module(mod, ctx)
        if self.decompose_rest:
            mod = relax.transform.DecomposeOpsForInference()(mod)
        return mod
