"""The rank allocation as a picture: each layer's MACs against its error, rank by rank, with
the rank the allocation chose marked (``dwsep-compile --plot FILE.png``).

Drawn from the report alone: the allocation records each layer's error by rank
(``rank_allocation.curves``: output errors on calibration data, or SVD weight errors), and a rank's MACs follow from the layer's shape, ``r * (kh*kw + N)`` per
input channel and pixel against ``N * kh*kw`` for the original conv (`macs`). Needs matplotlib (the
``plot`` extra).
"""

from __future__ import annotations

import os
import tempfile

from dwsep_compiler import macs
from dwsep_compiler.errors import DwsepError
from dwsep_compiler.report import Report


def allocation_curves(report: Report) -> tuple[dict[str, dict[int, float]], str]:
    """Per layer, its error by rank, and what the error is; a `DwsepError` when the report
    has no allocation (a fixed rank or energy prices no alternatives)."""
    allocation = report.rank_allocation
    if not allocation or not allocation.get("curves"):
        raise DwsepError("--plot draws the rank allocation's curves: give --macs-ratio or "
                         "--max-error")
    curves = {name: {int(rank): error for rank, error in errors.items()}
              for name, errors in allocation["curves"].items()}
    return curves, allocation.get("error", "error")


def macs_fraction(layer, rank: int) -> float:
    """The factorized layer's MACs at ``rank`` over the original conv's (per pixel: the ratio
    does not depend on the map size)."""
    kernel = tuple(layer.kernel)
    return (macs.factorized_macs(1, layer.out_channels, layer.in_channels, kernel, (1, 1),
                                 rank=rank)
            / macs.conv_macs(1, layer.out_channels, layer.in_channels, kernel, (1, 1)))


def allocation_plot(report: Report, path: str) -> None:
    """Write the plot to ``path`` (PNG), atomically."""
    curves, source = allocation_curves(report)
    try:
        import matplotlib
    except ImportError:
        raise DwsepError("--plot needs matplotlib: pip install 'dwsep-compiler[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    layers = {layer.name: layer for layer in report.layers}
    # the original conv has no error: drawn at the foot of the plot, log scale
    floor = min((e for errors in curves.values() for e in errors.values() if e > 0),
                default=1e-3) / 2
    figure, axes = pyplot.subplots(figsize=(8, 5.5), dpi=110)
    for index, (name, errors) in enumerate(sorted(curves.items())):
        layer, color = layers[name], f"C{index % 10}"
        points = sorted((macs_fraction(layer, rank), max(error, floor), rank)
                        for rank, error in errors.items())
        axes.plot([p[0] for p in points], [p[1] for p in points], "-o", color=color,
                  markersize=3, linewidth=1, label=name if len(curves) <= 12 else None)
        chosen = [p for p in points if p[2] == layer.rank and layer.factorized]
        if chosen:
            axes.plot(chosen[0][0], chosen[0][1], "*", color=color, markersize=13,
                      markeredgecolor="black")
        else:  # kept: the original conv, all its MACs and no error
            axes.plot(1.0, floor, "s", color=color, markersize=7, markeredgecolor="black")
    totals = report.totals()
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("layer MACs / original conv's")
    axes.set_ylabel(source)
    axes.set_title(f"{os.path.basename(report.model)}: {report.rank_policy.split(' (')[0]}, "
                   f"conv MACs x{totals['conv_macs_ratio']:.3f}  "
                   "(star: chosen rank; square: kept)", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    if len(curves) <= 12:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    handle, partial = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(handle)
    try:
        figure.savefig(partial, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # mkstemp's file is private: give it a plain file's mode
        os.replace(partial, path)
    except BaseException:
        os.remove(partial)
        raise
    finally:
        pyplot.close(figure)
