"""May I factorize this convolution, and at which rank? Shared by the ONNX and the Relax pass.

`plan_conv` takes a `ConvSpec` (what either IR knows about one conv) and returns the layer's
report entry with, when factorized, the depthwise and pointwise weights. Every refusal is a
`SkipReason` that reaches the report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from dwsep_compiler import macs
from dwsep_compiler.initialization import lowrank
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.report import LayerReport


class SkipReason(str, enum.Enum):
    SKIPPED_BY_USER = "skipped_by_user"
    GROUPED = "grouped_or_depthwise"
    POINTWISE = "kernel_1x1"
    NOT_2D = "not_2d"
    NON_CONSTANT_WEIGHTS = "non_constant_weights"
    NON_FLOAT32 = "non_float32_weights"
    NON_FINITE = "non_finite_weights"
    NON_CONSTANT_BIAS = "non_constant_bias"
    UNSUPPORTED_LAYOUT = "unsupported_layout"
    UNKNOWN_SHAPE = "unknown_shape"
    NO_MAC_REDUCTION = "no_mac_reduction"
    KEPT_BY_ALLOCATION = "kept_by_rank_allocation"
    FACTORIZATION_OFF = "factorization_off"
    NO_TORCH_MODULE = "no_conv2d_module"


DETAILS = {
    SkipReason.SKIPPED_BY_USER: "named by --skip",
    SkipReason.GROUPED: "grouped or depthwise conv (group != 1) is already cheap",
    SkipReason.POINTWISE: "1x1 kernel: nothing to separate",
    SkipReason.NOT_2D: "only 2-D convolutions are rewritten",
    SkipReason.NON_CONSTANT_WEIGHTS: "weights are computed at run time, not constants",
    SkipReason.NON_FLOAT32: "only float32 weights are rewritten",
    SkipReason.NON_FINITE: "the weights or bias (after BN folding) hold NaN or infinite values",
    SkipReason.NON_CONSTANT_BIAS: "bias is computed at run time, not a constant",
    SkipReason.UNSUPPORTED_LAYOUT: "only NCHW data with OIHW kernels is rewritten",
    SkipReason.UNKNOWN_SHAPE: "the output shape could not be inferred",
    SkipReason.NO_MAC_REDUCTION: "at this rank r*(kh*kw+N) >= N*kh*kw: the rewrite would not cut MACs",
    SkipReason.KEPT_BY_ALLOCATION: "the rank allocation (--macs-ratio / --max-error) kept it",
    SkipReason.FACTORIZATION_OFF: "--no-factorize: the model is compiled as given",
    SkipReason.NO_TORCH_MODULE: "dwsep_compiler.torch: no zero-padded nn.Conv2d module to "
                                "replace (a functional conv, or another padding mode)",
}


@dataclass
class ConvSpec:
    """What a pass knows about one convolution."""

    name: str
    weight: np.ndarray | None  # [N, M/group, *kernel] when constant
    weight_shape: tuple[int, ...] | None
    weight_dtype: str | None
    groups: int
    strides: tuple[int, ...]
    has_bias: bool
    bias_constant: bool = True
    bias_finite: bool = True  # no NaN/Inf in the (BN-folded) bias
    batch: int | None = None
    out_spatial: tuple[int, ...] | None = None
    layout_ok: bool = True


@dataclass
class ConvPlan:
    report: LayerReport
    depthwise: np.ndarray | None = None  # [M*r, 1, kh, kw]
    pointwise: np.ndarray | None = None  # [N, M*r, 1, 1]


def _refusal(spec: ConvSpec, skip: set[str]) -> SkipReason | None:
    """The first reason this conv may not be rewritten, or None."""
    if spec.name in skip:
        return SkipReason.SKIPPED_BY_USER
    if spec.weight_shape is None:
        return SkipReason.NON_CONSTANT_WEIGHTS
    if len(spec.weight_shape) != 4:
        return SkipReason.NOT_2D
    if spec.groups != 1:
        return SkipReason.GROUPED
    if all(k == 1 for k in spec.weight_shape[2:]):
        return SkipReason.POINTWISE
    if not spec.layout_ok:
        return SkipReason.UNSUPPORTED_LAYOUT
    if spec.weight is None:
        return SkipReason.NON_CONSTANT_WEIGHTS
    if spec.weight_dtype != "float32":
        return SkipReason.NON_FLOAT32
    if not spec.bias_finite or not np.all(np.isfinite(spec.weight)):
        return SkipReason.NON_FINITE
    if spec.has_bias and not spec.bias_constant:
        return SkipReason.NON_CONSTANT_BIAS
    if spec.batch is None or spec.out_spatial is None:
        return SkipReason.UNKNOWN_SHAPE
    return None


def plan_conv(spec: ConvSpec, policy: RankPolicy, skip: set[str] | frozenset = frozenset(),
              rank: int | None = None) -> ConvPlan:
    """Decide one conv: a skipped report entry, or the factors at the chosen rank.

    ``rank`` overrides ``policy`` for this layer (used by per-layer rank allocation); rank 0
    means the allocation keeps the original conv.
    """
    reason = _refusal(spec, set(skip))
    shape = spec.weight_shape
    n, m_per_group = (shape[0], shape[1]) if shape else (None, None)
    kernel = tuple(shape[2:]) if shape else None
    known = spec.batch is not None and spec.out_spatial is not None and shape is not None
    macs_before = (macs.conv_macs(spec.batch, n, m_per_group, kernel, spec.out_spatial)
                   if known else 0)
    params_before = macs.conv_params(n, m_per_group, kernel, spec.has_bias) if shape else 0

    def skipped(why: SkipReason, chosen: int | None = None, error: float | None = None):
        return ConvPlan(LayerReport(
            name=spec.name, status="skipped", reason=why.value,
            in_channels=(m_per_group * spec.groups) if shape else None, out_channels=n,
            kernel=list(kernel) if kernel else None, stride=list(spec.strides), rank=chosen,
            macs_before=macs_before, macs_after=macs_before, params_before=params_before,
            params_after=params_before, weight_rel_error=error, detail=DETAILS[why]))

    if reason is not None:
        return skipped(reason)
    if policy.off:
        return skipped(SkipReason.FACTORIZATION_OFF)
    if rank == 0:
        return skipped(SkipReason.KEPT_BY_ALLOCATION)
    svd = lowrank.channel_svd(spec.weight)
    chosen = policy.choose(svd) if rank is None else min(rank, svd.max_rank)
    if not policy.force and not macs.reduces_macs(n, kernel, rank=chosen):
        return skipped(SkipReason.NO_MAC_REDUCTION, chosen, lowrank.relative_error(svd, chosen))
    depthwise, pointwise = lowrank.factorize_kernel(spec.weight, chosen, svd)
    report = LayerReport(
        name=spec.name, status="factorized", reason=None, in_channels=m_per_group,
        out_channels=n, kernel=list(kernel), stride=list(spec.strides), rank=chosen,
        macs_before=macs_before,
        macs_after=macs.factorized_macs(spec.batch, n, m_per_group, kernel, spec.out_spatial,
                                        rank=chosen),
        params_before=params_before,
        params_after=macs.factorized_params(n, m_per_group, kernel, spec.has_bias, rank=chosen),
        weight_rel_error=lowrank.relative_error(svd, chosen))
    return ConvPlan(report, depthwise, pointwise)
