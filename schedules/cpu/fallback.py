"""Everything else on CPUs (elementwise, pooling, softmax, reshapes, layout copies).

Injective chains are inlined into their last block; each remaining block's leading spatial loops
are fused and spread over the cores, and an innermost spatial loop of an injective block is
vectorized. Each step is applied only when TVM accepts it, so the rule never fails a PrimFunc.

On NEON an injective block whose rows are no whole vectors (15, 31, 7 columns: SqueezeNet's
channel concats) and whose every buffer is indexed by the block's own two innermost
iterators runs each plane as one flat loop, vectors and a scalar tail: the rows of a plane are
contiguous in all its buffers. LLVM left the 15-wide rows scalar (fewer iterations than its
vectorizer's minimum). Emulated Cortex-A76: a 2 x 64 x 15 x 15 concat 2.04 -> 1.04 instructions
per element; light_squeezenet at 64 px 5.46M -> 5.18M instructions per inference.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import iter_kinds, output_dtype
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

_MIN_PARALLEL_WORK = 4096  # iterations below which threads cost more than they give


class Fallback(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        knobs = cpu_knobs(target, output_dtype(func))
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
        for block in blocks[:-1]:
            if "R" not in iter_kinds(sch, block):
                _try(sch.compute_inline, block)
        for block in sch.get_child_blocks(root):
            self._schedule_block(sch, block, knobs)
        return sch

    def _schedule_block(self, sch, block, knobs):
        loops = sch.get_loops(block)
        kinds = iter_kinds(sch, block)
        if not loops or len(loops) != len(kinds):
            return  # loops do not map 1:1 onto block iters: leave the block as it is
        spatial = []
        for loop, kind in zip(loops, kinds):
            if kind != "S":
                break
            spatial.append(loop)
        if not spatial:
            return
        work = 1
        for loop in loops:
            work *= int(sch.get(loop).extent)
        injective = "R" not in kinds
        flat = (injective and knobs.lanes <= 4 and len(spatial) == len(loops) > 2  # NEON
                and int(sch.get(loops[-1]).extent) % knobs.lanes and _planes_contiguous(sch, block))
        if flat:
            spatial = spatial[:-2] + [sch.fuse(*spatial[-2:])]
        inner = spatial[-1] if injective and len(spatial) > 1 else None
        outer = spatial[:-1] if inner is not None else spatial
        if work >= _MIN_PARALLEL_WORK:
            _try(sch.parallel, sch.fuse(*outer) if len(outer) > 1 else outer[0])
        if inner is not None:
            extent = int(sch.get(inner).extent)
            if extent >= knobs.lanes and extent % knobs.lanes == 0:
                _try(sch.vectorize, sch.split(inner, [None, knobs.lanes])[1])
            elif flat and extent > knobs.lanes:  # whole vectors, then the scalar tail
                try:
                    body, _ = sch.loop_partition(inner, [extent - extent % knobs.lanes, None])
                except Exception:
                    return
                _try(sch.vectorize, sch.split(body, [None, knobs.lanes])[1])


def _planes_contiguous(sch, block) -> bool:
    """Does every buffer the block reads or writes take its last two indices from the block's
    last two iterators, over its whole last two dimensions (or one broadcast element there)?
    Then a plane is contiguous in each buffer and may run as one flat loop."""
    stmt = sch.get(block)
    ys, xs = stmt.iter_vars[-2:]
    plane = [int(ys.dom.extent), int(xs.dom.extent)]
    for region in list(stmt.reads) + list(stmt.writes):
        if len(region.region) < 2:
            return False
        shape = [int(d) for d in region.source.shape[-2:]]
        last = region.region[-2:]
        if shape == [1, 1]:
            continue
        if (shape != plane or not last[0].min.same_as(ys.var) or not last[1].min.same_as(xs.var)
                or any(int(r.extent) != 1 for r in last)):
            return False
    return True


def _try(primitive, *args) -> bool:
    try:
        primitive(*args)
        return True
    except Exception:
        return False
