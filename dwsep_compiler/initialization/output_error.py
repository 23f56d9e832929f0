"""How far a model's outputs are from the original's: one measure for the rank allocation's
probe (`sensitivity`) and the end-to-end stage's output loss (`finetune`).

A model output often packs quantities of very different scale side by side: a YOLOX-style
detector's ``[N, anchors, 5 + classes]`` holds box offsets and log-sizes (mean |x| ~0.5-1.6 on
every anchor) next to the objectness score (mean ~0.006: near 0 on the background anchors). A
relative L2 over the whole tensor is then the box regression's error: on ddddocr's detector
factorized at 0.33x, the whole output was 7.7% off while the objectness, which decides what is
detected, was 51% off (0.08% of the output's energy). So the error is taken per *feature*
(a slice along the feature axis: channels of a 4-D NCHW output, the last axis of a 2-3-D one:
classifier logits ``[N, K]``, detector heads ``[N, anchors, 5 + K]``, sequence outputs
``[T, N, K]``), each relative to its own energy, and averaged over features. A feature quieter
than ``QUIET`` times the average is priced as if it had that energy, so that a near-empty
column (a softmax class never predicted) does not turn noise into a large error. Where all
features have similar energy (logits) this is the plain relative error.

Works on numpy arrays and torch tensors alike (only ``sum``, ``mean`` and ``clip`` are used),
so the math exists once.
"""

from __future__ import annotations

QUIET = 1e-3


def feature_axis(ndim: int) -> int | None:
    """The feature axis of an ``ndim``-D output: 1 for NCHW-like 4-D and higher, the last for
    2-3-D, none for a scalar or a vector (one feature)."""
    if ndim <= 1:
        return None
    return 1 if ndim >= 4 else ndim - 1


def feature_energies(x):
    """Sum of squares of ``x`` per feature (a vector over the feature axis, or a scalar)."""
    axis = feature_axis(x.ndim)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    return (x * x).sum(axis=axes) if axes else x * x


def mean_squared_relative(diff_energy, reference_energy):
    """Mean over features of ``diff_energy / reference_energy`` (squared relative errors), each
    reference energy raised to at least ``QUIET`` times their mean. 0 for an all-zero
    reference."""
    floor = QUIET * float(reference_energy.mean())
    if floor <= 0.0:
        return 0.0 * diff_energy.mean()
    return (diff_energy / reference_energy.clip(min=floor)).mean()


def squared_relative_error(got, reference):
    """`mean_squared_relative` of one output tensor against its reference (same backend)."""
    return mean_squared_relative(feature_energies(got - reference), feature_energies(reference))
