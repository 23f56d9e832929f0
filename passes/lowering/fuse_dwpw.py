"""Fuse a depthwise conv2d and the pointwise conv2d that reads it into one kernel.

``conv2d(conv2d(x, W_dw, groups=M), W_pw)`` (constant weights, NCHW/OIHW, the depthwise output
read by nothing else) becomes one ``call_tir`` of a PrimFunc that computes both: blocks
``depthwise`` then ``pointwise``, so a schedule (`schedules/cpu/fused_dwpw.py`) can produce each
depthwise tile right before the pointwise GEMM consumes it, never writing the depthwise output to
memory. The PrimFunc is marked out-elementwise-fusable, so bias, ReLU and residual adds that
follow still fuse into it.

Run before legalization (the compile pipeline does, for CPU targets).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from dwsep_compiler.passes import names

_OUT_EWISE_FUSABLE = 4  # relay/relax OpPatternKind::kOutEWiseFusable

# Fusion pays where the depthwise output is large: the separate pointwise GEMM's flat pixel
# tiles beat the fused kernel's row tiles on small maps (on a 2-core AVX2 machine, fused vs
# separate kernels: 1.55x faster at 160x160, 1.3x at 224x224, even at 112x112, 2x slower at
# 56x56 and 28x28; re-measure with bench/speed.py when the schedules change).
MIN_FUSED_PIXELS = 128 * 128


def depthwise_pointwise_compute(x, w_dw, w_pw, strides, padding, dilation):
    """TE definition: depthwise (multiplier r = W_dw rows / M) then 1x1 pointwise."""
    batch, channels, height, width = x.shape
    mr, _, kh, kw = w_dw.shape
    out_channels = w_pw.shape[0]
    channels, height, width, mr, kh, kw = (int(d) for d in (channels, height, width, mr, kh, kw))
    r = mr // channels
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    padded = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right], name=names.PAD)
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    ry = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", kh)), name="ry")
    rx = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", kw)), name="rx")
    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731
    depthwise = te.compute(
        (batch, i64(mr), i64(out_h), i64(out_w)),
        lambda b, c, y, xx: te.sum(
            padded[b, c // r, y * sh + ry * dh, xx * sw + rx * dw] * w_dw[c, 0, ry, rx],
            axis=[ry, rx]),
        name=names.FUSED_DEPTHWISE)
    rc = te.reduce_axis((i64(0), i64(mr)), name="rc")
    return te.compute(
        (batch, out_channels, i64(out_h), i64(out_w)),
        lambda b, n, y, xx: te.sum(depthwise[b, rc, y, xx] * w_pw[n, rc, 0, 0], axis=rc),
        name=names.FUSED_POINTWISE)


@mutator
class _Fuser(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, min_pixels: int):
        super().__init__(mod)
        self.min_pixels = min_pixels
        self.fused = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_conv(call):
            return call
        dw_var, w_pw = call.args
        dw_call = self.lookup_binding(dw_var) if isinstance(dw_var, relax.Var) else dw_var
        if not is_conv(dw_call) or not _pointwise_ok(call, w_pw) or _read_elsewhere(self.users, dw_var):
            return call
        x, w_dw = dw_call.args
        attrs = dw_call.attrs
        if not depthwise_ok(dw_call) or str(w_pw.ty.dtype) != str(x.ty.dtype):
            return call
        dtype = str(x.ty.dtype)
        x_shape = [int(d) for d in x.ty.shape]
        out_shape = [int(d) for d in call.ty.shape]
        if out_shape[2] * out_shape[3] < self.min_pixels:
            return call
        padding = [int(p) for p in attrs.padding]
        if len(padding) == 2:
            padding = padding * 2
        xt = te.placeholder(_i64(x_shape), dtype, name="x")
        wdt = te.placeholder(_i64(w_dw.ty.shape), dtype, name="w_dw")
        wpt = te.placeholder(_i64(w_pw.ty.shape), dtype, name="w_pw")
        out = depthwise_pointwise_compute(
            xt, wdt, wpt, [int(s) for s in attrs.strides], padding,
            [int(d) for d in attrs.dilation])
        func = (te.create_prim_func([xt, wdt, wpt, out]).without_attr("global_symbol")
                .with_attr("op_pattern", _OUT_EWISE_FUSABLE))
        gvar = self.builder_.add_func(func, names.FUSED_DWPW)
        self.fused += 1
        return relax.call_tir(gvar, [x, w_dw, w_pw],
                              relax.TensorType([int(d) for d in out.shape], dtype))


def _i64(shape) -> list:
    """Shapes as int64, like the legalized ops around it (FuseTIR compares buffer types)."""
    return [tvm.tirx.IntImm("int64", int(d)) for d in shape]


def _read_elsewhere(users: dict, var) -> bool:
    """True if the depthwise output is read by anything but this pointwise conv."""
    return users.get(var, 0) > 1


def is_conv(expr) -> bool:
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == "relax.nn.conv2d")


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant)


# The element types the CPU lowering passes rewrite (float16: --precision fp16 on ARMv8.2).
FLOAT_DTYPES = ("float32", "float16")


def layout_ok(attrs) -> bool:
    """NCHW data, OIHW kernel, and an output of the input's float type."""
    return (attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW"
            and attrs.out_layout in ("", "NCHW")
            and str(attrs.out_dtype) in ("", "None", *FLOAT_DTYPES))


def _pointwise_ok(call, w_pw) -> bool:
    attrs = call.attrs
    shape = [int(d) for d in w_pw.ty.shape] if _is_const(w_pw) else None
    return (shape is not None and shape[2:] == [1, 1] and int(attrs.groups) == 1
            and layout_ok(attrs) and all(int(s) == 1 for s in attrs.strides)
            and all(int(p) == 0 for p in attrs.padding) and str(w_pw.ty.dtype) in FLOAT_DTYPES)


def depthwise_ok(call) -> bool:
    """``call`` is a depthwise conv2d (groups = input channels, any multiplier) the CPU lowering
    passes rewrite: constant float weights, NCHW/OIHW, a static 4-D input."""
    x, w_dw = call.args
    attrs = call.attrs
    if not (_is_const(w_dw) and layout_ok(attrs)) or str(w_dw.ty.dtype) not in FLOAT_DTYPES:
        return False
    x_shape = getattr(x.ty, "shape", None)
    if x_shape is None or len(x_shape) != 4 or str(x.ty.dtype) != str(w_dw.ty.dtype):
        return False
    try:
        channels = int(x_shape[1])
        [int(d) for d in x_shape]
    except (TypeError, ValueError):
        return False
    mr = int(w_dw.ty.shape[0])
    return (int(attrs.groups) == channels and int(w_dw.ty.shape[1]) == 1 and mr % channels == 0)


@tvm.transform.module_pass(opt_level=0, name="FuseDepthwisePointwise")
class FuseDepthwisePointwise:
    """Replace each depthwise -> pointwise conv2d pair by one fused PrimFunc call, where the
    output has at least ``min_pixels`` pixels (0: every pair)."""

    def __init__(self, min_pixels: int = MIN_FUSED_PIXELS):
        self.min_pixels = min_pixels
        self.fused = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        fuser = _Fuser(mod, self.min_pixels)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                fuser.users = _count_uses(func)
                new = fuser.visit_expr(func)
                fuser.builder_.update_func(gvar, new)
        self.fused += fuser.fused
        return fuser.builder_.get()


def _count_uses(func) -> dict:
    counts: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts
