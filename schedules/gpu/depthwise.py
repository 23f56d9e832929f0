"""Depthwise convolution (group = in_channels, depth multiplier r) on mobile GPUs (OpenCL).

One work-item computes a strip of ``strip`` output pixels along W of one output row in private
registers, streaming the kh x kw taps (any stride, dilation and padding: the padding is inlined
as a bounds test on the load, never a padded copy in global memory). The epilogue (bias, ReLU,
clip, ...) runs on the strip in registers, and the strip is stored as ``float4`` when W is a
multiple of 4 (then every strip starts 16-byte aligned). Work-items are spread over
work-groups of ``threads`` (at most the device's work-group size).

Knobs (sampled with ``tunable=True``): ``strip`` and ``threads``. Every combination of the
candidates schedules the same way, so MetaSchedule may replay the trace with any decisions.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import (divisors, extents, find_depthwise, inline_epilogue,
                                               knob)
from dwsep_compiler.schedules.gpu.knobs import gpu_knobs, is_gpu, thread_candidates, threads_for


class Depthwise(ScheduleRule):
    TUNABLE = True  # exposes knobs with tunable=True (dwsep_compiler.tuning searches them)

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not is_gpu(target):
            return None
        found = find_depthwise(func)
        if found is None:
            return None
        blocks, _ = found
        sch = blocks.sch
        n, f, h, w, rc, kh, kw = extents(sch, blocks.conv)
        knobs = gpu_knobs(target)
        if w % knobs.lanes == 0:
            # float4 stores: every candidate strip is whole vectors
            vector = knobs.lanes
            strips = [s for s in (vector, 2 * vector) if w % s == 0]
        else:
            vector = 1
            strips = divisors(w, knobs.lanes)
        default = max(s for s in strips if s <= knobs.lanes)
        threads = threads_for(n * f * h * (w // default), knobs.max_threads)
        strip = knob(sch, tunable, default, strips)
        threads = knob(sch, tunable, threads, thread_candidates(knobs.max_threads))
        return self._schedule(blocks, strip, threads, vector)

    def _schedule(self, blocks, strip, threads, vector: int):
        sch = blocks.sch
        conv = blocks.conv
        if blocks.pad is not None:
            sch.compute_inline(blocks.pad)  # a bounds test on each load, no padded copy
        last = inline_epilogue(blocks)
        if last is None:
            last = sch.cache_write(conv, 0, "local")
        else:
            sch.set_scope(conv, 0, "local")
        nn, ff, yy, xx, rc, ky, kx = sch.get_loops(conv)
        xo, xi = sch.split(xx, [None, strip])
        sch.reorder(nn, ff, yy, xo, rc, ky, kx, xi)
        items = sch.fuse(nn, ff, yy, xo)
        group, thread = sch.split(items, [None, threads])
        sch.bind(group, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
        sch.unroll(ky)
        sch.unroll(kx)
        sch.unroll(xi)
        sch.reverse_compute_at(last, thread, preserve_unit_loops=True)
        inner = sch.get_loops(last)[-1]
        if vector > 1:
            sch.vectorize(sch.split(inner, [None, vector])[1])
        else:
            sch.unroll(inner)
        sch.decompose_reduction(conv, rc)
        return sch
