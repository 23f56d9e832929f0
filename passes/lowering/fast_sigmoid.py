"""Sigmoid (and so SiLU, ``x * sigmoid(x)``) with an exponential the CPU can vectorize.

TVM legalizes ``R.sigmoid`` to ``T.sigmoid``, which LLVM lowers to a call of the C library's
``expf`` per element: the epilogue of a pointwise GEMM then costs more than the GEMM (ddddocr's
SiLU layers: 10-20% of the SGEMM peak, against 70-80% for the same GEMMs without it). This pass
rewrites ``sigmoid(x)`` into ``1 / (1 + 2^z)``, ``z = -x log2(e)``, with ``2^z`` in plain
vector arithmetic (`exp2_vectorized`), one elementwise PrimFunc that fuses into the conv's
epilogue like the op it replaces. ``x * sigmoid(x)`` (SiLU, as ONNX exporters write it)
becomes one ``x / (1 + 2^z)``: the division takes x as its numerator instead of 1, saving the
multiply per vector.

Why not TOPI's ``fast_exp``: it evaluates a degree-7 polynomial in the natural base, then clamps
the result against its input; in a SiLU epilogue that was ~37 instructions per 4-lane vector
on the emulated Cortex-A76 (every Horner step needs a copy of its constant, NEON's FMA
overwriting its addend). Base 2 needs no range reduction by ln 2, a degree-5 polynomial is
float32-accurate on [-1/2, 1/2], and the scaling by ``2^n`` is an integer add to the exponent
bits, kept in range by clamping ``z`` to +-125 (where the sigmoid is 0 or 1 in float32).

Run before legalization (the CPU compile pipeline does).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes.lowering.call_rewriter import CallRewritePass, CallRewriter

# 2^f on [-1/2, 1/2], lowest degree first: a least-squares fit of the relative error reweighted
# towards minimax; 2.4e-7 relative in float32 arithmetic (degree 4: 2.7e-6).
EXP2_COEFFICIENTS = (1.0000001192092896, 0.6931469440460205, 0.24022120237350464,
                     0.05550713464617729, 0.009675540961325169, 0.001327646430581808)
EXP2_CLAMP = 125.0  # |z| <= 125: 2^n with n + 127 inside float32's normal exponents
NEG_LOG2_E = -1.4426950408889634


def exp2_vectorized(z):
    """``2^z`` of a float32 expression, ``|z| <= EXP2_CLAMP``: ``n = round(z)``, ``f = z - n``,
    a polynomial for ``2^f`` and ``n`` added to its exponent bits (no table, no call)."""
    n = tirx.round(z)
    f = z - n
    p = tirx.const(EXP2_COEFFICIENTS[-1], "float32")
    for c in reversed(EXP2_COEFFICIENTS[:-1]):
        p = p * f + tirx.const(c, "float32")
    # n * 2^23 in one conversion: AArch64's fixed-point FCVTZS (#23) where a conversion and a
    # shift took two instructions (x86: a multiply and a conversion, as many as before). Exact:
    # |n| <= EXP2_CLAMP, so n * 2^23 fits int32.
    bits = tirx.reinterpret("int32", p) + (n * tirx.const(1 << 23, "float32")).astype("int32")
    return tirx.reinterpret("float32", bits)


def _one_plus_exp(x: te.Tensor, index):
    """``(x, 1 + 2^(-x log2 e))`` in float32 at ``index`` (a float16 input widened: fp16's
    exponent range is too short for the intermediate)."""
    wide = x(*index) if x.dtype == "float32" else x(*index).astype("float32")
    bound = tirx.const(EXP2_CLAMP, "float32")
    z = tirx.max(tirx.min(wide * tirx.const(NEG_LOG2_E, "float32"), bound), -bound)
    return wide, tirx.const(1, "float32") + exp2_vectorized(z)


def fast_sigmoid(x: te.Tensor) -> te.Tensor:
    """``1 / (1 + 2^(-x log2 e))``, computed in float32 (a float16 result narrowed), vectorized
    like any elementwise op."""

    def sigmoid(*i):
        _, denominator = _one_plus_exp(x, i)
        out = tirx.const(1, "float32") / denominator
        return out if x.dtype == "float32" else out.astype(x.dtype)

    return te.compute(x.shape, sigmoid, name="fast_sigmoid")


def fast_silu(x: te.Tensor) -> te.Tensor:
    """SiLU, ``x * sigmoid(x)``, as ``x / (1 + 2^(-x log2 e))``: the division takes x as its
    numerator, one multiply per vector less than the product (and one rounding less)."""

    def silu(*i):
        wide, denominator = _one_plus_exp(x, i)
        out = wide / denominator
        return out if x.dtype == "float32" else out.astype(x.dtype)

    return te.compute(x.shape, silu, name="fast_silu")


@mutator
class _Rewriter(CallRewriter):
    def __init__(self, mod: tvm.IRModule, track_origins: bool = False):
        super().__init__(mod, track_origins)
        self.sigmoids: list[tuple] = []  # (rewritten call, its input) of every sigmoid

    def visit_call_(self, call):
        call = super().visit_call_(call)
        # The dtype is read only for the two ops rewritten: other calls may return a tuple
        # (a split), which has none.
        if (not isinstance(call.op, tvm.ir.Op)
                or call.op.name not in ("relax.sigmoid", "relax.multiply")
                or str(call.ty.dtype) not in ("float32", "float16")):
            return call
        if call.op.name == "relax.sigmoid":
            self.rewritten += 1
            out = self.builder_.call_te(fast_sigmoid, call.args[0], primfunc_name_hint="sigmoid")
            self.sigmoids.append((out, call.args[0]))
            return out
        x = self._silu_input(*call.args)
        if x is not None:
            self.rewritten += 1
            return self.builder_.call_te(fast_silu, x, primfunc_name_hint="silu")
        return call

    def _silu_input(self, a, b):
        """``x`` where ``a * b`` is ``x * sigmoid(x)`` (either order), else None."""
        for x, s in ((a, b), (b, a)):
            bound = self.lookup_binding(s) if isinstance(s, relax.Var) else None
            if bound is not None and any(bound.same_as(out) and x.same_as(source)
                                         for out, source in self.sigmoids):
                return x
        return None


@tvm.transform.module_pass(opt_level=0, name="FastSigmoid")
class FastSigmoid(CallRewritePass):
    """Rewrite every float32 or float16 ``R.sigmoid`` into a vectorizable one, and ``x *
    sigmoid(x)`` into one SiLU (``rewritten`` counts both; a sigmoid read only by its SiLU is
    dropped)."""

    rewriter = _Rewriter
    drop_unused = True
