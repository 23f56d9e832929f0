"""Pointwise (1x1) convolution on CPUs: a register-blocked GEMM.

NCHW, stride 1, no padding: ``out[n, co, p] = sum_ci W[co, ci] * x[n, ci, p]`` over pixels p.
The micro-kernel keeps a ``co_block x (vectors * lanes)`` tile of outputs in vector registers,
broadcasting one weight and loading one vector of pixels per FMA row; the epilogue (bias, ReLU,
clip, residual add) runs on the tile while it is hot. Pixel tiles x channel tiles are spread over
the cores.

Knobs (tunable): ``co_block``, ``vectors`` (pixel tile = vectors * lanes), ``ci_block``.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import extents, find_conv, inline_epilogue, largest_divisor, vector_tile
from .knobs import cpu_knobs


class Pointwise(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        blocks = find_conv(func, names=("conv2d_nchw",))
        if blocks is None:
            return None
        sch = blocks.sch
        n, co, h, w, ci, kh, kw = extents(sch, blocks.conv)
        if (kh, kw) != (1, 1) or not _unit_stride_no_pad(sch, blocks):
            return None
        knobs = cpu_knobs(target)
        pixels = h * w
        if tunable:
            raise NotImplementedError("tunable pointwise space: see the tuning issue")
        tile, vector = vector_tile(pixels, knobs.lanes, max_vectors=2)
        registers = max(1, -(-tile // knobs.lanes))
        co_block = largest_divisor(co, max(1, knobs.accumulators // registers))
        return self._schedule(blocks, knobs, co_block, tile, vector)

    def _schedule(self, blocks, knobs, co_block: int, tile: int, vector: int):
        sch = blocks.sch
        conv = blocks.conv
        if blocks.pad is not None:
            sch.compute_inline(blocks.pad)
        last = inline_epilogue(blocks)
        _, _, h, w, _, _, _ = extents(sch, conv)
        # One pixel axis: NCHW's H and W are contiguous, so the GEMM's N dimension is H*W.
        sch.transform_block_layout(conv, lambda n, f, y, x, c, ky, kx: (n, f, y * w + x, c, ky, kx))
        if last is not None:
            # The accumulator buffer gets the same flat pixel axis, so that the epilogue's tile
            # is exactly the GEMM tile (the 4-D region would over-approximate it).
            sch.transform_layout(conv, ("write", 0), lambda n, f, y, x: (n, f, y * w + x))
            sch.transform_block_layout(last, lambda n, f, y, x: (n, f, y * w + x))
        nn, ff, pix, rc, ry, rx = sch.get_loops(conv)
        fo, fi = sch.split(ff, [None, co_block])
        po, pi = sch.split(pix, [None, tile])
        pv, pl = sch.split(pi, [None, vector])
        # Pixel tiles outside channel tiles: a tile's input column (all ci) stays in L1 while
        # every output-channel block consumes it.
        sch.reorder(nn, po, fo, rc, ry, rx, fi, pv, pl)
        outer = sch.fuse(nn, po, fo)
        sch.parallel(outer)
        sch.unroll(fi)
        sch.unroll(pv)
        sch.vectorize(pl)
        if last is not None:
            sch.reverse_compute_at(last, outer)
            sch.vectorize(sch.split(sch.get_loops(last)[-1], [None, vector])[1])
        init = sch.decompose_reduction(conv, rc)
        return sch

def _has(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:
        return False


def _unit_stride_no_pad(sch, blocks) -> bool:
    """Output pixels map 1:1 onto input pixels (a 1x1 conv with stride 1 and no padding)."""
    n, co, h, w, ci, kh, kw = extents(sch, blocks.conv)
    source = blocks.pad if blocks.pad is not None else blocks.conv
    data = sch.get(source).reads[0].source
    return [int(d) for d in data.shape[2:]] == [h, w]
