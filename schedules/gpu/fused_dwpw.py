"""Fused depthwise + pointwise convolution on mobile GPUs (OpenCL): the depthwise output never
reaches global memory.

A work-group owns a strip of ``TP`` output pixels of one output row (``TP`` divides the row
width) and a block of ``ty * co_tile`` output channels. It first computes the depthwise outputs
of ALL ``M*r`` depthwise channels for those pixels into __local memory (``M*r x TP`` floats,
``TP`` chosen so that this stays within the device's local memory: 16 KB on Mali/Adreno; the
padding is a bounds test on the load; each work-item accumulates its taps in a register), then,
after a barrier, each of the ``ty x tx`` work-items computes a ``co_tile x px_tile`` register tile
of the pointwise GEMM reading the depthwise tile from local memory, with the epilogue (bias,
ReLU, clip, residual add) fused on the tile. At most the device's work-group size (256).

When even one pixel's depthwise channels do not fit (``M*r > local memory / 4``: more than 4096
channels on a phone) the depthwise values are computed in registers right where the GEMM reads
them instead (recomputed per channel tile: slower, but correct and within the limits).

Same block detection as the CPU rule (`schedules/cpu/fused_dwpw.py`); pairs up with
`dwsep_compiler.passes.lowering.fuse_dwpw`, which `dwsep_compiler.compile.opencl.relax_pipeline` runs for
every pair. Knob (sampled with ``tunable=True``): ``co_tile`` (the work-group's shape stays
the default's, so any decision replays).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (divisors, fold_bias, fused_dwpw_blocks, knob,
                                               largest_divisor)
from dwsep_compiler.schedules.gpu.knobs import gpu_knobs, is_gpu

MAX_STRIP = 32  # output pixels per work-group (a divisor of the row width)
MIN_THREADS = 64  # work-items per group the default tiles keep where the shape allows


def _pow2_at_least(n: int, limit: int) -> int:
    t = 1
    while t < n and t * 2 <= limit:
        t *= 2
    return t


def _group(pixels, out_channels, px_tile, co_tile, knobs) -> tuple[int, int]:
    """(tx, ty): work-items along the strip's pixels and along output channels."""
    tx = pixels // px_tile
    return tx, _pow2_at_least(-(-out_channels // co_tile), max(1, knobs.max_threads // tx))


def _threads(*args) -> int:
    tx, ty = _group(*args)
    return tx * ty


class FusedDepthwisePointwise(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not is_gpu(target):
            return None
        found = fused_dwpw_blocks(func)
        if found is None:
            return None
        sch, pad, dw, pw, epilogue = found
        knobs = gpu_knobs(target)
        _, out_channels, _, width, dw_channels = (int(sch.get(loop).extent)
                                                  for loop in sch.get_loops(pw))
        fit = knobs.local_memory // (4 * dw_channels)  # pixels whose DW tile fits in local
        strip = largest_divisor(width, min(MAX_STRIP, fit)) if fit >= 1 else None
        pixels = strip or largest_divisor(width, MAX_STRIP)
        px_tiles = divisors(pixels, 4)
        co_tiles = divisors(out_channels, 4)
        # Register tiles as large as possible (4 x 4) while the group keeps >= MIN_THREADS
        # work-items (they also share the depthwise tile's work).
        px_default, co_default = max(px_tiles), max(co_tiles)
        while _threads(pixels, out_channels, px_default, co_default, knobs) < MIN_THREADS:
            if co_default > 1:
                co_default = max(c for c in co_tiles if c < co_default)
            elif px_default > 1:
                px_default = max(p for p in px_tiles if p < px_default)
            else:
                break
        # The work-group's shape (tx x ty) is fixed by the defaults, so a replayed trace keeps
        # matching thread extents; the knob is the channel tile (a smaller one: more groups).
        tx, ty = _group(pixels, out_channels, px_default, co_default, knobs)
        co_tile = knob(sch, tunable, co_default, co_tiles)
        return self._schedule(sch, pad, dw, pw, epilogue, strip is not None, px_default, co_tile,
                              tx, ty)

    def _schedule(self, sch, pad, dw, pw, epilogue, staged, px_tile, co_tile, tx, ty):
        sch.compute_inline(pad)  # a bounds test on each load, no padded copy
        epilogue = fold_bias(sch, pw, epilogue)
        for block in epilogue[:-1]:
            sch.compute_inline(block)
        if epilogue:
            last = epilogue[-1]
            sch.set_scope(pw, 0, "local")
        else:
            last = sch.cache_write(pw, 0, "local")  # pw: the register tile; last: its store

        b, n, y, x, rc = sch.get_loops(pw)
        xo, xt, xp = sch.split(x, [None, tx, px_tile])
        nb, nt, ni = sch.split(n, [None, ty, co_tile])
        sch.reorder(b, y, xo, nb, nt, xt, rc, ni, xp)
        group = sch.fuse(b, y, xo, nb)
        sch.bind(group, "blockIdx.x")
        sch.bind(nt, "threadIdx.y")
        sch.bind(xt, "threadIdx.x")
        sch.unroll(ni)
        sch.unroll(xp)
        sch.reverse_compute_at(last, xt, preserve_unit_loops=True)

        if staged:
            # The DW tile of all channels for the group's pixels in local memory: each work-item
            # accumulates some (channel, pixel) values in a register and stores them there.
            sch.set_scope(dw, 0, "shared")
            store = sch.cache_write(dw, 0, "local")  # dw: in a register; store: to local
            sch.compute_at(store, group, preserve_unit_loops=True)
            sb, sc, sy, sx = sch.get_loops(store)[-4:]
            cs, tyy = sch.split(sc, [None, ty])
            xs, txx = sch.split(sx, [None, tx])  # neighbouring work-items: neighbouring pixels
            sch.reorder(tyy, txx, sb, sy, cs, xs)
            sch.bind(tyy, "threadIdx.y")
            sch.bind(txx, "threadIdx.x")
            sch.compute_at(dw, xs, preserve_unit_loops=True)
        else:
            # Too many DW channels for even one pixel: each DW value in a register where the
            # GEMM reads it.
            sch.set_scope(dw, 0, "local")
            sch.compute_at(dw, rc, preserve_unit_loops=True)
        ry, rx = sch.get_loops(dw)[-2:]
        sch.unroll(ry)
        sch.unroll(rx)
        sch.decompose_reduction(pw, rc)
        sch.decompose_reduction(dw, ry)
        return sch
