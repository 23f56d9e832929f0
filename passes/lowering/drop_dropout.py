"""Inference dropout is the identity: its output becomes its input before fusion.

TVM's ONNX frontend imports ``Dropout`` as ``R.nn.dropout(x)`` (a tuple of the output and a
mask) even in inference graphs, and legalizes it to a copy plus a mask of ones: a kernel's
worth of memory traffic (VGG-19's and AlexNet's classifier), and in Inception the global
average pool fused with it writes two outputs, which no reduction schedule can place (it took
the generic fallback). ``dropout(x)[0]`` is replaced by ``x``; the dropout goes with the dead
code unless its mask is read, where it is kept.

Run before legalization (the compile pipelines do).
"""

from __future__ import annotations

import tvm

from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes.lowering.call_rewriter import CallRewritePass, CallRewriter, bound_value, is_op


@mutator
class _Rewriter(CallRewriter):
    def visit_tuple_getitem_(self, op):
        op = super().visit_tuple_getitem_(op)
        if op.index != 0:
            return op
        dropout = bound_value(self, op.tuple_value)
        if not is_op(dropout, "relax.nn.dropout"):
            return op
        self.rewritten += 1
        return dropout.args[0]


@tvm.transform.module_pass(opt_level=0, name="DropDropout")
class DropDropout(CallRewritePass):
    """Replace every ``dropout(x)[0]`` by ``x`` (``rewritten`` counts them); unused dropouts
    are removed."""

    rewriter = _Rewriter
    drop_unused = True
