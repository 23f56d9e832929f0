"""How MetaSchedule walks a rule's space: every point once, nearest the best measured first.

A rule's space is a handful of categorical knobs (`schedules.analysis.knob`), a few dozen
points in all. MetaSchedule's evolutionary search is built for the generic space of millions:
it samples at random, has no mutator for categorical knobs, and does not know which points the
records already hold, so a resumed run measured the same points again (measured: all 35 trials
of a resumed run were repeats). `SpaceWalk` is a MetaSchedule search strategy instead:

* it enumerates the space (the product of the knobs' choices) and drops every point that the
  records hold for this target, so a run after a crash or kill -9 continues where it stopped;
* it measures the unmeasured points nearest (fewest knobs changed) to the fastest point
  measured so far first, a hill climb that ends as an exhaustive search.
"""

from __future__ import annotations

import itertools

from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from dwsep_compiler.tuning.records import FAILED, mean, measured

# Larger spaces (none of the rules has one today) are walked in their first this-many points.
MAX_POINTS = 4096
KNOB = "SampleCategorical"


def knobs(trace: s_tir.Trace) -> list:
    return [inst for inst in trace.insts if inst.kind.name == KNOB]


def point(trace: s_tir.Trace) -> tuple[int, ...]:
    """The knob decisions of a trace, in instruction order."""
    decisions = trace.decisions
    return tuple(int(decisions[inst]) for inst in knobs(trace))


@derived_object
class SpaceWalk(ms.search_strategy.PySearchStrategy):
    def __init__(self) -> None:
        self.mod = None
        self.target = None

    def _initialize_with_tune_context(self, context) -> None:
        self.mod = context.mod
        self.target = context.target

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None,
                   cost_model=None) -> None:
        self.trace = design_spaces[0].trace
        self.knobs = knobs(self.trace)
        sizes = [len(inst.attrs[0]) for inst in self.knobs]
        self.batch = num_trials_per_iter
        self.left = max_trials
        self.best: tuple[tuple[int, ...], float] | None = None
        seen = set()
        for record in ([] if database is None else measured(database, self.mod, self.target)):
            if len(knobs(record.trace)) != len(self.knobs):
                continue  # recorded by an older version of the rule: a different space
            where = point(record.trace)
            seen.add(where)
            seconds = mean(record.run_secs)
            if self.best is None or seconds < self.best[1]:
                self.best = (where, seconds)
        points = itertools.islice(itertools.product(*[range(n) for n in sizes]), MAX_POINTS)
        self.todo = [p for p in points if p not in seen]
        self.pending: list[tuple[int, ...]] = []

    def generate_measure_candidates(self):
        if self.left <= 0 or not self.todo:
            return None
        if self.best is not None:
            anchor = self.best[0]
            self.todo.sort(key=lambda p: sum(a != b for a, b in zip(p, anchor)))
        candidates, self.pending = [], []
        while self.todo and len(candidates) < min(self.batch, self.left):
            where = self.todo.pop(0)
            trace = self.trace
            for inst, decision in zip(self.knobs, where):
                trace = trace.with_decision(inst, decision, remove_postproc=True)
            sch = s_tir.Schedule(self.mod)
            try:
                trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception:  # noqa: BLE001 - a point the rule's primitives reject: skip it
                continue
            candidates.append(ms.MeasureCandidate(
                sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
            self.pending.append(where)
        return candidates or None

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.left -= len(results)
        for where, result in zip(self.pending, results):
            if result.error_msg or not result.run_secs:
                continue
            seconds = mean(result.run_secs)
            if seconds < FAILED and (self.best is None or seconds < self.best[1]):
                self.best = (where, seconds)

    def post_tuning(self) -> None:
        pass

    def clone(self):
        return SpaceWalk()

