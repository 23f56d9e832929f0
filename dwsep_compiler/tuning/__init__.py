"""Tune: per-device autotuning of the schedule rules' search spaces with TVM MetaSchedule.

Data flow: the Relax module is legalized exactly as the compiler does it (`tasks`); every
PrimFunc that a tunable rule of `dwsep_compiler.schedules` claims is a task, deduplicated by
structure across layers and models; MetaSchedule searches the rule's ``tunable=True`` space
(`space`), building here and measuring locally or on devices behind a TVM RPC tracker
(`measure`); every measurement goes into a MetaSchedule JSON database (`records`), which later
compiles apply without tuning. `tune.tune_module` ties them together.
"""

from dwsep_compiler.tuning import gating
from dwsep_compiler.tuning.records import TuningRecords
from dwsep_compiler.tuning.tune import TuneOptions, TuneSummary, check, tune_module

__all__ = ["TuneOptions", "TuneSummary", "TuningRecords", "check", "gating", "tune_module"]
