"""Tuning tasks: the PrimFuncs of a model that a tunable schedule rule claims, deduplicated."""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from dwsep_compiler.compile import cpu as cpu_build
from dwsep_compiler.schedules.gpu.knobs import is_gpu


def workload(func: tirx.PrimFunc) -> tvm.IRModule:
    """The MetaSchedule workload of a PrimFunc: a module whose only function is ``main``.

    Tuning and compiling both key records by this module's structure, so it must be made the
    same way on both sides."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def claim(func: tirx.PrimFunc, target: tvm.target.Target):
    """``(rule, untuned schedule)`` of the rule the compiler would use for ``func`` (the CPU
    rules, or the GPU ones for an OpenCL target), or None."""
    from dwsep_compiler.schedules import cpu as cpu_rules
    from dwsep_compiler.schedules import gpu as gpu_rules
    from dwsep_compiler.schedules.apply import first_rule

    rules = gpu_rules.rules(target) if is_gpu(target) else cpu_rules.rules()
    return first_rule(rules, func, target)


def is_tunable(rule) -> bool:
    return bool(getattr(rule, "TUNABLE", False))


@dataclass
class Task:
    name: str                   # the first PrimFunc of this structure
    func: tirx.PrimFunc
    rule: object                # the schedule rule that claims it
    default: s_tir.Schedule     # the rule's untuned schedule
    names: list[str] = field(default_factory=list)  # every PrimFunc (per model) it stands for

    @property
    def workload(self) -> tvm.IRModule:
        return workload(self.func)

    @property
    def weight(self) -> int:
        return len(self.names)


def legalized(mod: tvm.IRModule, target: tvm.target.Target, fuse: bool | str = True,
              origins: dict[str, str] | None = None) -> tvm.IRModule:
    """``mod`` after the compiler's passes up to scheduling: its PrimFuncs are what gets tuned.
    ``origins`` (if given, CPU targets) receives which weight each rewritten weight replaces
    (digests). An OpenCL target: `compile.opencl.legalized` (``target`` with its host)."""
    if is_gpu(target):
        from dwsep_compiler.compile import opencl

        return opencl.legalized(mod, target, bool(fuse))
    front, _, _ = cpu_build.stages(target, fuse, track_origins=origins is not None)
    with target, tvm.transform.PassContext(opt_level=3, config=cpu_build.PASS_CONFIG):
        out = tvm.transform.Sequential(front)(mod)
    if origins is not None:
        for step in front:
            origins.update(getattr(step, "origins", {}))
    return out


def extract_tasks(mods: list[tvm.IRModule], target: tvm.target.Target,
                  fuse: bool | str = True) -> list[Task]:
    """One task per distinct PrimFunc structure that a tunable rule claims, across ``mods``."""
    tasks: list[Task] = []
    by_hash: dict[int, list[Task]] = {}
    for index, mod in enumerate(mods):
        for gvar, func in legalized(mod, target, fuse).functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            wl = workload(func)
            key = tvm_ffi.structural_hash(wl)
            same = [t for t in by_hash.get(key, []) if tvm_ffi.structural_equal(t.workload, wl)]
            if same:
                same[0].names.append(f"{index}:{gvar.name_hint}")
                continue
            claimed = claim(wl["main"], target)
            if claimed is None or not is_tunable(claimed[0]):
                continue
            task = Task(gvar.name_hint, func, claimed[0], claimed[1], [f"{index}:{gvar.name_hint}"])
            by_hash.setdefault(key, []).append(task)
            tasks.append(task)
    return tasks
