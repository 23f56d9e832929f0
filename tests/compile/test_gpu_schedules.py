"""Our mobile-GPU schedule rules (schedules/gpu) on the OpenCL targets (mali, adreno): they claim
the depthwise and pointwise PrimFuncs instead of dlight, the kernels run on PoCL and match
onnxruntime (odd shapes included), every launch fits a phone (256 work-items, 16 KB local
memory), the pointwise kernel loads and stores float4 when the shapes allow, and the tunable
space's points all run.

Needs pyopencl and an OpenCL ICD (Debian pocl-opencl-icd): missing ones fail, never skip.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
import tvm
from tvm import relax, s_tir

from dwsep_compiler import compile as tvm_compile
from dwsep_compiler.compile import opencl
from dwsep_compiler.device import pocl
from dwsep_compiler.schedules.gpu import Depthwise, FusedDepthwisePointwise, Pointwise
from dwsep_compiler.targets import resolve_target

from helpers import make_model, rel_error, run_onnx
from gpu_builds import PHONE, SHAPE, gpu_build

pytestmark = pytest.mark.opencl

TARGETS = ["mali", "adreno"]
OURS = {"Depthwise", "Pointwise"}


def _conv_model(rng, channels, hw, kernel=(3, 3), group=1, out_channels=None, strides=(1, 1),
                dilations=(1, 1), pads=(0, 0, 0, 0), bias=False, epilogue=None,
                residual=False):
    """One Conv with an optional epilogue: "relu", "clip" (0..6) and/or a residual Add of x."""
    out_channels = out_channels or channels
    w = rng.standard_normal((out_channels, channels // group, *kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(
            rng.standard_normal(out_channels).astype(np.float32), "B"))
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["conv"], kernel_shape=list(kernel),
                              strides=list(strides), dilations=list(dilations), pads=list(pads),
                              group=group)]
    last = "conv"
    if residual:
        nodes.append(helper.make_node("Add", [last, "x"], ["sum"]))
        last = "sum"
    if epilogue == "relu":
        nodes.append(helper.make_node("Relu", [last], ["act"]))
        last = "act"
    elif epilogue == "clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["act"]))
        last = "act"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, *hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


# name -> (rule that must schedule the conv, model arguments)
ODD_SHAPES = {
    "dw_c3_stride2_relu": ("Depthwise", dict(channels=3, hw=(11, 13), strides=(2, 2),
                                             pads=(1, 1, 1, 1), bias=True, epilogue="relu")),
    "dw_c5_dilation2_asym_clip": ("Depthwise", dict(channels=5, hw=(10, 9), dilations=(2, 2),
                                                    pads=(0, 1, 2, 1), bias=True,
                                                    epilogue="clip")),
    "dw_c7_1x7": ("Depthwise", dict(channels=7, hw=(9, 14), kernel=(1, 7), pads=(0, 3, 0, 3))),
    "dw_multiplier2_w16_relu": ("Depthwise", dict(channels=4, out_channels=8, hw=(8, 16),
                                                  pads=(1, 1, 1, 1), bias=True, epilogue="relu")),
    # A conv of a one-channel input (a grayscale model's first conv, factorized), which TVM
    # legalizes as a plain conv2d: depthwise with r = its outputs.
    "dw_c1_to3_stride2_relu": ("Depthwise", dict(channels=1, out_channels=3, hw=(12, 16),
                                                 strides=(2, 2), pads=(1, 1, 1, 1), bias=True,
                                                 epilogue="relu")),
    "pw_5to7_6x6_relu": ("Pointwise", dict(channels=5, out_channels=7, hw=(6, 6), kernel=(1, 1),
                                           bias=True, epilogue="relu")),
    "pw_12to3_7x7_clip": ("Pointwise", dict(channels=12, out_channels=3, hw=(7, 7),
                                            kernel=(1, 1), epilogue="clip")),
    "pw_16_residual": ("Pointwise", dict(channels=16, hw=(8, 8), kernel=(1, 1), bias=True,
                                         residual=True, epilogue="relu")),
    # A 1x1 map (ResNet's last stage at low resolution): the idle work-items along pixels once
    # overwrote the result (error 1.0), with and without the local-memory stage.
    "pw_64to16_1x1_map_relu": ("Pointwise", dict(channels=64, out_channels=16, hw=(1, 1),
                                                 kernel=(1, 1), bias=True, epilogue="relu")),
    "pw_4to8_1x1_map": ("Pointwise", dict(channels=4, out_channels=8, hw=(1, 1),
                                          kernel=(1, 1))),
    "dw_c8_1x1_map": ("Depthwise", dict(channels=8, hw=(1, 1), pads=(1, 1, 1, 1), bias=True)),
}
for _name, (_rule, _args) in ODD_SHAPES.items():
    if _rule == "Depthwise":
        _args.setdefault("group", _args["channels"])

_ODD_BUILDS: dict = {}


def _odd_build(name, target_name):
    key = (name, target_name)
    if key not in _ODD_BUILDS:
        _, args = ODD_SHAPES[name]
        model = _conv_model(np.random.default_rng(len(name)), **args)
        shape = (1, args["channels"], *args["hw"])
        mod = tvm_compile.import_onnx(model, {"x": shape})
        program = opencl.lower(mod, resolve_target(target_name))
        _ODD_BUILDS[key] = (model, shape, mod, program)
    return _ODD_BUILDS[key]


def _check_on_pocl(program, model, shape, context, seed=1):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    (actual,) = pocl.run_on_pocl(program, [x], context=context)
    (expected,) = run_onnx(model, {"x": x})
    assert actual.shape == expected.shape
    return rel_error(actual, expected)


def _conv_schedules(program) -> dict[str, str]:
    """Rules of the conv PrimFuncs, the fused depthwise + pointwise ones included."""
    return {name: rule for name, rule in program.schedules.items()
            if "conv2d" in name or "depthwise_pointwise" in name}


@pytest.mark.parametrize("target_name", TARGETS)
def test_factorized_cnn_convs_are_ours_and_match_onnxruntime(cl_context, models, target_name):
    _, _, executable = gpu_build(models, "cnn_rank2", target_name)
    program = opencl.program_of(executable)
    convs = _conv_schedules(program)
    # every conv ours: its two DW -> PW pairs fused, the 1x1 and the 3x3 depthwise on their own
    assert set(convs.values()) == OURS | {"FusedDepthwisePointwise"}, program.schedules
    fused = [name for name, rule in convs.items() if rule == "FusedDepthwisePointwise"]
    assert len(fused) == 2 and all("depthwise_pointwise" in n for n in fused), program.schedules
    assert "dlight" in program.schedules.values()  # the rest (GEMM, mean) is still dlight's
    for kernel in program.kernels.values():
        if kernel.primfunc in fused:
            # the DW tile in local memory, the DW output never a kernel argument
            assert 0 < kernel.local_memory_bytes <= 16 * 1024, opencl.format_kernels([kernel])
            assert not any("depthwise" in p.name for p in kernel.params), kernel.params
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    (actual,) = pocl.run_on_pocl(executable, [x], context=cl_context)
    (expected,) = run_onnx(models["cnn_rank2"], {"x": x})
    assert rel_error(actual, expected) < 1e-4


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("name", list(ODD_SHAPES))
def test_odd_shapes_match_onnxruntime(cl_context, name, target_name):
    model, shape, _, program = _odd_build(name, target_name)
    rule, _ = ODD_SHAPES[name]
    assert set(_conv_schedules(program).values()) == {rule}, program.schedules
    # the epilogue is fused: one kernel for the conv and what follows it
    assert len([k for k in program.kernels.values() if k.launched]) == 1, program.kernels
    error = _check_on_pocl(program, model, shape, cl_context)
    assert error < 1e-4, f"{name} on {target_name}: max rel error {error:.2e}"


@pytest.mark.parametrize("target_name", TARGETS)
def test_every_kernel_fits_a_phone(models, target_name):
    programs = [opencl.program_of(gpu_build(models, "cnn_rank2", target_name)[2])]
    programs += [_odd_build(name, target_name)[3] for name in ODD_SHAPES]
    for program in programs:
        kernels = list(program.kernels.values())
        table = opencl.format_kernels(kernels)
        assert opencl.check_limits(kernels, PHONE) == [], table
        for k in kernels:
            assert 1 <= k.threads_per_group <= 256 and k.local_memory_bytes <= 16 * 1024, table
    # the pointwise with 16 input channels stages its tiles in local memory
    program = _odd_build("pw_16_residual", target_name)[3]
    (kernel,) = [k for k in program.kernels.values() if k.launched]
    assert 0 < kernel.local_memory_bytes <= 16 * 1024, opencl.format_kernels([kernel])


@pytest.mark.parametrize("target_name", TARGETS)
def test_float4_when_the_shapes_allow(target_name):
    def kernel_source(name):
        program = _odd_build(name, target_name)[3]
        (kernel,) = [k for k in program.kernels.values() if k.launched]
        return kernel.source

    # channels and pixels multiples of 4: float4 loads, stores and accumulators
    source = kernel_source("pw_16_residual")
    assert "float4" in source and "vload4" in source and "vstore4" in source, source
    # a row of 16 pixels: the depthwise strip is stored as one float4
    assert "vstore4" in kernel_source("dw_multiplier2_w16_relu")
    # 7x7 = 49 pixels: never a float4 (it could not be aligned)
    assert "float4" not in kernel_source("pw_12to3_7x7_clip")


class _Point:
    """A rule's tunable space replayed at one point: each knob's first or last candidate (how
    MetaSchedule replays a trace with other decisions)."""

    def __init__(self, rule, last: bool):
        self.rule, self.last = rule, last

    def apply(self, func, target, tunable):
        space = self.rule.apply(func, target, True)
        if space is None:
            return None
        trace = space.trace
        for inst in [i for i in trace.insts if i.kind.name == "SampleCategorical"]:
            choice = len(inst.attrs[0]) - 1 if self.last else 0
            trace = trace.with_decision(inst, choice, remove_postproc=True)
        sch = s_tir.Schedule(func)
        trace.apply_to_schedule(sch, remove_postproc=True)
        return sch


@pytest.mark.parametrize("name", ["pw_16_residual", "dw_multiplier2_w16_relu",
                                  "pw_12to3_7x7_clip"])
def test_tunable_points_run_on_pocl(cl_context, name):
    model, shape, mod, _ = _odd_build(name, "mali")
    sources = []
    for last in (False, True):
        rules = [_Point(Pointwise(), last), _Point(Depthwise(), last)]
        program = opencl.lower(mod, resolve_target("mali"), rules=rules)
        assert set(_conv_schedules(program).values()) == {"_Point"}, program.schedules
        kernels = list(program.kernels.values())
        assert opencl.check_limits(kernels, PHONE) == [], opencl.format_kernels(kernels)
        error = _check_on_pocl(program, model, shape, cl_context)
        assert error < 1e-4, f"{name}, {'last' if last else 'first'} point: {error:.2e}"
        sources.append(program.source)
    assert sources[0] != sources[1]  # two different schedules


def test_rules_refuse_what_is_not_theirs(models):
    """Standard 3x3 convs are dlight's; the rules decline CPU targets and each other's convs."""
    _, _, executable = gpu_build(models, "cnn", "mali")
    convs = _conv_schedules(opencl.program_of(executable))
    assert sorted(convs.values()) == ["Depthwise", "Pointwise", "dlight", "dlight"], convs
    _, _, mod, _ = _odd_build("pw_16_residual", "mali")
    mali = resolve_target("mali").tvm_target()
    with mali:
        legal = relax.transform.FuseTIR()(relax.transform.FuseOps()(
            relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(mod))))
    (func,) = [f for gv, f in legal.functions.items() if "conv2d" in gv.name_hint]
    assert Pointwise().apply(func, mali, False) is not None
    assert Depthwise().apply(func, mali, False) is None
    assert Pointwise().apply(func, tvm.target.Target({"kind": "llvm"}), False) is None


# ---- fused depthwise + pointwise (schedules/gpu/fused_dwpw.py) ----

def _dwpw_model(rng, channels, hw, out_channels, multiplier=1, kernel=(3, 3), strides=(1, 1),
                dilations=(1, 1), pads=(1, 1, 1, 1), bias=False, relu=False, residual=False):
    """Depthwise Conv (multiplier r) -> 1x1 Conv [+ bias] [+ residual Add of x] [-> Relu]."""
    mr = channels * multiplier
    inits = [numpy_helper.from_array(rng.standard_normal((mr, 1, *kernel)).astype(np.float32),
                                     "Wd"),
             numpy_helper.from_array(
                 (rng.standard_normal((out_channels, mr, 1, 1)) / np.sqrt(mr)).astype(np.float32),
                 "Wp")]
    nodes = [helper.make_node("Conv", ["x", "Wd"], ["dw"], kernel_shape=list(kernel),
                              strides=list(strides), dilations=list(dilations), pads=list(pads),
                              group=channels)]
    pw_inputs = ["dw", "Wp"]
    if bias:
        inits.append(numpy_helper.from_array(
            rng.standard_normal(out_channels).astype(np.float32), "B"))
        pw_inputs.append("B")
    nodes.append(helper.make_node("Conv", pw_inputs, ["pw"], kernel_shape=[1, 1]))
    last = "pw"
    if residual:
        nodes.append(helper.make_node("Add", [last, "x"], ["sum"]))
        last = "sum"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["act"]))
        last = "act"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, *hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


FUSED_SHAPES = {
    "c3_stride2_bias_relu": dict(channels=3, hw=(11, 13), out_channels=5, strides=(2, 2),
                                 bias=True, relu=True),
    "c5_dilation2_asym_r2": dict(channels=5, hw=(10, 9), out_channels=7, multiplier=2,
                                 dilations=(2, 2), pads=(0, 1, 2, 1), bias=True, relu=True),
    "c7_1x7": dict(channels=7, hw=(9, 14), out_channels=3, kernel=(1, 7), pads=(0, 3, 0, 3)),
    "c16_residual_relu": dict(channels=16, hw=(8, 16), out_channels=16, bias=True,
                              residual=True, relu=True),
    # 512 DW channels: a 4-pixel strip's tile is 8 KB of local memory
    "c512_many_channels": dict(channels=512, hw=(6, 8), out_channels=24, bias=True, relu=True),
    # 4104 DW channels: not even one pixel's tile fits 16 KB; the DW values stay in registers
    "c4104_too_many_for_local": dict(channels=4104, hw=(3, 2), out_channels=4, pads=(1, 1, 1, 1)),
}
_FUSED_BUILDS: dict = {}


def _fused_build(name, target_name, rules=None):
    key = (name, target_name)
    if rules is not None or key not in _FUSED_BUILDS:
        args = FUSED_SHAPES[name]
        model = _dwpw_model(np.random.default_rng(len(name)), **args)
        shape = (1, args["channels"], *args["hw"])
        mod = tvm_compile.import_onnx(model, {"x": shape})
        program = opencl.lower(mod, resolve_target(target_name), rules=rules)
        if rules is not None:
            return model, shape, mod, program
        _FUSED_BUILDS[key] = (model, shape, mod, program)
    return _FUSED_BUILDS[key]


def _assert_fused_kernel_fits(program, name):
    """One launched kernel (DW, PW and epilogue fused) that never passes the depthwise output
    through global memory, within a phone's limits; returns it."""
    kernels = list(program.kernels.values())
    table = opencl.format_kernels(kernels)
    (kernel,) = [k for k in kernels if k.launched]
    assert opencl.check_limits(kernels, PHONE) == [], table
    assert 1 <= kernel.threads_per_group <= 256, table
    assert kernel.local_memory_bytes <= 16 * 1024, table
    assert not any("depthwise" in p.name for p in kernel.params), (name, kernel.params)
    assert kernel.unsupported is None, kernel.unsupported
    return kernel


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("name", list(FUSED_SHAPES))
def test_fused_odd_shapes_match_onnxruntime(cl_context, name, target_name):
    model, shape, _, program = _fused_build(name, target_name)
    assert set(_conv_schedules(program).values()) == {"FusedDepthwisePointwise"}, \
        program.schedules
    kernel = _assert_fused_kernel_fits(program, name)
    args = FUSED_SHAPES[name]
    mr = args["channels"] * args.get("multiplier", 1)
    if 4 * mr <= 16 * 1024:
        # the DW tile of all M*r channels for a strip of pixels: a multiple of one pixel's
        assert kernel.local_memory_bytes and kernel.local_memory_bytes % (4 * mr) == 0, \
            opencl.format_kernels([kernel])
    else:
        assert kernel.local_memory_bytes == 0, opencl.format_kernels([kernel])
    error = _check_on_pocl(program, model, shape, cl_context)
    assert error < 1e-4, f"{name} on {target_name}: max rel error {error:.2e}"


@pytest.mark.parametrize("name", ["c16_residual_relu", "c512_many_channels"])
def test_fused_tunable_points_run_on_pocl(cl_context, name):
    sources = []
    for last in (False, True):
        model, shape, _, program = _fused_build(
            name, "mali", rules=[_Point(FusedDepthwisePointwise(), last)])
        assert set(_conv_schedules(program).values()) == {"_Point"}, program.schedules
        _assert_fused_kernel_fits(program, name)
        error = _check_on_pocl(program, model, shape, cl_context)
        assert error < 1e-4, f"{name}, {'last' if last else 'first'} point: {error:.2e}"
        sources.append(program.source)
    assert sources[0] != sources[1]  # two different schedules


def test_rules_without_the_fused_one_keep_the_pair_apart(cl_context):
    """A rule list without the fused rule, with ``fuse=False``: the pair stays two kernels that
    those rules schedule (fused, its PrimFunc would have gone to dlight), and the output
    matches onnxruntime on PoCL."""
    model, shape, mod, _ = _fused_build("c16_residual_relu", "mali")
    program = opencl.lower(mod, resolve_target("mali"), rules=[Pointwise(), Depthwise()],
                           fuse=False)
    assert sorted(_conv_schedules(program).values()) == ["Depthwise", "Pointwise"], \
        program.schedules
    error = _check_on_pocl(program, model, shape, cl_context)
    assert error < 1e-4, f"max rel error {error:.2e}"


def test_fused_rule_refuses_what_is_not_its(models):
    """Only the fused PrimFuncs, only on GPU targets; the single-conv rules leave them alone."""
    _, _, mod, _ = _fused_build("c16_residual_relu", "mali")
    mali = resolve_target("mali").tvm_target()
    from dwsep_compiler.passes.lowering.fuse_dwpw import FuseDepthwisePointwise

    with mali:
        legal = relax.transform.FuseTIR()(relax.transform.FuseOps()(
            relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(
                FuseDepthwisePointwise(0)(mod)))))
    (func,) = [f for gv, f in legal.functions.items() if "depthwise_pointwise" in gv.name_hint]
    assert FusedDepthwisePointwise().apply(func, mali, False) is not None
    assert FusedDepthwisePointwise().apply(func, tvm.target.Target({"kind": "llvm"}),
                                           False) is None
    assert Pointwise().apply(func, mali, False) is None
    assert Depthwise().apply(func, mali, False) is None
    # a plain pointwise conv is not the fused rule's
    _, _, pw_mod, _ = _odd_build("pw_16_residual", "mali")
    with mali:
        legal = relax.transform.FuseTIR()(relax.transform.FuseOps()(
            relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(pw_mod))))
    (func,) = [f for gv, f in legal.functions.items() if "conv2d" in gv.name_hint]
    assert FusedDepthwisePointwise().apply(func, mali, False) is None
