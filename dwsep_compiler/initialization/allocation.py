"""How ranks are spread across layers: a MAC budget (`allocate_ranks`) or a per-layer error
bound (`ranks_within_error`), from each layer's error-vs-rank curve.

A curve lists, for every rank that cuts MACs, the layer's MACs and its relative error: the
relative output error on calibration data after the least-squares refit when calibration is
given, else the relative weight error of the truncated SVD (`svd_curve`). Keeping the original
conv (rank ``None``) is always an option: its error is 0 and its MACs are the original ones.
Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from dwsep_compiler import macs as mac_count
from dwsep_compiler.initialization import lowrank


@dataclass(frozen=True)
class RankOption:
    rank: int | None  # None: keep the original convolution
    macs: int
    error: float  # relative error (output on calibration data, or weight)


@dataclass
class RankCurve:
    """One layer's options, cheapest first; the last one is always the original conv."""

    name: str
    macs_before: int
    options: list[RankOption]
    # When the options' errors are model-output errors (`sensitivity`): the layer's own relative
    # output error by rank, and the ranks whose model-output error was measured (not interpolated).
    layer_errors: dict[int, float] | None = None
    measured: dict[int, float] | None = None

    @classmethod
    def build(cls, name: str, macs_before: int, points: list[tuple[int, int, float]]):
        options = [RankOption(r, m, e) for r, m, e in sorted(points) if m < macs_before]
        options.append(RankOption(None, macs_before, 0.0))
        return cls(name, macs_before, options)


def useful_ranks(out_channels: int, kernel: tuple[int, ...]) -> list[int]:
    """The ranks at which the rewrite cuts MACs (``r * (taps + N) < N * taps``)."""
    ranks, r = [], 1
    while mac_count.reduces_macs(out_channels, kernel, rank=r):
        ranks.append(r)
        r += 1
    return ranks


def svd_curve(name: str, weight, batch: int, out_spatial: tuple[int, ...]) -> RankCurve:
    """The data-free curve: relative weight error of the truncated per-channel SVD."""
    n, m, *kernel = weight.shape
    kernel = tuple(kernel)
    svd = lowrank.channel_svd(weight)
    before = mac_count.conv_macs(batch, n, m, kernel, out_spatial)
    points = [(r, mac_count.factorized_macs(batch, n, m, kernel, out_spatial, rank=r),
               lowrank.relative_error(svd, r)) for r in useful_ranks(n, kernel)]
    return RankCurve.build(name, before, points)


def cheapest_macs(curves: list[RankCurve]) -> int:
    return sum(curve.options[0].macs for curve in curves)


def allocate_ranks(curves: list[RankCurve], budget: int) -> dict[str, int | None]:
    """Ranks whose total MACs fit ``budget`` (the MACs of these layers only) with a small sum of
    squared relative errors: start every layer at its cheapest option, then repeatedly take the
    upgrade (to any richer option of one layer) with the largest error reduction per added MAC
    that still fits. Raises ValueError when even the cheapest options exceed the budget."""
    if cheapest_macs(curves) > budget:
        raise ValueError(f"even rank 1 everywhere needs {cheapest_macs(curves)} MACs "
                         f"> budget {budget}")
    chosen = {curve.name: 0 for curve in curves}
    total = cheapest_macs(curves)
    while True:
        best = None
        for curve in curves:
            here = curve.options[chosen[curve.name]]
            for index in range(chosen[curve.name] + 1, len(curve.options)):
                there = curve.options[index]
                added = there.macs - here.macs
                gain = here.error ** 2 - there.error ** 2
                if added <= 0 or gain <= 0 or total + added > budget:
                    continue
                score = gain / added
                if best is None or score > best[0]:
                    best = (score, curve.name, index, added)
        if best is None:
            break
        _, name, index, added = best
        chosen[name] = index
        total += added
    by_name = {curve.name: curve for curve in curves}
    return {name: by_name[name].options[index].rank for name, index in chosen.items()}


def ranks_within_error(curves: list[RankCurve], max_error: float) -> dict[str, int | None]:
    """Per layer, the cheapest option whose relative error is at most ``max_error`` (the
    original conv when no MAC-saving rank reaches it)."""
    return {curve.name: next(o.rank for o in curve.options if o.error <= max_error)
            for curve in curves}
