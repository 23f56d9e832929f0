"""Kernel scratch buffers of a few KB on the stack, not from the runtime's workspace pool.

TVM's ``LowerTVMBuiltin`` keeps a CPU kernel's constant-size buffer on the stack only below
1 KB (``kMaxStackAlloca``); anything larger becomes a ``TVMBackendAllocWorkspace`` /
``TVMBackendFreeWorkspace`` pair around the buffer's scope. The depthwise rule builds each band's
padded input rows in such a buffer inside the parallel loop (ddddocr's 24-channel 32 x 80
depthwise: 10 rows x 82 columns, 3.3 KB), so every band called into the runtime twice: a
thread-local pool lookup, a list search, the free's bookkeeping. On the emulated Cortex-A76,
per inference of ddddocr's backbone: 457K -> 256K instructions outside the kernels, 36.69M ->
36.44M in all (LLVM, now seeing that the buffer aliases nothing, also turns the row copies
into ``memcpy`` calls; they are in both figures).

This pass marks such buffers ``disable_lower_builtin``, the annotation ``LowerTVMBuiltin``
honours by leaving the allocation to codegen, which emits an ``alloca`` in the entry block of
the function that holds it (for a parallel loop: the closure each worker runs), so it costs
nothing per band. Only constant-size ``global`` buffers, at most `STACK_BUDGET` bytes in all per
PrimFunc: worker threads' stacks are 8 MB on glibc and 1 MB on Android's bionic by default,
and a tensor-sized intermediate stays in the pool.

A TIR pass: the CPU TIR pipeline (`dwsep_compiler.compile.cpu.tir_pipeline`) runs it after TVM's
own lowering, before the host finalization that runs ``LowerTVMBuiltin``.
"""

from __future__ import annotations

import tvm
from tvm import tirx

# Bytes of scratch a PrimFunc may move to the stack (largest buffers here: a depthwise band of
# 10-18 padded rows of up to 226 floats, 4-16 KB).
STACK_BUDGET = 64 * 1024
# TVM puts smaller constant buffers on the stack already (runtime::kMaxStackAlloca).
TVM_STACK_LIMIT = 1024
ANNOTATION = "disable_lower_builtin"


def buffer_bytes(buffer: tirx.Buffer) -> int | None:
    """Bytes of a constant-shape buffer, else None."""
    elements = 1
    for extent in buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        elements *= int(extent)
    return elements * buffer.dtype.bits * buffer.dtype.lanes // 8


class _Planner:
    """Rebuilds the statements on the way to each AllocBuffer it moves; everything else is
    returned as it is (an allocation under a statement kind not listed stays in the pool)."""

    def __init__(self, budget: int):
        self.left = budget
        self.moved: list[str] = []

    def visit(self, stmt):
        if isinstance(stmt, tirx.AllocBuffer):
            return self._alloc(stmt)
        if isinstance(stmt, tirx.SeqStmt):
            seq = [self.visit(s) for s in stmt.seq]
            if all(new.same_as(old) for new, old in zip(seq, stmt.seq)):
                return stmt
            return tirx.SeqStmt(seq, stmt.span)
        if isinstance(stmt, tirx.For):
            body = self.visit(stmt.body)
            if body.same_as(stmt.body):
                return stmt
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body,
                            stmt.thread_binding, stmt.annotations, stmt.step, stmt.span)
        if isinstance(stmt, tirx.AttrStmt):
            body = self.visit(stmt.body)
            if body.same_as(stmt.body):
                return stmt
            return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body, stmt.span)
        if isinstance(stmt, tirx.IfThenElse):
            then = self.visit(stmt.then_case)
            other = None if stmt.else_case is None else self.visit(stmt.else_case)
            if then.same_as(stmt.then_case) and (other is None
                                                 or other.same_as(stmt.else_case)):
                return stmt
            return tirx.IfThenElse(stmt.condition, then, other, stmt.span)
        return stmt

    def _alloc(self, stmt):
        buffer = stmt.buffer
        size = buffer_bytes(buffer)
        if (size is None or size < TVM_STACK_LIMIT or size > self.left
                or buffer.scope() != "global" or ANNOTATION in stmt.annotations):
            return stmt
        self.left -= size
        self.moved.append(buffer.name)
        annotations = dict(stmt.annotations)
        annotations[ANNOTATION] = tirx.IntImm("int32", 1)
        return tirx.AllocBuffer(buffer, annotations=annotations, span=stmt.span)


def stack_scratch_buffers(func: tirx.PrimFunc, budget: int = STACK_BUDGET):
    """``(func with its small scratch buffers on the stack, names of those buffers)``."""
    planner = _Planner(budget)
    body = planner.visit(func.body)
    return (func if body.same_as(func.body) else func.with_body(body)), planner.moved


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="StackScratch")
class StackScratch:
    """Every PrimFunc's constant-size scratch buffers over TVM's 1 KB stack limit, up to
    `STACK_BUDGET` bytes in all, allocated on the stack (see the module docstring)."""

    def __init__(self, budget: int = STACK_BUDGET):
        self.budget = budget

    def transform_function(self, func, _mod, _ctx):
        return stack_scratch_buffers(func, self.budget)[0]
