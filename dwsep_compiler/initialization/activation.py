"""Piecewise-linear activations, as the post-activation fit needs them: pure numpy, no ONNX.

A conv followed by ReLU only has to match its teacher where the activation lets the difference
through: a pixel whose teacher and approximation are both negative costs nothing after the ReLU,
however far apart they are. Fitting the pre-activation output spends the layer's few parameters
on those pixels too (and a SiLU's or sigmoid's flat tail forgives much of an error there).
`Activation` describes ReLU, LeakyReLU, PReLU (per-channel slopes) and Clip (ReLU6) by their
linear segments, and Sigmoid, Tanh and SiLU by their function: all the relaxed fit
(`relaxed_target`) needs.

The relaxation is Zhang, Zou, He and Sun's ("Accelerating Very Deep Convolutional Networks for
Classification and Detection", TPAMI 2016): minimize over the layer and auxiliary targets ``z``

    ||act(teacher) - act(z)||^2 + penalty * ||z - y||^2,      y = the layer's linear output

alternating a linear least-squares fit of the layer toward ``z`` with the closed-form per-element
minimizer of ``z`` (this module), the penalty growing so that ``z`` ends at ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Segment:
    """``act(y) = slope * y + intercept`` for ``low <= y <= high``; ``slope`` may be a per-channel
    vector (broadcast over the last axis of ``[pixels, channels]`` arrays)."""

    low: float
    high: float
    slope: float | np.ndarray
    intercept: float = 0.0


LINE_SEARCH_POINTS = 9  # candidates between y and the teacher for a smooth activation's z


def _sigmoid(y):
    return 0.5 * (1.0 + np.tanh(0.5 * y))  # no overflow for large |y|


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: piecewise linear (``segments`` in increasing order of ``y``,
    ReLU-like: ``z`` in closed form) or smooth (``function``: Sigmoid, Tanh, SiLU; ``z`` by a
    line search between the layer's output and the teacher)."""

    name: str
    segments: tuple[Segment, ...] = ()
    function: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def relu(cls) -> "Activation":
        return cls("Relu", (Segment(-np.inf, 0.0, 0.0), Segment(0.0, np.inf, 1.0)))

    @classmethod
    def leaky_relu(cls, alpha) -> "Activation":
        """LeakyRelu (scalar ``alpha``) and PRelu (``alpha`` per channel)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        if np.any(alpha < 0):  # not monotonic: the segment minimizers below assume it is
            raise ValueError("a negative leaky slope is not supported")
        slope = float(alpha) if alpha.ndim == 0 else alpha
        return cls("LeakyRelu", (Segment(-np.inf, 0.0, slope), Segment(0.0, np.inf, 1.0)))

    @classmethod
    def clip(cls, low: float, high: float) -> "Activation":
        """Clip / ReLU6; an infinite bound drops its flat segment."""
        if not low < high:
            raise ValueError(f"clip bounds must satisfy low < high, got {low}, {high}")
        segments = []
        if np.isfinite(low):
            segments.append(Segment(-np.inf, low, 0.0, low))
        segments.append(Segment(low, high, 1.0))
        if np.isfinite(high):
            segments.append(Segment(high, np.inf, 0.0, high))
        return cls("Clip", tuple(segments))

    @classmethod
    def smooth(cls, name: str) -> "Activation":
        """``Sigmoid``, ``Tanh`` or ``Silu`` (``x * sigmoid(x)``, a.k.a. swish)."""
        functions = {"Sigmoid": _sigmoid, "Tanh": np.tanh, "Silu": lambda y: y * _sigmoid(y)}
        if name not in functions:
            raise ValueError(f"no smooth activation {name!r}")
        return cls(name, function=functions[name])

    def __call__(self, y: np.ndarray) -> np.ndarray:
        if self.function is not None:
            return self.function(y).astype(y.dtype, copy=False)
        out = np.empty_like(y)
        for segment in self.segments:
            inside = (y >= segment.low) & (y <= segment.high)
            value = np.broadcast_to(segment.slope * y + segment.intercept, y.shape)
            out[inside] = value[inside]
        return out

    def relaxed_target(self, teacher: np.ndarray, linear: np.ndarray,
                       penalty: float) -> np.ndarray:
        """Per element, ``argmin_z (act(teacher) - act(z))^2 + penalty * (z - linear)^2``:
        ``teacher`` is the teacher's pre-activation output, ``linear`` the layer's current one.

        Piecewise linear: on each segment the objective is a parabola in ``z``, minimized in
        closed form and clamped into the segment; the best segment wins (exact). Smooth: the
        best of `LINE_SEARCH_POINTS` points from ``linear`` to ``teacher`` (for a monotonic
        activation the minimizer lies between them: ``z = teacher`` zeroes the first term)."""
        target = self(teacher)
        if self.function is not None:
            return self._line_search(target, teacher, linear, penalty)
        best = best_cost = None
        for segment in self.segments:
            slope = np.broadcast_to(np.asarray(segment.slope, dtype=linear.dtype), linear.shape)
            z = (slope * (target - segment.intercept) + penalty * linear) / (slope ** 2 + penalty)
            z = np.clip(z, segment.low, segment.high)
            cost = (target - slope * z - segment.intercept) ** 2 + penalty * (z - linear) ** 2
            if best is None:
                best, best_cost = z, cost
            else:
                better = cost < best_cost
                best = np.where(better, z, best)
                best_cost = np.where(better, cost, best_cost)
        return best

    def _line_search(self, target: np.ndarray, teacher: np.ndarray, linear: np.ndarray,
                     penalty: float) -> np.ndarray:
        """The smooth case of `relaxed_target`: ``z = linear + s * (teacher - linear)`` at the
        best step ``s`` of `LINE_SEARCH_POINTS`. Tracks the best step, not the best ``z``, and
        writes in place: the search ran on every element of a layer's pixel sample six times
        per layer, and its temporaries took a fifth of a detector's calibration."""
        gap = teacher - linear
        gap_squared = np.square(gap)
        best_cost = np.square(target - self(linear))
        best_step = np.zeros_like(linear)
        for step in np.linspace(0.0, 1.0, LINE_SEARCH_POINTS)[1:].tolist():  # Python floats:
            z = linear + step * gap  # the arrays keep their dtype (float32)
            cost = self(z)
            np.subtract(target, cost, out=cost)
            np.square(cost, out=cost)
            cost += (penalty * step * step) * gap_squared  # penalty * (z - linear)^2
            better = cost < best_cost
            shift = step - best_step  # best_step = step where better, by arithmetic: a
            shift *= better  # masked copy is three times slower on large arrays
            best_step += shift
            np.minimum(best_cost, cost, out=best_cost)
        return linear + best_step * gap
