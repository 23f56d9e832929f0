"""The CPU compile pipeline: what ``tvm.compile`` runs for an ``llvm`` target (x86, ARM).

TVM's ``cpu_generic`` pipeline with our lowering passes (`dwsep_compiler.passes.lowering`) in
front of legalization and our schedule rules (`dwsep_compiler.schedules.cpu`) between
legalization and lowering. `relax_pipeline` is what ``tvm.compile`` takes as
``relax_pipeline``, `tir_pipeline` (registered as `TIR_PIPELINE`) its ``tir_pipeline``;
`schedule_module` stops after scheduling (tests, the benchmark and tuning); `stages` gives the
three parts to the tuner, which needs the PrimFuncs exactly as the compiler schedules them.
"""

from __future__ import annotations

import tvm
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from dwsep_compiler.passes.lowering.conv_transpose import ConvTransposeToConv
from dwsep_compiler.passes.lowering.drop_dropout import DropDropout
from dwsep_compiler.passes.lowering.fast_sigmoid import FastSigmoid
from dwsep_compiler.passes.lowering.fold_bn import FoldBatchNormIntoConv2D
from dwsep_compiler.passes.lowering.fuse_dwpw import MIN_FUSED_PIXELS, FuseDepthwisePointwise
from dwsep_compiler.passes.lowering.pack_dense import PackDenseWeights
from dwsep_compiler.passes.lowering.pack_weights import PackConvWeights
from dwsep_compiler.passes.lowering.stack_scratch import StackScratch
from dwsep_compiler.passes.lowering.strided_pointwise import StridedPointwiseToSlice
from dwsep_compiler.passes.lowering.sum_to_add import SumToAdd
from dwsep_compiler.passes.lowering.widen_depthwise import WidenDepthwiseRows
from dwsep_compiler.schedules import cpu as cpu_rules
from dwsep_compiler.schedules.apply import ApplyScheduleRules
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

# Split loops whose extent the tile does not divide into a clean body and a tail.
PASS_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}
# The name `tir_pipeline` is registered under with TVM (``tvm.compile(..., tir_pipeline=...)``,
# ``tvm.tirx.build(..., pipeline=...)``; `dwsep_compiler.relax_pipelines` registers it).
TIR_PIPELINE = "dwsep_cpu"


def stages(target: tvm.target.Target, fuse: bool | str = True, records=None,
           track_origins: bool = False):
    """``(front, schedule, back)``: the passes up to legalization, the rule application, and
    TVM's lowering after it. ``track_origins``: the weight-rewriting passes record which
    original weight each new one replaces (tuning keys records by it)."""
    schedule = ApplyScheduleRules(cpu_rules.rules(), records)
    knobs = cpu_knobs(target)
    front = (cpu_generic.library_dispatch_passes(target)
             + [DropDropout(),
                FoldBatchNormIntoConv2D(decompose_rest=True, track_origins=track_origins),
                SumToAdd(), StridedPointwiseToSlice(), ConvTransposeToConv(), FastSigmoid()]
             + ([FuseDepthwisePointwise(0 if fuse == "always" else MIN_FUSED_PIXELS)]
                if fuse else [])
             + [WidenDepthwiseRows(knobs.vector_bytes),
                PackConvWeights(knobs.lanes, knobs.accumulators, track_origins, knobs.fma_by_lane)]
             # NEON's load pairs reach +-1 KB: dense weights in tiles (see pack_dense).
             + ([PackDenseWeights(knobs.lanes, track_origins)] if knobs.fma_by_lane else [])
             + cpu_generic.legalize_passes(target))
    back = cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
    return front, schedule, back


def relax_pipeline(target: tvm.target.Target, fuse: bool | str = True, records=None):
    """The Relax pipeline ``tvm.compile`` runs for a CPU target, with our schedules.

    ``fuse``: depthwise -> pointwise pairs with large outputs become one fused kernel
    (``"always"``: every pair; False: never). ``records``: tuning records to apply
    (`dwsep_compiler.tuning.TuningRecords`); PrimFuncs without one get the rules' defaults."""
    front, schedule, back = stages(target, fuse, records)

    @tvm.transform.module_pass(opt_level=0, name="DwsepCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(front + [schedule] + back)(mod)

    return _pipeline


def tir_pipeline():
    """The TIR half of a CPU build, in the form TVM's TIR pipeline registry takes (lowering,
    host finalization, device finalization): TVM's ``s_tir`` lowering, then `StackScratch`
    (kernel scratch buffers of a few KB on the stack instead of the runtime's workspace pool),
    before the host finalization turns the remaining buffers into workspace calls."""
    from tvm.s_tir import pipeline as s_tir_pipeline

    lowering, finalize_host, finalize_device = s_tir_pipeline.default_s_tir_pipeline()
    return tvm.transform.Sequential([lowering, StackScratch()]), finalize_host, finalize_device


def schedule_module(mod: tvm.IRModule, target: tvm.target.Target, fuse: bool | str = True,
                    records=None, failures: dict[str, str] | None = None):
    """Legalize ``mod`` and apply the CPU rules (or ``records``); returns
    ``(module, {PrimFunc: rule name})``. ``failures``, if given, receives the errors of rules
    that raised (PrimFunc name -> "Rule: error"; the next rule scheduled the PrimFunc)."""
    front, schedule, _ = stages(target, fuse, records)
    with target, tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        out = tvm.transform.Sequential(front + [schedule])(mod)
    if failures is not None:
        failures.update(schedule.failures)
    return out, dict(schedule.applied)


def unscheduled_prim_funcs(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs that no rule scheduled."""
    return [gv.name_hint for gv, func in mod.functions_items()
            if isinstance(func, tvm.tirx.PrimFunc)
            and not bool(func.attrs.get("tirx.is_scheduled", False))]
