"""Apply schedule rules to every PrimFunc of a module (the default, untuned schedules).

Like dlight's `ApplyDefaultSchedule`, except that a rule which raises while scheduling a
PrimFunc it claimed falls through to the next rule instead of failing the build (recorded in
``failures``, reported on stderr with DWSEP_DEBUG=1), so the fallback rule always gets its
chance; and that, given tuning records (`dwsep_compiler.tuning.TuningRecords`), a PrimFunc
measured on this target gets its best recorded schedule instead (reported as ``tuned``).
"""

from __future__ import annotations

import os
import sys

import tvm
from tvm import tirx
from tvm.target import Target


def first_rule(rules, func: tirx.PrimFunc, target: Target, name: str = "",
               failures: dict[str, str] | None = None):
    """``(rule, schedule)`` of the first rule that schedules ``func`` untuned, or None. A rule
    that raises falls through to the next; the error is recorded in ``failures`` (PrimFunc name
    -> "Rule: first line") and reported on stderr with DWSEP_DEBUG=1."""
    for rule in rules:
        try:
            sch = rule.apply(func, target, False)
        except Exception as exc:  # a rule's bug must not fail the build
            first = (str(exc).strip().splitlines() or [""])[0]
            message = f"{type(rule).__name__}: {type(exc).__name__}: {first}"
            if failures is not None:
                failures[name] = message
            if os.environ.get("DWSEP_DEBUG"):
                print(f"dwsep: rule failed on {name}: {message}", file=sys.stderr)
            continue
        if sch is not None:
            return rule, sch
    return None


@tvm.transform.module_pass(opt_level=0, name="ApplyScheduleRules")
class ApplyScheduleRules:
    def __init__(self, rules, records=None):
        self.rules = list(rules)
        self.records = records
        self.applied: dict[str, str] = {}  # PrimFunc name -> rule name ("tuned": from records)
        self.failures: dict[str, str] = {}  # PrimFunc name -> the error of a rule that raised

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            target = func.attrs.get("target") or Target.current(allow_none=False)
            if self.records is not None:
                sch = self.records.schedule(func, target)
                if sch is not None:
                    updates[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                    self.applied[gvar.name_hint] = "tuned"
                    continue
            claimed = first_rule(self.rules, func, target, gvar.name_hint, self.failures)
            if claimed is not None:
                updates[gvar] = claimed[1].mod["main"].with_attr("tirx.is_scheduled", True)
                self.applied[gvar.name_hint] = type(claimed[0]).__name__
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod
