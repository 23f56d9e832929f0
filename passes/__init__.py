"""Graph passes: the depthwise-separable rewrite on ONNX graphs and on TVM Relax IRModules.

Both passes decide with `conditions.plan_conv` ("may I, and at which rank?") and build their new
weights with `dwsep_compiler.initialization.lowrank` ("do it"), so they agree by construction.
"""

from dwsep_compiler.passes.rewrite.conditions import ConvSpec, SkipReason, plan_conv

__all__ = ["ConvSpec", "SkipReason", "plan_conv"]
