"""Fold an inference batch_norm into the conv2d (with or without bias add) that feeds it.

TVM's `FoldBatchnormToConv2D` only matches ``batch_norm(conv2d(x, W))``; the ONNX frontend emits
``batch_norm(add(conv2d(x, W), b))`` for convs with a bias. Folding first lets `FactorizeConv2D`
see the same kernels as the ONNX pass (which folds BN the same way, with the same function).
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.ir.module import IRModule
from tvm.ir.transform import PassContext
from tvm.relax import Expr
from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, rewrite_call, wildcard
from tvm.relax.transform import function_pass

from dwsep_compiler.initialization.lowrank import fold_batch_norm


@function_pass(opt_level=0)
class FoldBatchNormIntoConv2D:
    def __init__(self):
        self.data = wildcard()
        self.weight = is_const()
        self.bias = is_const()
        self.conv = is_op("relax.nn.conv2d")(self.data, self.weight)
        self.biased = is_op("relax.add")(self.conv, self.bias)
        self.params = [is_const() for _ in range(4)]
        self.bn = is_op("relax.nn.batch_norm")(self.conv | self.biased, *self.params)
        self.pattern = TupleGetItemPattern(self.bn, 0)

    def transform_function(self, func: Expr, mod: IRModule, ctx: PassContext) -> Expr:
        if "Primitive" in func.attrs.keys() and func.attrs["Primitive"] != 0:
            return func

        def rewriter(expr, matches):
            conv, bn = matches[self.conv], matches[self.bn]
            if (conv.attrs.kernel_layout != "OIHW" or conv.attrs.data_layout != "NCHW"
                    or int(bn.attrs.axis) != 1 or bn.attrs.training):
                return expr
            weight = matches[self.weight].value.numpy()
            if weight.dtype != np.float32:
                return expr
            n = weight.shape[0]
            bias = None
            if self.bias in matches:
                bias = matches[self.bias].value.numpy()
                if bias.size != n or bias.shape not in ((n,), (1, n, 1, 1), (n, 1, 1)):
                    return expr
                bias = bias.reshape(n)
            scale, shift, mean, var = (matches[p].value.numpy() for p in self.params)
            folded_w, folded_b = fold_batch_norm(weight, bias, scale, shift, mean, var,
                                                 float(bn.attrs.epsilon))
            new_conv = relax.Call(conv.op, (matches[self.data], relax.const(folded_w)), conv.attrs)
            return relax.op.add(new_conv, relax.const(folded_b.reshape(1, n, 1, 1)))

        return rewrite_call(self.pattern, rewriter, func)
