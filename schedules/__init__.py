"""Schedule rules: for each (operator family, target family), how its PrimFunc runs fast.

Rules have TVM dlight's shape, ``apply(func, target, tunable) -> Schedule | None``: with
``tunable=False`` they pick knobs from the target (vector width, registers, cores); None means
"not mine". `schedule_pipeline` builds the Relax pipeline that legalizes a model, applies the
rules of the target's family to every PrimFunc and lowers the rest as TVM would.
"""

from __future__ import annotations

import tvm
from tvm import relax


def cpu_pipeline(target: tvm.target.Target):
    """TVM's CPU pipeline with our rules applied between legalization and lowering."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from . import cpu
    from .apply import ApplyScheduleRules

    @tvm.transform.module_pass(opt_level=0, name="DwsepCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [ApplyScheduleRules(cpu.rules())]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target))
            return seq(mod)

    return _pipeline


def unscheduled_prim_funcs(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs no rule scheduled (after `ApplyDefaultSchedule`)."""
    names = []
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False):
            names.append(gv.name_hint)
    return names


PASS_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}
