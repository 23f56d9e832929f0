"""What the passes that rewrite Relax calls one by one share (strided pointwise, fast sigmoid,
weight packing, batch-norm folding): run a call rewriter over every Relax function of the
module; see through variable bindings to a constant's value."""

from __future__ import annotations

import hashlib

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator


class CallRewriter(PyExprMutator):
    """Base of the passes' rewriters (each decorated with ``relax.expr_functor.mutator``): counts
    the calls it rewrote and records the weights it replaced."""

    def __init__(self, mod: tvm.IRModule, track_origins: bool = False):
        super().__init__(mod)
        self.rewritten = 0
        self.track_origins = track_origins
        self.origins: dict[str, str] = {}  # see CallRewritePass.origins

    def replaced(self, new: np.ndarray, old: np.ndarray) -> None:
        """Record that weight ``new`` replaces ``old`` (hashed only when origins are tracked:
        the compile path does not need them, and hashing VGG19's weights costs ~0.3 s)."""
        if self.track_origins:
            self.origins[digest(new)] = digest(old)


class CallRewritePass:
    """Base of a ``tvm.transform.module_pass`` class whose work is one rewriter: ``rewriter`` is
    a `CallRewriter` class built on the module, counting what it changed in ``rewritten``
    (summed over the modules this pass ran on). With ``drop_unused`` a module that changed loses
    the bindings the rewrite left unused (an unpacked weight, say: the library would otherwise
    carry both copies)."""

    rewriter = None
    drop_unused = False

    def __init__(self, track_origins: bool = False):
        self.rewritten = 0
        # With ``track_origins``: digest of a weight this pass made -> digest of the weight it
        # replaces (`CallRewriter.replaced`): the tuning gate finds a layer's kernels by its
        # ONNX weights through these.
        self.track_origins = track_origins
        self.origins: dict[str, str] = {}

    def make_rewriter(self, mod: tvm.IRModule):
        return self.rewriter(mod, track_origins=self.track_origins)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = self.make_rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        self.rewritten += rewriter.rewritten
        self.origins.update(rewriter.origins)
        out = rewriter.builder_.get()
        if self.drop_unused and rewriter.rewritten:
            out = relax.transform.DeadCodeElimination()(out)
        return out


def is_op(expr, name: str) -> bool:
    """``expr`` is a call of the Relax operator ``name`` (e.g. ``"relax.nn.conv2d"``)."""
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == name)


def digest(array: np.ndarray) -> str:
    """A weight's fingerprint: its float32 bytes and shape."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(repr(array.shape).encode() + array.tobytes()).hexdigest()


def bound_value(mutator, expr):
    """``expr`` with variables replaced by what they are bound to (as far as ``mutator`` knows)."""
    while isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if bound is None:
            return expr
        expr = bound
    return expr


def constant_value(mutator, expr) -> np.ndarray | None:
    """The value of ``expr`` if it is a constant, or a ``broadcast_to`` (as some exporters store
    constant-filled weights), ``reshape`` (a conv bias, as imported) or ``permute_dims`` (a
    Gemm's transposed weight, as imported) of one, else None."""
    expr = bound_value(mutator, expr)
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    op = getattr(expr, "op", None) if isinstance(expr, relax.Call) else None
    if getattr(op, "name", "") in ("relax.broadcast_to", "relax.reshape", "relax.permute_dims"):
        source = bound_value(mutator, expr.args[0])
        if isinstance(source, tvm.ir.expr.Constant):
            try:
                shape = [int(d) for d in expr.ty.shape]
            except (TypeError, ValueError):
                return None
            value = source.value.numpy()
            if op.name == "relax.reshape":
                return value.reshape(shape)
            if op.name == "relax.permute_dims":
                axes = expr.attrs.axes
                return value.transpose(None if axes is None else [int(a) for a in axes])
            return np.broadcast_to(value, shape)
    return None
