"""Dense layers on NEON: the weight packed at compile time into tiles of rows by columns, so
that the loads of one step of the kernel are neighbours in memory.

`schedules/cpu/dense.py` streams a batch-1 matmul ``x[K] @ W[K, N]`` as an outer product: for a
block of ``R`` weight rows it accumulates ``x[k] * W[k, j:j+C]`` into ``C`` partial sums held in
registers. Over the row-major ``[K, N]`` weight the ``R`` rows of a block are ``4N`` bytes apart
(16 KB for VGG's 4096 outputs), beyond the +-1008-byte offset an AArch64 load pair (``LDP q``)
can encode, so LLVM loads each vector with its own ``LDR``: one load per FMA, 2.2 instructions
per FMA on the emulated Cortex-A76. Packed as ``[K / R, N / C, R, C]`` a block's ``R x C``
weights are one contiguous run of ``4RC`` bytes (1 KB for R = C = 16) read in order, and the
loads pair (2048 x 1024: 1.62 instructions per FMA); the whole weight still streams through
memory once, front to back.

Only where vector loads need the pairing: on x86 the FMA itself takes its vector operand from
memory at any offset, so the row-major weight costs nothing there and builds stay as they were.

`packed_dense_tile` (the schedule's) picks ``R`` and ``C``; a matmul whose weight is not a
constant, whose batch is beyond the dense rule's, or whose columns are no whole vectors is left
alone. Run before legalization (the CPU compile pipeline does, on NEON).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import mutator

from dwsep_compiler.passes import names
from dwsep_compiler.passes.lowering.call_rewriter import (CallRewritePass, CallRewriter,
                                                          constant_value, is_op)
from dwsep_compiler.passes.lowering.fuse_dwpw import FLOAT_DTYPES
from dwsep_compiler.schedules.cpu.dense import packed_dense_tile


def packed_dense(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """``out[i, j] = sum_k x[i, k] * w[k // R, j // C, k % R, j % C]`` (``w``: [K/R, N/C, R, C])."""
    batch, reduce = x.shape
    _, tiles, rows, columns = w.shape
    k = te.reduce_axis((0, reduce), name="k")
    return te.compute(
        (batch, tiles * columns),
        lambda i, j: te.sum(x[i, k] * w[k // rows, j // columns, k % rows, j % columns], axis=k),
        name=names.PACKED_DENSE)


def pack_dense_weight(weight: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``[K, N]`` -> ``[K / rows, N / columns, rows, columns]``."""
    k, n = weight.shape
    packed = weight.reshape(k // rows, rows, n // columns, columns).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed)


@mutator
class _Rewriter(CallRewriter):
    def __init__(self, mod: tvm.IRModule, lanes: int, track_origins: bool = False):
        super().__init__(mod, track_origins)
        self.lanes = lanes

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_op(call, "relax.matmul"):
            return call
        x, w = call.args
        weight = constant_value(self, w)
        dtype = str(call.ty.dtype)
        if (weight is None or weight.ndim != 2 or dtype not in FLOAT_DTYPES
                or str(x.ty.dtype) != dtype or weight.dtype != np.dtype(dtype)):
            return call
        try:
            batch, reduce = (int(d) for d in x.ty.shape)
        except (TypeError, ValueError):  # symbolic shapes, or not a 2-D input
            return call
        lanes = self.lanes * 4 // weight.dtype.itemsize  # float16: twice the float32 lanes
        tile = packed_dense_tile(batch, *weight.shape, lanes)
        if tile is None or reduce != weight.shape[0]:
            return call
        packed = pack_dense_weight(weight, *tile)
        self.replaced(packed, weight)
        self.rewritten += 1
        return self.builder_.call_te(packed_dense, x, relax.const(packed, dtype),
                                     primfunc_name_hint=names.PACKED_DENSE)


@tvm.transform.module_pass(opt_level=0, name="PackDenseWeights")
class PackDenseWeights(CallRewritePass):
    """Rewrite the batch-small ``matmul`` calls with a constant ``[K, N]`` weight into
    `packed_dense` calls over ``[K/R, N/C, R, C]`` tiles (``lanes``: float32 lanes of a vector
    register; ``rewritten`` counts them)."""

    drop_unused = True

    def __init__(self, lanes: int, track_origins: bool = False):
        super().__init__(track_origins)
        self.lanes = lanes

    def make_rewriter(self, mod):
        return _Rewriter(mod, self.lanes, track_origins=self.track_origins)
