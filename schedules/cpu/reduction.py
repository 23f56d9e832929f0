"""Single reductions on CPUs (pooling to a vector, mean, sum): dlight's CPU reduction rule.

Only PrimFuncs with exactly one reduction block are taken. Chains of reductions over the same
row (softmax: max -> exp -> sum -> divide; layer norm) are left to the fallback rule, which
schedules each stage as its own loop nest: dlight's rule computes every stage of the chain at
each output element, O(n^2) per row (measured: a 1000-class softmax 4.5 ms, against 7 us for
the fallback's stage-by-stage loops).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import iter_kinds


class Reduction(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if sum("R" in iter_kinds(sch, block) for block in blocks) != 1:
            return None
        try:
            return dlight.cpu.Reduction().apply(func, target, tunable)
        except s_tir.ScheduleError:
            # dlight's rule cannot place every block (Inception's average pool fused with an
            # inference dropout that also writes its mask: compute-at fails): not ours to take,
            # the fallback schedules it stage by stage.
            return None
