"""A task's search space: its schedule rule applied with ``tunable=True``.

The rule samples its knobs (`schedules.analysis.knob`: ``sample_categorical``); MetaSchedule
replays the rule's trace with other decisions. No generic schedule rules, postprocessors or
mutators are added: the space is exactly the rule's, and small (tens of points per task), which
`search.SpaceWalk` walks point by point.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import meta_schedule as ms


def space_generator(rule, target: tvm.target.Target) -> ms.space_generator.ScheduleFn:
    def design_space(sch):
        space = rule.apply(sch.mod["main"], target, True)
        if space is None:  # cannot happen for a task the rule claimed; say so if it does
            raise RuntimeError(f"{type(rule).__name__} no longer claims its task")
        return [space]

    return ms.space_generator.ScheduleFn(design_space, sch_rules=[], postprocs=[],
                                         mutator_probs={})
