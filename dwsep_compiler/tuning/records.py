"""Tuning records: a MetaSchedule JSON database in a directory, safe to reuse after a crash.

``DIR/database_workload.json`` and ``DIR/database_tuning_record.json`` are MetaSchedule's own
files (one JSON document per line, appended as measurements arrive), so TVM's tools read them
too. A process killed mid-append (kill -9, power loss) can leave a torn last line, which TVM's
reader refuses; opening repairs that first by dropping lines that are not complete JSON (the
file is rewritten atomically), so a later run resumes with every complete record.
"""

from __future__ import annotations

import json
import os
import tempfile

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from dwsep_compiler.errors import DwsepError, first_line

from dwsep_compiler.tuning.tasks import workload

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
FAILED = 1e9  # MetaSchedule stores failed measurements as 1e10 s


def repair(path: str) -> int:
    """Drop the lines of a JSON-lines file that do not parse; returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    good = []
    for line in lines:
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            continue
        good.append(line)
    dropped = sum(1 for line in lines if line.strip()) - len(good)
    if dropped:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".repair-")
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(line + b"\n" for line in good))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class TuningRecords:
    """The database in ``directory`` (created when missing)."""

    def __init__(self, directory: str | os.PathLike[str], create: bool = True) -> None:
        self.directory = os.fspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise DwsepError(f"tuning records: {self.directory} is not a directory")
        if not os.path.isdir(self.directory):
            if not create:
                raise DwsepError(f"tuning records: no such directory: {self.directory}")
            os.makedirs(self.directory)
        self.dropped = sum(repair(os.path.join(self.directory, name))
                           for name in (WORKLOADS, RECORDS))
        try:
            self.database = ms.database.JSONDatabase(
                path_workload=os.path.join(self.directory, WORKLOADS),
                path_tuning_record=os.path.join(self.directory, RECORDS),
                allow_missing=True, module_equality="structural")
        except Exception as exc:
            raise DwsepError(f"tuning records in {self.directory} are unreadable: "
                             f"{first_line(exc)}") from None

    def __len__(self) -> int:
        return len(self.database)

    def records(self, func: tirx.PrimFunc, target: tvm.target.Target) -> list:
        """This target's successful records of ``func``, fastest first."""
        return measured(self.database, workload(func), target)

    def trials(self, func: tirx.PrimFunc, target: tvm.target.Target) -> int:
        return len(self.records(func, target))

    def latency(self, func: tirx.PrimFunc, target: tvm.target.Target) -> float | None:
        """Best measured seconds of ``func`` on ``target``, or None when never measured."""
        records = self.records(func, target)
        return mean(records[0].run_secs) if records else None

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        """``func`` scheduled by its best record, or None when there is none."""
        records = self.records(func, target)
        if not records:
            return None
        sch = s_tir.Schedule(workload(func))
        records[0].trace.apply_to_schedule(sch, remove_postproc=False)
        return sch

    def commit(self, func: tirx.PrimFunc, target: tvm.target.Target, trace, run_secs) -> None:
        """Record a measurement made outside MetaSchedule's loop (the untuned baseline)."""
        entry = self.database.commit_workload(workload(func))
        self.database.commit_tuning_record(ms.database.TuningRecord(
            trace, entry, [float(s) for s in run_secs], target,
            ms.arg_info.ArgInfo.from_prim_func(func)))


def measured(database, mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """``target``'s successful records of workload ``mod`` in ``database``, fastest first."""
    if not database.has_workload(mod):
        return []
    entry = database.commit_workload(mod)  # an existing workload: looked up, not added
    wanted = str(target)
    records = [r for r in database.get_top_k(entry, 1 << 30)
               if str(r.target) == wanted and r.run_secs and mean(r.run_secs) < FAILED]
    return sorted(records, key=lambda r: mean(r.run_secs))


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)
