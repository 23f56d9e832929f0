"""The depthwise-separable rewrite as a TVM Relax function pass.

`FactorizeConv2D` rewrites ``relax.nn.conv2d(x, W)`` with a constant OIHW weight, NCHW data and
``groups == 1`` into ``conv2d(conv2d(x, W_dw, groups=M), W_pw)``. It decides and builds weights
with the same functions as the ONNX pass. Weights that the ONNX frontend leaves as expressions of
constants (``broadcast_to(const)``) become constants after ``relax.transform.FoldConstant()``;
run it first (``factorize_relax`` does).

    seq = tvm.transform.Sequential([relax.transform.FoldConstant(), FactorizeConv2D(rank=1)])
    mod = seq(mod)
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.module import IRModule
from tvm.ir.transform import PassContext
from tvm.relax import Expr
from tvm.relax.dpl import is_op, rewrite_call, wildcard
from tvm.relax.transform import function_pass

from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.report import LayerReport

from dwsep_compiler.passes.rewrite.conditions import ConvSpec, plan_conv
from dwsep_compiler.passes.lowering.fold_bn import FoldBatchNormIntoConv2D


@function_pass(opt_level=0)
class FactorizeConv2D:
    """Replace standard 2-D convolutions by depthwise + pointwise pairs (per-channel SVD init).

    ``rank``/``energy``/``force`` as in `RankPolicy`; ``skip`` names layers (``conv2d_<i>`` in
    visiting order) to leave alone. After the pass runs, ``layers`` holds one report entry per
    conv2d it saw, with the same fields as the ONNX pass's report.
    """

    def __init__(self, rank: int | str | None = None, energy: float | None = None,
                 force: bool = False, skip=(), policy: RankPolicy | None = None):
        self.policy = policy or RankPolicy(rank=rank, energy=energy, force=force)
        self.skip = frozenset(skip)
        self.layers: list[LayerReport] = []
        self.data = wildcard()
        self.weight = wildcard()
        self.pattern = is_op("relax.nn.conv2d")(self.data, self.weight)

    def transform_function(self, func: Expr, mod: IRModule, ctx: PassContext) -> Expr:
        if "Primitive" in func.attrs.keys() and func.attrs["Primitive"] != 0:
            return func

        # rewrite_call repeats until nothing changes: it shows us the convs we created (recognised
        # by their weight constants) and the ones we left alone (decided once) again.
        decided: dict = {}
        created_weights: list = []

        def rewriter(expr, matches):
            weight = matches[self.weight]
            if any(weight.same_as(w) for w in created_weights):
                return expr
            if expr in decided:
                return decided[expr]
            result = decide(expr, matches)
            decided[expr] = result
            if result is not expr:
                created_weights.extend([result.args[1], result.args[0].args[1]])
            return result

        def decide(expr, matches):
            conv = matches[self.pattern]
            data, weight = matches[self.data], matches[self.weight]
            attrs = conv.attrs
            name = f"conv2d_{len(self.layers)}"
            const = isinstance(weight, tvm.ir.expr.Constant)
            weight_shape = _static_shape(weight)
            data_shape = _static_shape(data)
            out_shape = _static_shape(expr)
            value = weight.value.numpy() if const else None
            spec = ConvSpec(
                name=name,
                weight=value,
                weight_shape=weight_shape if (const or weight_shape) else None,
                weight_dtype=str(value.dtype) if value is not None else None,
                groups=int(attrs.groups),
                strides=tuple(int(s) for s in attrs.strides),
                has_bias=False,
                batch=data_shape[0] if data_shape else None,
                out_spatial=tuple(out_shape[2:]) if out_shape else None,
                layout_ok=(attrs.data_layout == "NCHW" and attrs.kernel_layout == "OIHW"
                           and (attrs.out_layout in ("", "NCHW"))),
            )
            if not const:
                spec.weight_shape = None  # "non-constant weights" wins over shape facts
            plan = plan_conv(spec, self.policy, self.skip)
            self.layers.append(plan.report)
            if not plan.report.factorized:
                return expr
            out_dtype = attrs.out_dtype if str(attrs.out_dtype) else None
            depthwise = relax.op.nn.conv2d(
                data, relax.const(plan.depthwise), strides=attrs.strides,
                padding=attrs.padding, dilation=attrs.dilation,
                groups=plan.report.in_channels, data_layout="NCHW", kernel_layout="OIHW",
                out_dtype=out_dtype)
            return relax.op.nn.conv2d(
                depthwise, relax.const(plan.pointwise), data_layout="NCHW",
                kernel_layout="OIHW", out_dtype=out_dtype)

        return rewrite_call(self.pattern, rewriter, func)


def _static_shape(expr: Expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        dims = [d for d in shape.values] if hasattr(shape, "values") else list(shape)
        return tuple(int(d) for d in dims)
    except (TypeError, ValueError, AttributeError):
        return None


def factorize_relax(mod: IRModule, policy: RankPolicy | None = None,
                    skip=()) -> tuple[IRModule, list[LayerReport]]:
    """Fold constants and batch norms, then run `FactorizeConv2D`.

    Returns the module and the per-conv report (the same decisions as the ONNX pass makes).
    """
    factorize = FactorizeConv2D(policy=policy, skip=skip)
    seq = tvm.transform.Sequential([relax.transform.FoldConstant(), FoldBatchNormIntoConv2D(),
                                    factorize])
    with tvm.transform.PassContext(opt_level=3):
        out = seq(mod)
    return out, factorize.layers
