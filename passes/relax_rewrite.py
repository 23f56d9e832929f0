"""The body shared by the passes that rewrite Relax calls one by one (strided pointwise, fast
sigmoid): run a call rewriter over every Relax function of the module."""

from __future__ import annotations

import tvm
from tvm import relax


class CallRewritePass:
    """Base of a ``tvm.transform.module_pass`` class whose work is one rewriter: ``rewriter`` is
    a ``PyExprMutator`` class built on the module, counting what it changed in ``rewritten``
    (summed over the modules this pass ran on)."""

    rewriter = None

    def __init__(self):
        self.rewritten = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = self.rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        self.rewritten += rewriter.rewritten
        return rewriter.builder_.get()
