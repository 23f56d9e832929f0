"""Sigmoid (and so SiLU, ``x * sigmoid(x)``) with an exponential the CPU can vectorize.

TVM legalizes ``R.sigmoid`` to ``T.sigmoid``, which LLVM lowers to a call of the C library's
``expf`` per element: the epilogue of a pointwise GEMM then costs more than the GEMM (ddddocr's
SiLU layers: 10-20% of the SGEMM peak, against 70-80% for the same GEMMs without it). This pass
rewrites ``sigmoid(x)`` into ``1 / (1 + fast_exp(-x))`` (TOPI's polynomial exponential: plain
arithmetic, vectorized with the tile; relative error about 1e-7 over float32's range), one
elementwise PrimFunc that fuses into the conv's epilogue like the op it replaces.

Run before legalization (the CPU compile pipeline does).
"""

from __future__ import annotations

import tvm
from tvm import te, topi
from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes.lowering.call_rewriter import CallRewritePass, CallRewriter


def fast_sigmoid(x: te.Tensor) -> te.Tensor:
    """``1 / (1 + fast_exp(-x))``, computed in float32 (a float16 input is widened and the
    result narrowed: TOPI's exponential is a float32 polynomial, and fp16's exp overflows at
    11), vectorized like any elementwise op."""
    wide = x if x.dtype == "float32" else topi.cast(x, "float32")
    e = topi.fast_exp(topi.negative(wide))
    one = tvm.tirx.const(1, "float32")
    if x.dtype == "float32":
        return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="fast_sigmoid")
    return te.compute(x.shape, lambda *i: (one / (one + e(*i))).astype(x.dtype),
                      name="fast_sigmoid")


@mutator
class _Rewriter(CallRewriter):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.sigmoid"
                and str(call.ty.dtype) in ("float32", "float16")):
            self.rewritten += 1
            return self.builder_.call_te(fast_sigmoid, call.args[0], primfunc_name_hint="sigmoid")
        return call


@tvm.transform.module_pass(opt_level=0, name="FastSigmoid")
class FastSigmoid(CallRewritePass):
    """Rewrite every float32 or float16 ``R.sigmoid`` into a vectorizable one (``rewritten``
    counts them)."""

    rewriter = _Rewriter
