"""The arithmetic a library computes in: fp32, or fp16 on ARM cores that have it.

``--precision fp16`` keeps the model's interface in float32 and converts what is inside: the
weights become float16 constants and the convs, matmuls and the elementwise ops between them
compute in float16 (NEON on ARMv8.2 with ``+fullfp16``: 8 lanes per register instead of 4, half
the bytes per weight and activation). It is done on the imported Relax module, so the build,
tuning, latency gating and the profile all see the same float16 program: batch norms are folded
into their convs in float32 first, then TVM's ``ToMixedPrecision`` with float16 accumulation,
then the casts of constants are folded away.

A core without fp16 arithmetic (ARMv8.0: Cortex-A53, A72) dies with SIGILL on such a library,
so the option is refused, in one line, for every target whose features do not include
``+fullfp16``; OpenCL targets are refused too (PoCL, where they are verified, has no fp16).
"""

from __future__ import annotations

import tvm
from tvm import relax

from dwsep_compiler.errors import DwsepError

PRECISIONS = {"fp32": "float32", "fp16": "float16"}
FP16_FEATURE = "+fullfp16"
# The library against onnxruntime's float32 run of the same model: a float16 product has a
# relative rounding of 2^-11 (4.9e-4) and a conv sums hundreds of them, layer after layer
# (the Fashion example: 1.6e-3; light ResNet-50 and VGG-19 with random weights: see the test).
FP16_TOLERANCE = 3e-2


def has_fp16(preset) -> bool:
    """Does the preset's target claim fp16 arithmetic (an ARMv8.2 core)?"""
    target = preset.target
    if preset.is_gpu or target.get("kind") != "llvm":
        return False
    mattr = target.get("mattr", [])
    features = mattr.split(",") if isinstance(mattr, str) else list(mattr)
    return FP16_FEATURE in features


def check_precision(precision: str, preset) -> str:
    """The element type for ``precision`` on ``preset``, or a one-line `DwsepError`."""
    if precision not in PRECISIONS:
        raise DwsepError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and preset.is_gpu:
        raise DwsepError(f"--precision fp16 is for ARM CPU targets; target '{preset.name}' is "
                         "OpenCL (its kernels are verified on PoCL, which has no fp16)")
    if precision == "fp16" and not has_fp16(preset):
        cores = "arm-a55, arm-a76, arm-a78, or a target with mattr +fullfp16"
        raise DwsepError(f"--precision fp16 needs a core with fp16 arithmetic; target "
                         f"'{preset.name}' has none (ARMv8.2 presets: {cores})")
    return PRECISIONS[precision]


def to_precision(mod: tvm.IRModule, dtype: str) -> tvm.IRModule:
    """``mod`` computing in ``dtype`` inside, float32 at its interface (see the module doc)."""
    if dtype == "float32":
        return mod
    from dwsep_compiler.passes.lowering.fold_bn import FoldBatchNormIntoConv2D

    return tvm.transform.Sequential([
        relax.transform.FoldConstant(),
        FoldBatchNormIntoConv2D(),
        relax.transform.ToMixedPrecision(out_dtype=dtype),
        relax.transform.FoldConstant(),
    ])(mod)
