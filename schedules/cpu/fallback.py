"""Everything else on CPUs (elementwise, pooling, softmax, reshapes, layout copies).

Injective chains are inlined into their last block; each remaining block's leading spatial loops
are fused and spread over the cores, and an innermost spatial loop of an injective block is
vectorized. Each step is applied only when TVM accepts it, so the rule never fails a PrimFunc.
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
        inner = spatial[-1] if injective and len(spatial) > 1 else None
        outer = spatial[:-1] if inner is not None else spatial
        if work >= _MIN_PARALLEL_WORK:
            _try(sch.parallel, sch.fuse(*outer) if len(outer) > 1 else outer[0])
        if inner is not None:
            extent = int(sch.get(inner).extent)
            if extent >= knobs.lanes and extent % knobs.lanes == 0:
                _try(sch.vectorize, sch.split(inner, [None, knobs.lanes])[1])


def _try(primitive, *args) -> bool:
    try:
        primitive(*args)
        return True
    except Exception:
        return False
