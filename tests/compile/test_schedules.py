"""Our CPU schedules compute what the unscheduled program computes, on awkward shapes, and
leave no PrimFunc unscheduled."""

import re

import numpy as np
import pytest
import tvm

from dwsep_compiler.compile import cpu as cpu_build
from dwsep_compiler.compile import build, import_onnx, run_executable
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.model import load_model, resolve_input_shapes
from dwsep_compiler.passes import names
from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx
from dwsep_compiler.targets import resolve_target

from helpers import (conv_model, light_model_path, rel_error, run_onnx, run_widths,
                     small_cnn)

HOST = resolve_target("host")


TARGETS = {
    "x86-avx2": tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}),
    "x86-avx512": tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}),
    "arm-neon": resolve_target("arm").tvm_target(),
}

# (in, out, kernel, strides, dilations, pads, hw, rank): channels off the vector width, stride 2,
# dilation, asymmetric pads, 1x7 and 7x1 kernels, tiny and odd spatial sizes; stride 2 over rows
# of whole 8-column chunks (NEON's staged phase copy).
CASES = [
    (13, 7, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (17, 19), 2),
    (8, 24, (3, 3), (2, 2), (1, 1), (0, 1, 2, 0), (15, 14), 1),
    (5, 16, (1, 7), (1, 1), (1, 2), (0, 3, 0, 6), (9, 23), 3),
    (6, 9, (7, 1), (2, 1), (1, 1), (3, 0, 2, 0), (21, 5), 2),
    (32, 40, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), (7, 7), 4),
    (4, 12, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), (10, 16), 2),
]


def _model(case, batch_norm=False):
    cin, cout, kernel, strides, dilations, pads, hw, rank = case
    return conv_model(np.random.default_rng(cin * 31 + cout), in_channels=cin, out_channels=cout,
                      kernel=kernel, strides=strides, dilations=dilations, pads=pads,
                      input_hw=hw, batch_norm=batch_norm), (1, cin, *hw), rank


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}k{c[2][0]}x{c[2][1]}s{c[3][0]}")
@pytest.mark.parametrize("variant", ["fused", "dw+pw", "standard"])
def test_rules_match_onnxruntime_on_awkward_shapes(case, variant):
    model, shape, rank = _model(case)
    if variant != "standard":
        model = factorize_onnx(model, {"x": shape}, RankPolicy(rank=rank, force=True)).model
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    mod = import_onnx(model, {"x": shape})
    fuse = "always" if variant == "fused" else False
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target(), fuse=fuse)
    expected_rules = {"fused": {"FusedDepthwisePointwise"}, "dw+pw": {"Depthwise", "Pointwise"},
                      "standard": {"Conv2D"}}[variant]
    assert expected_rules <= set(applied.values()), applied
    out = run_widths(mod, [x], fuse=fuse)[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


# Grouped convs, which the rewrite leaves alone: (in, out, group, kernel, strides, pads, hw).
# ShuffleNet's 1x1 (channels per group off the vector width), AlexNet's 5x5, a strided 3x3 with
# asymmetric pads, a strided 1x1.
GROUPED = [
    (24, 36, 3, (1, 1), (1, 1), (0, 0, 0, 0), (14, 14)),
    (20, 30, 5, (1, 1), (1, 1), (0, 0, 0, 0), (9, 11)),
    (16, 24, 2, (5, 5), (1, 1), (2, 2, 2, 2), (27, 27)),
    (12, 18, 3, (3, 3), (2, 2), (1, 0, 2, 1), (15, 13)),
    (12, 16, 4, (1, 1), (2, 2), (0, 0, 0, 0), (10, 9)),
]


@pytest.mark.parametrize("case", GROUPED, ids=lambda c: f"{c[0]}x{c[1]}g{c[2]}k{c[3][0]}s{c[4][0]}")
def test_grouped_convs_run_on_the_conv_rules_and_match_onnxruntime(case):
    """A grouped conv is a GEMM (1x1) or a direct conv per group: the Pointwise and Conv2D rules
    take it with channel tiles inside one group (dlight's generic reduction took them before:
    ShuffleNet's 1x1 convs 3 ms each against onnxruntime's 0.09, AlexNet 296 ms against 21)."""
    cin, cout, group, kernel, strides, pads, hw = case
    model = conv_model(np.random.default_rng(cin + cout), in_channels=cin, out_channels=cout,
                       kernel=kernel, strides=strides, pads=pads, input_hw=hw, group=group)
    shape = (1, cin, *hw)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    mod = import_onnx(model, {"x": shape})
    for target in TARGETS.values():  # AVX2, AVX-512 and NEON tiles
        _, applied = cpu_build.schedule_module(mod, target)
        pointwise = kernel == (1, 1) and strides == (1, 1)
        assert ("Pointwise" if pointwise else "Conv2D") in applied.values(), applied
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("target", TARGETS, ids=list(TARGETS))
def test_rules_apply_for_every_cpu_family(target):
    """The rules (not the fallback) take the convs for AVX2, AVX-512 and NEON alike."""
    model, shape, rank = _model(CASES[1])
    model = factorize_onnx(model, {"x": shape}, RankPolicy(rank=rank, force=True)).model
    for fuse, expected in [("always", {"FusedDepthwisePointwise"}),
                           (False, {"Depthwise", "Pointwise"})]:
        mod, applied = cpu_build.schedule_module(import_onnx(model, {"x": shape}),
                                                 TARGETS[target], fuse=fuse)
        assert expected <= set(applied.values()), applied
        assert cpu_build.unscheduled_prim_funcs(mod) == []


@pytest.mark.parametrize("name", ["vgg19", "resnet50", "inception_v1"])
def test_no_prim_func_is_left_unscheduled(name):
    """Every PrimFunc of VGG19, ResNet-50 and Inception (rank 1) is scheduled for x86 and NEON,
    and no rule raised on the way."""
    model = load_model(light_model_path(name))
    shapes = resolve_input_shapes(model)
    model = factorize_onnx(model, shapes, RankPolicy(rank=1)).model
    for target in (HOST.tvm_target(), TARGETS["arm-neon"]):
        failures = {}  # a rule that raised falls through to the next: a bug, silent otherwise
        mod, applied = cpu_build.schedule_module(import_onnx(model, shapes), target,
                                                 failures=failures)
        assert failures == {}, failures
        assert cpu_build.unscheduled_prim_funcs(mod) == [], name
        if name == "vgg19":  # its 224x224 layers are large enough to fuse
            assert "FusedDepthwisePointwise" in applied.values()
        assert "Pointwise" in applied.values() and "Depthwise" in applied.values()


def test_the_default_pipeline_really_is_unscheduled():
    """The check above can fail: TVM's own pipeline leaves the same PrimFuncs unscheduled."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    model = small_cnn(np.random.default_rng(0))
    mod = import_onnx(model, {"x": (1, 3, 16, 16)})
    target = HOST.tvm_target()
    with target:
        legal = tvm.transform.Sequential(cpu_generic.legalize_passes(target))(mod)
    assert cpu_build.unscheduled_prim_funcs(legal)


def test_epilogue_and_batch_norm_fused_into_the_tile():
    """Conv + folded BN bias + ReLU: one PrimFunc per conv, scheduled by our rules."""
    model, shape, rank = _model(CASES[0], batch_norm=True)
    model = factorize_onnx(model, {"x": shape}, RankPolicy(rank=rank)).model
    for fuse, rule in [("always", "FusedDepthwisePointwise"), (False, "Pointwise")]:
        mod, applied = cpu_build.schedule_module(import_onnx(model, {"x": shape}),
                                                 HOST.tvm_target(), fuse=fuse)
        fused = [name for name, r in applied.items() if r == rule]
        assert any("relu" in name and "add" in name for name in fused), applied


def _prim_funcs(model, shape, fuse):
    mod = import_onnx(model, {"x": shape})
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from dwsep_compiler.passes.lowering.fuse_dwpw import FuseDepthwisePointwise

    target = HOST.tvm_target()
    passes = ([FuseDepthwisePointwise(0)] if fuse else []) + cpu_generic.legalize_passes(target)
    with target:
        legal = tvm.transform.Sequential(passes)(mod)
    return [f for _, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def _run_prim_func(func, args):
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=HOST.tvm_target())
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize("rule_name", ["Pointwise", "Depthwise", "Conv2D", "FusedDepthwisePointwise"])
def test_tunable_spaces_sample_knobs_and_stay_correct(rule_name):
    from dwsep_compiler.schedules import cpu

    rule = next(r for r in cpu.rules() if type(r).__name__ == rule_name)
    # 64 wide: several vectors per row even with AVX-512's 16 lanes, so every rule has knobs.
    model, shape, rank = _model((16, 24, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (8, 64), 2))
    if rule_name != "Conv2D":
        model = factorize_onnx(model, {"x": shape}, RankPolicy(rank=rank, force=True)).model
    funcs = _prim_funcs(model, shape, fuse=rule_name == "FusedDepthwisePointwise")
    func = next(f for f in funcs if rule.apply(f, HOST.tvm_target(), False) is not None)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in func.params]
    expected = _run_prim_func(rule.apply(func, HOST.tvm_target(), False).mod["main"], args)
    decisions = set()
    for _ in range(10):
        sch = rule.apply(func, HOST.tvm_target(), True)
        samples = [inst for inst in sch.trace.insts if inst.kind.name == "SampleCategorical"]
        assert samples, "the tunable space samples no knob"
        decisions.add(tuple(int(sch.trace.decisions[inst]) for inst in samples))
        out = _run_prim_func(sch.mod["main"], args)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert len(decisions) > 1, "ten samples, one decision: the space is not being explored"


def test_softmax_is_scheduled_stage_by_stage_and_exact():
    """A reduction chain (softmax: max, exp, sum, divide) is not claimed by the single-reduction
    rule, whose schedule recomputes the whole chain at every output element (O(n^2) per row);
    the result matches onnxruntime."""
    from onnx import helper

    from helpers import make_model

    rng = np.random.default_rng(3)
    shape = (1, 1000)  # batch 1: dlight's rule then takes the class axis for the row axis
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
                       [helper.make_tensor_value_info("x", 1, list(shape))],
                       [helper.make_tensor_value_info("y", 1, list(shape))], [])
    mod = import_onnx(model, {"x": shape})
    scheduled, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert applied == {"softmax": "Fallback"}, applied
    # Stage by stage: the max reduction runs once per row, not once per output element.
    sch = tvm.s_tir.Schedule(scheduled["softmax"])
    trips = np.prod([int(sch.get(loop).extent)
                     for loop in sch.get_loops(sch.get_sblock("T_softmax_maxelem"))])
    assert trips < shape[1] * 1.1, trips  # dlight's reduction rule: about 1000 * 1000
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


def _pointwise_model(rng, cin, cout, hw, batch=1, residual=False):
    """1x1 Conv (+ bias) [+ residual Add of the input] + Relu."""
    from onnx import helper, numpy_helper

    from helpers import make_model

    w = numpy_helper.from_array(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"])]
    last = "c"
    if residual:
        nodes.append(helper.make_node("Add", ["c", "x"], ["a"]))
        last = "a"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    shape = (batch, cin, *hw)
    return make_model(nodes, [helper.make_tensor_value_info("x", 1, list(shape))],
                      [helper.make_tensor_value_info("y", 1, [batch, cout, *hw])], [w, b]), shape


# (in, out, hw, batch, residual): 49, 196, 45, 60 pixels (not whole vectors of 16 or 8 lanes);
# 32 and 64 output channels (two-vector blocks), 48 (one-vector blocks on AVX-512); 65 and more
# input channels (packed), 64 and fewer (pixel-vectorized, partial vectors).
PACKED_CASES = [(72, 32, (7, 7), 1, False), (96, 96, (7, 7), 2, True),
                (65, 48, (14, 14), 1, False), (80, 80, (5, 9), 1, True),
                (100, 32, (6, 10), 1, False),  # tiles of 12 cross rows
                (20, 32, (7, 7), 1, False), (64, 64, (5, 9), 1, True), (3, 32, (6, 10), 1, False)]


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: f"{c[0]}x{c[1]}@{c[2][0]}x{c[2][1]}")
def test_pointwise_without_whole_pixel_vectors_runs_on_packed_weights(case):
    """Pixels that do not fill vectors, over more than 64 input channels: the weights are packed
    into channel blocks and the tile vectorizes output channels; bias, residual add and ReLU fuse
    into it; batch 2 works. With 64 input channels or fewer the pixels stay in the vectors on
    x86 (the packed tile's transposed write-back outweighs a short reduction); NEON packs
    those too. Outputs match onnxruntime."""
    from dwsep_compiler.passes.lowering.pack_weights import (MAX_UNPACKED_POINTWISE_CHANNELS,
                                                          PackConvWeights)
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    cin, cout, hw, batch, residual = case
    model, shape = _pointwise_model(np.random.default_rng(cin), cin, cout, hw, batch, residual)
    knobs = cpu_knobs(HOST.tvm_target())
    mod = import_onnx(model, {"x": shape})
    rewrite = PackConvWeights(knobs.lanes, knobs.accumulators)
    rewrite(mod)
    packs = (hw[0] * hw[1]) % knobs.lanes != 0 and cin > MAX_UNPACKED_POINTWISE_CHANNELS
    assert rewrite.rewritten == int(packs)
    neon = cpu_knobs(TARGETS["arm-neon"])  # NEON packs them all, whatever the channels
    rewrite = PackConvWeights(neon.lanes, neon.accumulators, fma_by_lane=neon.fma_by_lane)
    rewrite(import_onnx(model, {"x": shape}))
    assert rewrite.rewritten == 1
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    packed = [name for name, rule in applied.items() if "conv2d_packed" in name]
    assert len(packed) == int(packs) and all(applied[n] == "Pointwise" for n in packed), applied
    if packs:  # the epilogue is in the same kernel
        assert "relu" in packed[0] and (not residual or "add1" in packed[0]), packed
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    expected = run_onnx(model, {"x": x})[0]
    assert np.count_nonzero(expected) > expected.size // 4
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("target", ["x86-avx2", "arm-neon"])
def test_packed_tiles_accumulate_on_the_stack_not_in_the_workspace_pool(target):
    """The packed tile's accumulators (rows x one channel block, well under 1 KB here) are a
    stack slot: no call into the runtime's workspace pool inside the parallel loop. A local-scope
    tile was lowered to an alloc/free pair through the pool on every tile (on the emulated
    A76, 1.8M of light_squeezenet's 7.9M instructions per inference)."""
    from onnx import helper, numpy_helper

    from helpers import make_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (32, 96, 1, 1)), ("W2", (32, 32, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"])]
    shape = (1, 96, 7, 7)
    model = make_model(nodes, [helper.make_tensor_value_info("x", 1, list(shape))],
                       [helper.make_tensor_value_info("y", 1, [1, 32, 7, 7])], inits)
    tvm_target = TARGETS[target]
    mod = import_onnx(model, {"x": shape})
    _, applied = cpu_build.schedule_module(mod, tvm_target)
    packed = [n for n in applied if "conv2d_packed" in n]
    assert len(packed) == 2, applied  # the 1x1 and the 3x3 both run the packed tile
    with tvm.transform.PassContext(opt_level=3, config=cpu_build.PASS_CONFIG):
        executable = tvm.compile(mod, target=tvm_target,
                                 relax_pipeline=cpu_build.relax_pipeline(tvm_target))
    tasks = _parallel_tasks(executable)
    assert len(tasks) >= 2  # each kernel's parallel loop body
    # (the 3x3 conv's padded input, once per call outside the loop, may use the pool)
    assert not _calling_the_pool(tasks)


def _parallel_tasks(executable) -> list[str]:
    """The LLVM IR of each parallel loop body (TVM's closures) of ``executable``'s kernels."""
    functions = re.split(r"\n(?=define )", executable.mod.imports[0].inspect_source("ll"))
    return [f for f in functions if re.match(r"define [^\n]*@__tvm_parallel_lambda", f)]


def _calling_the_pool(tasks: list[str]) -> list[str]:
    """Names of the tasks that allocate from the runtime's workspace pool."""
    return [t.split("(")[0] for t in tasks if "@__TVMBackendAllocWorkspace" in t]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_depthwise_bands_build_their_padded_rows_on_the_stack(target):
    """A depthwise band's padded input rows (24 channels x 2 at 32 x 80, ddddocr's: 10 rows of
    82 floats, 3.3 KB, over TVM's 1 KB stack limit) are a stack buffer of the parallel task
    (`passes.lowering.stack_scratch`), not an alloc/free pair through the runtime's workspace
    pool on every band, which TVM's own TIR pipeline makes of it. Outputs against onnxruntime."""
    from dwsep_compiler.passes.lowering.stack_scratch import stack_scratch_buffers

    shape = (1, 24, 32, 80)
    model = conv_model(np.random.default_rng(6), in_channels=24, out_channels=48, group=24,
                       kernel=(3, 3), pads=(1, 1, 1, 1), input_hw=shape[2:], bias=False)
    model.graph.node.pop()  # no ReLU: the depthwise conv alone
    model.graph.node[0].output[0] = "y"
    mod = import_onnx(model, {"x": shape})
    tvm_target = TARGETS[target]
    executables = {}
    for pipeline in ("default", cpu_build.TIR_PIPELINE):
        with tvm.transform.PassContext(opt_level=3, config=cpu_build.PASS_CONFIG):
            executables[pipeline] = tvm.compile(
                mod, target=tvm_target, relax_pipeline=cpu_build.relax_pipeline(tvm_target),
                tir_pipeline=pipeline)
    ours = _parallel_tasks(executables[cpu_build.TIR_PIPELINE])
    assert ours and not _calling_the_pool(ours)
    assert _calling_the_pool(_parallel_tasks(executables["default"]))
    # its rows are copied with vector moves: as a loop, LLVM (seeing that a stack buffer
    # aliases nothing) made each row's copy a memcpy call (`tiling.build_padded_rows`)
    assembly = executables[cpu_build.TIR_PIPELINE].mod.imports[0].inspect_source("s")
    assert not re.findall(r"\b(?:bl|b|callq?|jmpq?)\s+memcpy", assembly)
    # the budget: a band over it stays in the pool
    scheduled, applied = cpu_build.schedule_module(mod, tvm_target)
    [name] = [n for n, rule in applied.items() if rule == "Depthwise"]
    with tvm.transform.PassContext(opt_level=3, config=cpu_build.PASS_CONFIG):
        lowered = tvm.tirx.transform.BindTarget(tvm_target.with_host(tvm_target))(
            tvm.IRModule({name: scheduled[name].with_attr("global_symbol", name)}))
        lowered = tvm.s_tir.pipeline.default_s_tir_pipeline()[0](lowered)
    assert len(stack_scratch_buffers(lowered[name])[1]) == 1
    assert stack_scratch_buffers(lowered[name], budget=3000)[1] == []
    if target == "x86-avx512":  # (run_widths runs AVX2 too)
        x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
        assert rel_error(run_widths(mod, [x])[0], run_onnx(model, {"x": x})[0]) < 1e-5

# (in, out, hw, batch, residual) for NEON's lane-weights tile: 8-channel weight blocks with 3
# pixel vectors and a tail (196 pixels), 4-channel blocks (20 outputs) over batch 2, 3 input
# channels (no unrolled steps), and 18 outputs (no whole-vector block: left unpacked).
LANE_WEIGHT_CASES = [(128, 128, (14, 14), 1, True), (24, 20, (6, 6), 2, False),
                     (3, 16, (8, 8), 1, False), (16, 18, (4, 4), 1, False)]


@pytest.mark.emulation
def test_neon_pointwise_reads_weights_from_vector_lanes_and_matches_onnxruntime(tmp_path,
                                                                             runtime):
    """On NEON (FMLA by element) a pointwise conv whose pixels are whole vectors gets its
    weights packed [O/b, C, b] and keeps the pixel-vectorized tile, each input channel's b
    weights one vector copy that the FMA rows read by lane; x86 (broadcast inside the FMA)
    leaves the same convs unpacked. The NEON library matches onnxruntime on Cortex-A53 and
    A76 under qemu."""
    from dwsep_compiler.compile import export_library
    from dwsep_compiler.device.emulate import run_aarch64
    from dwsep_compiler.passes.lowering.pack_weights import (MAX_UNPACKED_POINTWISE_CHANNELS,
                                                          PackConvWeights)
    from dwsep_compiler.schedules.cpu.tiling import lane_weight_block
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    assert [lane_weight_block(c, 4) for c in (128, 20, 16, 18)] == [8, 4, 8, None]
    parts = [_pointwise_model(np.random.default_rng(cin + cout), cin, cout, hw, batch, residual)
             for cin, cout, hw, batch, residual in LANE_WEIGHT_CASES]
    # standard convs whose output rows are whole vectors: 3x3 over 12-pixel rows, a strided
    # 5x5 with asymmetric pads (rows of 8), both packed for the direct-conv tile
    convs = [conv_model(np.random.default_rng(k), in_channels=cin, out_channels=cout,
                        kernel=kernel, strides=strides, pads=pads, input_hw=hw)
             for k, (cin, cout, kernel, strides, pads, hw) in enumerate(
                 [(16, 24, (3, 3), (1, 1), (1, 1, 1, 1), (12, 12)),
                  (5, 16, (5, 5), (2, 2), (2, 1, 2, 1), (15, 17))])]
    host_lanes = cpu_knobs(HOST.tvm_target()).lanes
    for (model, shape), (cin, cout, (h, w), _, _) in zip(parts, LANE_WEIGHT_CASES):
        for target, expected in (
                (TARGETS["arm-neon"], lane_weight_block(cout, 4) is not None),
                # x86: only the channel-vectorized tile's packing (pixels off the vectors)
                (HOST.tvm_target(), (h * w) % host_lanes != 0
                 and cin > MAX_UNPACKED_POINTWISE_CHANNELS)):
            knobs = cpu_knobs(target)
            rewrite = PackConvWeights(knobs.lanes, knobs.accumulators,
                                      fma_by_lane=knobs.fma_by_lane)
            rewrite(import_onnx(model, {"x": shape}))
            assert rewrite.rewritten == int(expected), (cin, cout, str(target))
    parts += [(conv, (1, *[int(d.dim_value) for d in conv.graph.input[0].type.tensor_type
                           .shape.dim[1:]])) for conv in convs]
    model, shapes = _side_by_side(parts)
    mod = import_onnx(model, shapes)
    scheduled, applied = cpu_build.schedule_module(mod, TARGETS["arm-neon"])
    kernels = {name: rule for name, rule in applied.items() if "conv2d" in name}
    assert sorted(kernels.values()) == ["Conv2D"] * 2 + ["Pointwise"] * 4, applied
    packed = [name for name in kernels if "conv2d_packed" in name]
    assert len(packed) == 5, kernels
    for name in packed:
        # the weight copy: a block writing a global-scope buffer of one weight block (the
        # packed weight's last axis), that block copied by one vectorized loop
        func = scheduled[name]
        block = int(func.params[1].shape[-1])
        sch = tvm.s_tir.Schedule(func)
        copies = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                  if sch.get(b).name_hint.endswith("_global")]
        assert len(copies) == 1, func.script()
        inner = sch.get(sch.get_loops(copies[0])[-1])
        assert inner.kind == tvm.tirx.ForKind.VECTORIZED and int(inner.extent) == block, (
            name, inner.kind, inner.extent, block)
    for preset in ("arm-a53", "arm-a76"):
        target = resolve_target(preset)
        (tmp_path / preset).mkdir()
        library = export_library(build(mod, target), target, str(tmp_path / preset))
        rng = np.random.default_rng(5)
        inputs = [rng.standard_normal(shapes[v.name]).astype(np.float32)
                  for v in model.graph.input]
        outs = run_aarch64(library.path, inputs, qemu_cpu=target.qemu_cpu, runtime=runtime)
        for k, ((part, _), x, out) in enumerate(zip(parts, inputs, outs)):
            expected = run_onnx(part, {part.graph.input[0].name: x})[0]
            assert rel_error(out, expected) < 1e-5, (preset, k, rel_error(out, expected))


@pytest.mark.emulation
def test_neon_packs_short_pointwise_reductions_too(tmp_path, runtime):
    """NEON packs the pointwise convs with few input channels whose pixels are not whole
    vectors (7x7, 13x13; x86 leaves them pixel-vectorized): the channel-vectorized tile over
    short reductions (20 and 48 channels, a residual add) matches onnxruntime under qemu."""
    from dwsep_compiler.compile import export_library
    from dwsep_compiler.device.emulate import run_aarch64

    cases = [(20, 32, (7, 7), 1, False), (48, 48, (13, 13), 1, True)]
    parts = [_pointwise_model(np.random.default_rng(cin), cin, cout, hw, batch, residual)
             for cin, cout, hw, batch, residual in cases]
    model, shapes = _side_by_side(parts)
    mod = import_onnx(model, shapes)
    target = resolve_target("arm-a76")
    _, applied = cpu_build.schedule_module(mod, target.tvm_target())
    packed = [name for name, rule in applied.items()
              if "conv2d_packed" in name and rule == "Pointwise"]
    assert len(packed) == 2, applied
    library = export_library(build(mod, target), target, str(tmp_path))
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(shapes[v.name]).astype(np.float32) for v in model.graph.input]
    outs = run_aarch64(library.path, inputs, qemu_cpu=target.qemu_cpu, runtime=runtime)
    for (part, _), x, out in zip(parts, inputs, outs):
        expected = run_onnx(part, {part.graph.input[0].name: x})[0]
        assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("cin,cout,hw", [(20, 32, (7, 7)), (48, 48, (13, 13)), (256, 40, (3, 3)),
                                         (16, 64, (27, 27)), (3, 64, (31, 31))])
def test_neon_channel_tiles_take_their_pixels_from_vector_lanes(cin, cout, hw):
    """On NEON a pointwise channel tile of whole image rows, or of part of one, at least a
    vector of pixels, reads each reduction step's pixels as vectors (a copy of the step's
    pixels, vectorized: LLVM loads it straight from the input and multiplies by lane) instead
    of one broadcast load per pixel row, and the tile is chosen for it (27x27: 8 channels x 9
    pixels, not 16 x 3); 961 pixels (31x31) leave one-pixel tiles with their broadcasts; x86
    keeps them everywhere (its FMA broadcasts from memory)."""
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
    from dwsep_compiler.schedules.cpu.tiling import channel_tile, lane_pixels

    model, shape = _pointwise_model(np.random.default_rng(cin), cin, cout, hw)
    mod = import_onnx(model, {model.graph.input[0].name: shape})
    for target in (TARGETS["arm-neon"], TARGETS["x86-avx512"]):
        knobs = cpu_knobs(target)
        scheduled, applied = cpu_build.schedule_module(mod, target)
        convs = [n for n in applied if "conv2d" in n]
        assert len(convs) == 1, applied
        script = scheduled[convs[0]].script()
        source = re.search(r"def main\((\w+):", script).group(1)
        width = hw[1] if knobs.fma_by_lane else None
        _, rows = (channel_tile(hw[0] * hw[1], cout, knobs.lanes, knobs.accumulators, width)
                   or (0, 0))
        lanes = knobs.fma_by_lane and lane_pixels(rows, hw[1], knobs.lanes)
        assert lanes == (hw != (31, 31) and target is TARGETS["arm-neon"])  # the cases' intent
        if hw == (27, 27) and lanes:
            assert rows == 9, rows
        assert (f'T.sblock("{source}_global")' in script) == lanes, (target, rows, script)
        if lanes:
            assert applied[convs[0]] == "Pointwise" and "conv2d_packed" in convs[0], applied
            assert f"T.vectorized(T.int64({rows}))" in script, script


def test_packed_pointwise_tunable_rows_and_gating_digests():
    """The packed kernel's tunable space samples its pixel rows and every sample computes the
    same; the packed layout is [O/b, C, b]; the tuning gate still finds the layer's kernel by its
    OIHW weight."""
    from dwsep_compiler.passes.lowering.pack_weights import pack_weight
    from dwsep_compiler.schedules.cpu.pointwise import Pointwise
    from dwsep_compiler.tuning import gating
    from dwsep_compiler.tuning.tasks import legalized

    rng = np.random.default_rng(2)
    weight = rng.standard_normal((64, 24, 1, 1)).astype(np.float32)
    assert pack_weight(weight, 32).shape == (2, 24, 32)
    np.testing.assert_array_equal(pack_weight(weight, 32)[1, :, 5], weight[32 + 5, :, 0, 0])

    model, shape = _pointwise_model(rng, 96, 64, (7, 7))
    target = HOST.tvm_target()
    mod = legalized(import_onnx(model, {"x": shape}), target)
    func = next(f for gv, f in mod.functions_items() if "conv2d_packed" in gv.name_hint)
    args = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in func.params]
    expected = _run_prim_func(Pointwise().apply(func, target, False).mod["main"], args)
    decisions = set()
    # Random samples (two candidates here: 10 draws saw one of them alone about once in 500
    # runs); up to 64 draws, each checked, until both have run.
    for _ in range(64):
        sch = Pointwise().apply(func, target, True)
        samples = [inst for inst in sch.trace.insts if inst.kind.name == "SampleCategorical"]
        decisions.add(tuple(int(sch.trace.decisions[inst]) for inst in samples))
        np.testing.assert_allclose(_run_prim_func(sch.mod["main"], args), expected,
                                   rtol=1e-5, atol=1e-5)
        if len(decisions) > 1:
            break
    assert len(decisions) > 1, decisions

    onnx_weight = {t.name: t for t in model.graph.initializer}["W"]
    from onnx import numpy_helper

    wanted = gating.digest(numpy_helper.to_array(onnx_weight))
    calls = gating.kernel_calls(import_onnx(model, {"x": shape}), target)
    assert any(wanted in held for _, held in calls), "the packed kernel is not found by weight"


@pytest.mark.parametrize("cin,cout,hw,residual",
                         [(24, 32, (12, 12), False), (40, 40, (28, 28), True)])
def test_pointwise_tail_tile_matches_onnxruntime(cin, cout, hw, residual):
    """Whole pixel vectors read in place (9 or 49 on AVX-512, 18 or 98 on AVX2): tiles of three
    vectors, the last one a tail where three do not divide them (49, 98), through the epilogue;
    the output matches onnxruntime."""
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
    from dwsep_compiler.schedules.cpu.pointwise import Pointwise
    from dwsep_compiler.tuning.tasks import legalized

    model, shape = _pointwise_model(np.random.default_rng(cout), cin, cout, hw, 1, residual)
    mod = import_onnx(model, {"x": shape})
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert set(applied.values()) == {"Pointwise"}, applied
    lanes = cpu_knobs(HOST.tvm_target()).lanes
    if (hw[0] * hw[1]) % lanes == 0:  # whole vectors: three per row, maybe with a tail
        func = next(f for _, f in legalized(mod, HOST.tvm_target()).functions_items()
                    if isinstance(f, tvm.tirx.PrimFunc))
        splits = [[None if v is None else int(v) for v in list(inst.inputs)[1:]]
                  for inst in Pointwise().apply(func, HOST.tvm_target(), False).trace.insts
                  if inst.kind.name == "Split"]
        assert [None, 3, lanes] in splits, splits
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


# (in, out, kernel, strides, dilations, pads, hw): output rows of 7, 14, 5 and 10 pixels
# (not whole vectors); stride 2, dilation 2, asymmetric pads, a 1x7 kernel.
PACKED_CONV_CASES = [
    (16, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (14, 14)),
    (8, 32, (3, 3), (2, 2), (1, 1), (0, 1, 2, 0), (15, 14)),
    (5, 16, (1, 7), (1, 1), (1, 2), (0, 3, 0, 6), (9, 5)),
    (12, 64, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), (10, 10)),
]


@pytest.mark.parametrize("case", PACKED_CONV_CASES,
                         ids=lambda c: f"{c[0]}x{c[1]}k{c[2][0]}x{c[2][1]}s{c[3][0]}")
def test_standard_conv_without_whole_row_vectors_runs_on_packed_weights(case):
    """A standard conv whose output rows are not whole vectors: weights packed into
    [O/b, C, kh, kw, b], the channel-vectorized tile over the padded input, bias + ReLU fused;
    the output matches onnxruntime."""
    from dwsep_compiler.passes.lowering.pack_weights import PackConvWeights, pack_weight
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    model, shape, _ = _model((*case, 1))
    knobs = cpu_knobs(HOST.tvm_target())
    mod = import_onnx(model, {"x": shape})
    rewrite = PackConvWeights(knobs.lanes, knobs.accumulators)
    rewrite(mod)
    assert rewrite.rewritten == 1
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    packed = [name for name in applied if "conv2d_packed" in name]
    assert len(packed) == 1 and applied[packed[0]] == "Conv2D" and "relu" in packed[0], applied
    weight = np.random.default_rng(0).standard_normal((case[1], case[0], *case[2]))
    packed = pack_weight(weight, 16)  # [O/16, C, kh, kw, 16]
    np.testing.assert_array_equal(packed[-1, :, :, :, 3], weight[-16 + 3])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


def _depthwise_model(channels, hw, kernel, multiplier, stride):
    """A depthwise Conv (no bias), padded kernel // 2 on every side but one more at the right."""
    from onnx import helper, numpy_helper

    from helpers import make_model

    rng = np.random.default_rng(channels)
    w = numpy_helper.from_array(
        rng.standard_normal((channels * multiplier, 1, kernel, kernel)).astype(np.float32), "W")
    pad = kernel // 2
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], group=channels, strides=[stride, stride],
                          pads=[pad, pad, pad, pad + 1])],
        [helper.make_tensor_value_info("x", 1, [1, channels, *hw])],
        [helper.make_tensor_value_info("y", 1, None)], [w])
    return model, (1, channels, *hw)


def _scheduled_depthwise(mod):
    from dwsep_compiler.schedules.cpu.depthwise import Depthwise
    from dwsep_compiler.tuning.tasks import legalized

    func = next(f for _, f in legalized(mod, HOST.tvm_target()).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc))
    return Depthwise().apply(func, HOST.tvm_target(), False).mod["main"]


@pytest.mark.parametrize("vectors,extra", [(2, 0), (3, 0), (2, 3)])
def test_depthwise_builds_padded_rows_with_whole_vector_copies(vectors, extra):
    """Rows of whole vectors (2 or 3 registers wide): the padded rows are zero-filled, then the
    in-bound rows copied without a per-element condition (LLVM scalarized that copy: as slow
    as the conv at 112x112); rows ending in a partial vector keep the conditional copy. The
    output matches onnxruntime either way (the model pads one more column at the right)."""
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    lanes = cpu_knobs(HOST.tvm_target()).lanes
    model, shape = _depthwise_model(6, (10, vectors * lanes + extra), 3, 2, stride=1)
    mod = import_onnx(model, {"x": shape})
    script = _scheduled_depthwise(mod).script()
    before, copy = script.split('T.sblock("pad_temp")')
    copy = copy[:copy.index("group_conv2d_nchw")]
    if extra == 0:
        # the copy's innermost loop: whole vectors
        loop = [line for line in before.splitlines() if line.strip().startswith("for ")][-1]
        assert 'T.sblock("pad_temp_pad_const")' in before and "if_then_else" not in copy, script
        assert re.search(rf"T\.vectorized\((?:T\.int64\()?{lanes}\)", loop), loop
    else:
        assert "pad_const" not in script and "if_then_else" in copy, script
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("channels,hw,kernel,multiplier",
                         [(16, (14, 17), 3, 1), (3, (23, 22), 7, 2)])
def test_strided_depthwise_reads_deinterleaved_columns(channels, hw, kernel, multiplier):
    """Stride 2 depthwise (odd and even padded widths, depth multiplier 2): the padded plane is
    stored as two column phases (a 5-D buffer) and the output matches onnxruntime."""
    model, shape = _depthwise_model(channels, hw, kernel, multiplier, stride=2)
    mod = import_onnx(model, {"x": shape})
    scheduled = _scheduled_depthwise(mod)
    pads = [b for b in scheduled.body.block.alloc_buffers if b.name == "pad_temp"]
    assert pads and len(pads[0].shape) == 5, pads
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("target", ["host", "arm-neon"])
@pytest.mark.parametrize("kernel", [3, 7])
def test_strided_depthwise_copies_whole_chunks_into_its_phases(target, kernel):
    """Stride 2, rows of whole chunks (2 x lanes columns), pads kernel // 2 (odd: the phases
    swap): the phase planes are zero-filled, then each chunk of an input row is staged (one
    vectorized 2 x lanes copy) and split into its phases without a bounds test. The host
    library matches onnxruntime (NEON's: the qemu test, CASES' 16-wide stride-2 conv)."""
    from dwsep_compiler.schedules.cpu.depthwise import Depthwise
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
    from dwsep_compiler.tuning.tasks import legalized

    tvm_target = HOST.tvm_target() if target == "host" else TARGETS[target]
    lanes = cpu_knobs(tvm_target).lanes
    model, shape = _depthwise_model(5, (9, 4 * lanes), kernel, 2, stride=2)
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "pads":
            attribute.ints[:] = [kernel // 2] * 4
    mod = import_onnx(model, {"x": shape})
    func = next(f for _, f in legalized(mod, tvm_target).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc))
    script = Depthwise().apply(func, tvm_target, False).mod["main"].script()
    assert 'T.sblock("pad_temp_pad_const")' in script, script
    before_stage, after_stage = script.split('T.sblock("x_global")')
    copy_loops, copy = after_stage.split('T.sblock("pad_temp")')
    # the chunk staged by one vectorized copy, split into the phases lane by lane, no test
    stage_loop = [line for line in before_stage.splitlines() if line.strip().startswith("for ")][-1]
    assert f"T.vectorized(T.int64({2 * lanes}))" in stage_loop, script
    copy = copy[:copy.index("group_conv2d_nchw")]
    assert "if_then_else" not in copy and "x_global[" in copy, copy
    assert f"T.vectorized(T.int64({lanes}))" in copy_loops, copy_loops
    if target == "host":
        x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
        out = run_widths(mod, [x])[0]
        assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("channels,hw,multiplier,stride,bands",
                         [(3, (32, 20), 2, 1, 4), (5, (31, 16), 1, 2, 2), (5, (33, 16), 1, 2, 1)])
def test_depthwise_bands_of_rows_spread_over_the_cores(channels, hw, multiplier, stride, bands):
    """Output rows in bands (8 rows where 8 divides them; 17 rows stay whole): channels x bands
    form the parallel loop, each band builds its own padded rows (halo included); the output
    matches onnxruntime."""
    model, shape = _depthwise_model(channels, hw, 3, multiplier, stride)
    mod = import_onnx(model, {"x": shape})
    parallel = [int(n) for n in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)",
                                           _scheduled_depthwise(mod).script())]
    assert parallel == [channels * bands], parallel
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


# (rows, K, N): 1000 classes (8-wide vectors on AVX-512, whole ones on AVX2/NEON), 10 classes,
# an odd N with no power-of-two factor, batch 2 and 3; K too short to split (100), batch 2
# split. On NEON (packed weights): row blocks of 15 and 16 rows, tiles of 8 and 16 columns.
DENSE_CASES = [(1, 300, 1000), (2, 64, 10), (3, 37, 1001), (1, 128, 40), (1, 100, 64),
               (2, 256, 48)]


def _dense_model(rows, k, n):
    """Gemm (transB) + bias + Relu, ``rows x k -> rows x n``."""
    from onnx import helper, numpy_helper

    from helpers import make_model

    rng = np.random.default_rng(n)
    w = numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", 1, [rows, k])],
                      [helper.make_tensor_value_info("y", 1, [rows, n])], [w, b])


@pytest.mark.parametrize("rows,k,n", DENSE_CASES, ids=lambda c: str(c))
def test_dense_layers_stream_the_weight_and_match_onnxruntime(rows, k, n):
    """Gemm (transB) + bias + Relu: the Dense rule takes it, with the bias and ReLU in the same
    kernel, vectors no wider than a register that divide an even N, and the output matches
    onnxruntime whatever N's factors. Where K has enough rows per core (300 and 128 on 2 cores),
    the reduction is split: each core sums its own contiguous run of weight rows into a partial
    row (one parallel loop over the cores, a partial buffer per core), blocks of rows by
    vectors at a time; otherwise output tiles run in parallel."""
    from dwsep_compiler.schedules.analysis import largest_divisor
    from dwsep_compiler.schedules.cpu.dense import MIN_ROWS_PER_CORE, ROW_BLOCK, VECTOR_BLOCK
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    rng = np.random.default_rng(n)
    model = _dense_model(rows, k, n)
    mod = import_onnx(model, {"x": (rows, k)})
    scheduled, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    dense = [name for name, rule in applied.items() if rule == "Dense"]
    assert len(dense) == 1 and "relu" in dense[0], applied
    script = scheduled[dense[0]].script()
    cores = cpu_knobs(HOST.tvm_target()).cores
    parallel = [int(p) for p in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)", script)]
    splits = largest_divisor(k, cores)  # one contiguous run of rows per core
    split = splits > 1 and k >= MIN_ROWS_PER_CORE * splits
    partials = re.findall(r"(\w+_rf) = T\.sblock_alloc_buffer\(\((?:T\.int64\()?(\d+)", script)
    if split:
        assert parallel == [splits] and [int(c) for _, c in partials] == [splits], script
        # Partial sums kept in registers: ROW_BLOCK weight rows (a divisor of the core's run)
        # by VECTOR_BLOCK vectors per pass, both unrolled (the zeroing unrolls the vectors).
        vector = int(re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", script)[0])
        rows_per_pass = largest_divisor(k // splits, ROW_BLOCK)
        vectors = largest_divisor(n // vector, VECTOR_BLOCK)
        unrolled = [int(u) for u in re.findall(r"T\.unroll\((?:T\.int64\()?(\d+)", script)]
        assert unrolled == [vectors, rows_per_pass, vectors], (unrolled, script)
    else:
        assert not partials and len(parallel) == 1, script
    if n % 2 == 0:  # vectors no wider than a register, dividing N (1000: 8 lanes on AVX-512)
        lanes = cpu_knobs(HOST.tvm_target()).lanes
        widths = [int(w) for w in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)",
                                              scheduled[dense[0]].script())]
        assert widths and all(w <= lanes and n % w == 0 for w in widths), widths
    x = rng.standard_normal((rows, k)).astype(np.float32)
    out = run_widths(mod, [x])[0]
    expected = run_onnx(model, {"x": x})[0]
    assert np.count_nonzero(expected) > expected.size // 4
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("rows,k,n", DENSE_CASES, ids=lambda c: str(c))
def test_dense_weights_are_packed_in_tiles_on_neon_only(rows, k, n):
    """On NEON a dense layer's weight becomes ``[K/R, N/C, R, C]`` tiles (`pack_dense`): a pass
    of the split reduction reads one contiguous tile (R rows of C columns, within the reach
    of a load pair), the rule's row block and vectors per pass are the tile's; matmuls whose
    columns are no whole vectors stay row-major. x86 builds keep the row-major weight."""
    from dwsep_compiler.schedules.analysis import largest_divisor
    from dwsep_compiler.schedules.cpu.dense import MIN_ROWS_PER_CORE, packed_dense_tile
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    mod = import_onnx(_dense_model(rows, k, n), {"x": (rows, k)})
    scheduled, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert not any(names.PACKED_DENSE in name for name in applied), applied
    neon = TARGETS["arm-neon"]
    scheduled, applied = cpu_build.schedule_module(mod, neon)
    dense = [name for name, rule in applied.items() if rule == "Dense"]
    assert len(dense) == 1, applied
    tile = packed_dense_tile(rows, k, n, cpu_knobs(neon).lanes)
    assert (names.PACKED_DENSE in dense[0]) == (tile is not None), (dense, tile)
    if tile is None:
        return
    r, c = tile
    script = scheduled[dense[0]].script()
    shape = ", ".join(f"T.int64({d})" for d in (k // r, n // c, r, c))
    assert f"T.Buffer(({shape})" in script, script
    splits = largest_divisor(k // r, cpu_knobs(neon).cores)
    if splits > 1 and k >= MIN_ROWS_PER_CORE * splits:
        unrolled = [int(u) for u in re.findall(r"T\.unroll\((?:T\.int64\()?(\d+)", script)]
        assert unrolled == [c // 4, r, c // 4], (unrolled, script)
    else:  # output tiles: the reduction still walks row blocks (tile indices without divisions)
        assert f"for k_0, k_1, i in T.grid(T.int64({k // r}), T.int64({r})" in script, script


@pytest.mark.parametrize("cin,hw,bands", [(64, (16, 48), 2), (8, (16, 48), 16), (48, (17, 60), 17)])
def test_fused_kernel_builds_padded_rows_per_band_where_they_overflow_l1(cin, hw, bands):
    """The fused DW+PW kernel: where one output row's padded input rows (all channels) exceed
    32 KB (64 channels x 3 rows x 50 columns), bands of 8 output rows share them; 8 channels
    stay one row per iteration, and so do 17 rows (no band of 5-8 rows divides them). The
    parallel loop says which; the output matches onnxruntime."""
    model, shape, rank = _model((cin, 16, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), hw, 1))
    model = factorize_onnx(model, {"x": shape}, RankPolicy(rank=rank, force=True)).model
    mod = import_onnx(model, {"x": shape})
    scheduled, applied = cpu_build.schedule_module(mod, HOST.tvm_target(), fuse="always")
    fused = [name for name, rule in applied.items() if rule == "FusedDepthwisePointwise"]
    assert len(fused) == 1, applied
    parallel = [int(n) for n in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)",
                                           scheduled[fused[0]].script())]
    assert parallel == [bands], parallel
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x], fuse="always")[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


def test_fused_kernel_keeps_each_depthwise_sum_in_a_register_across_the_taps():
    """In the fused DW+PW kernel, the loops between the 3x3 taps and the vector lanes are all
    unrolled (taps x the row tile's vectors): a rolled vector loop stored and reloaded each
    sum at every tap (1.5x slower at 64x224x224, a store-forwarding stall on AVX-512). The
    depthwise output is built for the whole row (all channels x 64 columns) and the GEMM runs
    channel blocks outside the row's segments, so each tile's output rows are written along
    the image row (segments outside channel blocks: 1.1-1.4x slower at 224x224). The output
    matches onnxruntime."""
    model, shape, rank = _model((16, 16, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (8, 64), 1))
    model = factorize_onnx(model, {"x": shape}, RankPolicy(rank=rank, force=True)).model
    mod = import_onnx(model, {"x": shape})
    scheduled, applied = cpu_build.schedule_module(mod, HOST.tvm_target(), fuse="always")
    fused = [name for name, rule in applied.items() if rule == "FusedDepthwisePointwise"]
    assert len(fused) == 1, applied
    script = scheduled[fused[0]].script()
    head = script.split('T.sblock("depthwise_update")')[0]
    loops = re.findall(r"for [\w, ]+ in (T\.\w+|range)\(", head)
    assert loops[-4:] == ["T.unroll", "T.unroll", "T.unroll", "T.vectorized"], loops
    assert re.search(r"depthwise = T\.sblock_alloc_buffer\(\((?:T\.int64\(\d+\), ){3}"
                     r"T\.int64\(64\)\)", script), script
    gemm = re.findall(r"for (\w+), (\w+) in T\.grid\(", script.split('"pointwise_init"')[0])[-1]
    assert gemm[0].startswith("n") and gemm[1].startswith("x"), gemm  # channel blocks outside
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x], fuse="always")[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("hw,staged", [((16, 16), True), ((32, 24), True), ((28, 28), False)])
def test_pointwise_stages_input_rows_that_alias_in_l1(hw, staged):
    """Input rows 1 KB or 3 KB apart (16x16 and 32x24 pixels: 48 rows over 4 L1 set offsets)
    are copied per pixel tile into a contiguous buffer before the channel blocks read them,
    exactly the tile's pixels even where the tile crosses image rows (24 wide); 28x28 rows
    (3136 B apart, 64 offsets) are read in place. The output matches onnxruntime either way."""
    model, shape = _pointwise_model(np.random.default_rng(5), 48, 128, hw)
    mod = import_onnx(model, {"x": shape})
    scheduled, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    name = next(name for name, rule in applied.items() if rule == "Pointwise")
    script = scheduled[name].script()
    assert ("_global = T.sblock_alloc_buffer" in script) == staged, script
    if staged:  # one flat pixel axis, the copy's vector as wide as the GEMM tile's pixels
        assert re.search(r"\w+_global\[v0, v1, v2\] = ", script), script
        tiles = [int(n) for n in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)", script)]
        widths = [int(n) for n in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", script)]
        assert len(tiles) == 1 and widths[0] * tiles[0] == hw[0] * hw[1], (tiles, widths)
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("kind", ["1x1", "3x3"])
def test_channel_tile_reduces_in_k_blocks_and_its_space_stays_correct(kind):
    """More input channels than one K block (320 = 2.5 x 128; 1024 output channels: enough
    channel blocks for 8 cores): the channel tile reduces in K blocks (the input channels split
    by 80, the largest divisor <= K_BLOCK), its parallel loop runs the channel blocks alone, and
    the output matches onnxruntime; sampled K blocks compute the same."""
    from dwsep_compiler.schedules.cpu.packed import K_BLOCK
    from dwsep_compiler.schedules.cpu.pointwise import Pointwise
    from dwsep_compiler.schedules.cpu.conv2d import Conv2D
    from dwsep_compiler.tuning.tasks import legalized

    cin, cout = 320, 1024
    if kind == "1x1":
        model, shape = _pointwise_model(np.random.default_rng(9), cin, cout, (7, 7))
        rule = Pointwise()
    else:
        model, shape, _ = _model((cin, cout, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (7, 7), 1))
        rule = Conv2D()
    target = HOST.tvm_target()
    mod = import_onnx(model, {"x": shape})
    func = next(f for gv, f in legalized(mod, target).functions_items()
                if "conv2d_packed" in gv.name_hint)
    sch = rule.apply(func, target, False)
    splits = [[None if v is None else int(v) for v in list(inst.inputs)[1:]]
              for inst in sch.trace.insts if inst.kind.name == "Split"]
    assert [None, max(d for d in range(1, K_BLOCK + 1) if cin % d == 0)] in splits, splits
    block = int(func.params[1].shape[-1])
    parallel = [int(n) for n in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)",
                                           sch.mod["main"].script())]
    assert cout // block in parallel, (parallel, block)
    rng = np.random.default_rng(3)
    args = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in func.params]
    expected = _run_prim_func(sch.mod["main"], args)
    for _ in range(3):
        np.testing.assert_allclose(_run_prim_func(rule.apply(func, target, True).mod["main"], args),
                                   expected, rtol=1e-4, atol=1e-4)
    x = rng.standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


# (op, kernel, strides, pads, extra attributes, input hw): VGG's 2x2/2, ResNet's padded 3x3/2,
# odd sizes, ceil mode, an average pool with and without the pad counted.
POOL_CASES = [
    ("MaxPool", (2, 2), (2, 2), (0, 0, 0, 0), {}, (16, 18)),
    ("MaxPool", (3, 3), (2, 2), (1, 1, 1, 1), {}, (15, 17)),
    ("MaxPool", (3, 3), (2, 2), (0, 0, 0, 0), {"ceil_mode": 1}, (14, 14)),
    ("AveragePool", (3, 3), (1, 1), (1, 1, 1, 1), {"count_include_pad": 0}, (9, 11)),
    ("AveragePool", (2, 3), (2, 1), (0, 1, 1, 0), {"count_include_pad": 1}, (10, 7)),
    ("AveragePool", (3, 3), (2, 2), (1, 1, 1, 1), {"count_include_pad": 0}, (13, 16)),
    ("MaxPool", (2, 2), (2, 2), (0, 0, 0, 0), {}, (6, 40)),  # rows of 20: left to the vectorizer
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[0]}{c[1][0]}x{c[1][1]}@{c[5][0]}x{c[5][1]}")
def test_pools_run_a_row_per_step_and_match_onnxruntime(case):
    """Windowed pools get the Pool rule: output rows (n, c, oh) over the cores, the window
    unrolled around the loop over the output columns (on NEON a row shorter than LLVM's loop
    vectorizer takes, unrolled too); padding read in place, averaging per row.
    A window strided along W over padding runs bands of rows instead, each band's padded rows
    built first. The output matches onnxruntime (after a conv, so that pooling sees negative
    values)."""
    from dwsep_compiler.schedules.analysis import largest_divisor
    from dwsep_compiler.schedules.cpu.pool import SHORT_ROW
    from dwsep_compiler.schedules.cpu.tiling import BAND_ROWS
    from onnx import helper

    op, kernel, strides, pads, attrs, hw = case
    conv = conv_model(np.random.default_rng(8), in_channels=5, out_channels=6, input_hw=hw,
                      batch=2)
    graph = conv.graph
    relu = graph.node[-1]
    graph.node.remove(relu)  # pool the conv's output directly: negative values included
    graph.node.append(helper.make_node(op, [relu.input[0]], ["pooled"], kernel_shape=list(kernel),
                                       strides=list(strides), pads=list(pads), **attrs))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("pooled", 1, None))
    shape = (2, 5, *hw)
    mod = import_onnx(conv, {"x": shape})
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    expected = run_onnx(conv, {"x": x})[0]
    columns = expected.shape[3]
    banded = (any(pads) or attrs.get("ceil_mode")) and strides[1] > 1  # ceil mode pads too
    band = largest_divisor(expected.shape[2], BAND_ROWS) if banded else 1
    for target in (HOST.tvm_target(), TARGETS["arm-neon"]):
        scheduled, applied = cpu_build.schedule_module(mod, target)
        pools = [name for name, rule in applied.items() if "pool" in name]
        assert pools and all(applied[name] == "Pool" for name in pools), applied
        script = scheduled[pools[0]].script()
        rows = [int(n) for n in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)", script)]
        unrolled = [int(n) for n in re.findall(r"T\.unroll\((?:T\.int64\()?(\d+)", script)]
        # the window unrolled (init decomposed out of it); on NEON inside its row where the row
        # is too short for LLVM's loop vectorizer
        short = columns < SHORT_ROW and target is TARGETS["arm-neon"]
        assert unrolled == ([columns] if short else []) + list(kernel), (str(target), unrolled)
        assert rows == [2 * 6 * expected.shape[2] // band], rows
    out = run_widths(mod, [x])[0]
    assert out.shape == expected.shape
    assert rel_error(out, expected) < 1e-6


def _plane_model(op, hw):
    """x (1, 4, H, W) -> ``"concat"``: Concat(Relu(x), Neg(x)) on channels (every buffer
    indexed by the plane's own rows and columns), ``"slice"``: columns 1..W-1 of x (the
    input's rows are longer than the output's), or ``"silu"``: SiLU of 60 x (a standard
    normal input then saturates the fast sigmoid at both ends)."""
    from onnx import helper, numpy_helper

    from helpers import make_model

    shape = (1, 4, *hw)
    if op == "concat":
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["n"]),
                 helper.make_node("Concat", ["r", "n"], ["y"], axis=1)]
        inits = []
    elif op == "silu":
        nodes = [helper.make_node("Mul", ["x", "k"], ["m"]),
                 helper.make_node("Sigmoid", ["m"], ["s"]),
                 helper.make_node("Mul", ["m", "s"], ["y"])]
        inits = [numpy_helper.from_array(np.array(60.0, np.float32), "k")]
    else:
        nodes = [helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])]
        inits = [numpy_helper.from_array(np.array(v, np.int64), n)
                 for n, v in (("s", [1]), ("e", [hw[1]]), ("a", [3]))]
    return make_model(nodes, [helper.make_tensor_value_info("x", 1, list(shape))],
                      [helper.make_tensor_value_info("y", 1, None)], inits), shape


@pytest.mark.parametrize("op,hw", [("concat", (15, 15)), ("concat", (7, 7)), ("concat", (8, 8)),
                                   ("slice", (15, 15))])
def test_neon_runs_short_row_planes_flat(op, hw):
    """On NEON an injective kernel whose rows are no whole vectors (15, 7 columns) and whose
    buffers are all indexed by its own plane (a channel concat) runs each plane as one flat
    loop: whole vectors, then a scalar tail; a slice (longer input rows), rows of whole vectors
    (8) and x86 keep their row loops. The outputs are checked under qemu in
    `test_neon_rules_match_onnxruntime_on_the_same_odd_shapes_under_qemu`."""
    model, shape = _plane_model(op, hw)
    mod = import_onnx(model, {"x": shape})
    for target in (TARGETS["arm-neon"], TARGETS["x86-avx2"]):
        scheduled, applied = cpu_build.schedule_module(mod, target)
        fallback = [n for n, rule in applied.items() if rule == "Fallback"]
        assert len(fallback) == 1, applied
        script = scheduled[fallback[0]].script()
        vectorized = [int(v) for v in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", script)]
        plane = hw[0] * hw[1]
        flat = op == "concat" and hw[1] % 4 and target is TARGETS["arm-neon"]
        # the flat plane: a loop of plane // 4 vectors over the fused rows and columns, then
        # the plane % 4 elements left as a loop of their own
        body = re.search(rf"in range\(T\.int64\({plane // 4}\)\):\s+for \w+ in "
                         r"T\.vectorized\(T\.int64\(4\)\)", script)
        tail = f"in range(T.int64({plane - plane % 4}), T.int64({plane}))" in script
        assert bool(body) == bool(tail) == bool(flat), script
        if not flat and hw[1] % 4:
            assert not vectorized or target is TARGETS["x86-avx2"], script


def _side_by_side(parts):
    """One ONNX graph holding every ``(model, input shape)`` part side by side (names prefixed
    ``p<k>_``): one library, one emulated run for all of them."""
    from onnx import compose, helper

    from helpers import make_model

    nodes, inputs, outputs, inits, shapes = [], [], [], [], {}
    for k, (model, shape) in enumerate(parts):
        part = compose.add_prefix(model, f"p{k}_")
        nodes += part.graph.node
        inputs += part.graph.input
        outputs += [helper.make_empty_tensor_value_info(o.name) for o in part.graph.output]
        inits += part.graph.initializer
        shapes[part.graph.input[0].name] = shape
    return make_model(nodes, inputs, outputs, inits), shapes


def _neon_parts():
    """The odd shapes of the x86 rule tests: standard and factorized convs of CASES (channels
    off the 4 lanes, stride 2, dilation, asymmetric pads, 1x7 / 7x1), the grouped convs, the
    packed pointwise and packed standard convs, the dense layers (packed or not), the
    injective planes and a saturating SiLU (the fast sigmoid's NEON code); a depthwise conv
    whose tile holds both outputs of each channel, a one-channel conv on the depthwise rule."""
    standard, factorized = [], []
    for case in CASES:
        model, shape, rank = _model(case)
        standard.append((model, shape))
        factorized.append((factorize_onnx(model, {"x": shape},
                                          RankPolicy(rank=rank, force=True)).model, shape))
    grouped = []
    for cin, cout, group, kernel, strides, pads, hw in GROUPED:
        grouped.append((conv_model(np.random.default_rng(cin + cout), in_channels=cin,
                                   out_channels=cout, kernel=kernel, strides=strides, pads=pads,
                                   input_hw=hw, group=group), (1, cin, *hw)))
    packed = [_pointwise_model(np.random.default_rng(c[0]), *c) for c in PACKED_CASES]
    packed += [_model((*case, 1))[:2] for case in PACKED_CONV_CASES]
    dense = [(_dense_model(*case), case[:2]) for case in DENSE_CASES]
    planes = [_plane_model(op, hw) for op, hw in (("concat", (15, 15)), ("concat", (7, 9)),
                                                 ("slice", (15, 15)), ("silu", (8, 12)))]
    grouped += [_shared_depthwise_model(), _one_channel_conv_model()]
    return {"fuse=False": standard + factorized + grouped + packed + dense + planes,
            "fuse=always": factorized}


@pytest.mark.emulation
@pytest.mark.parametrize("preset", ["arm-a53", "arm-a76"])
def test_neon_rules_match_onnxruntime_on_the_same_odd_shapes_under_qemu(preset, tmp_path,
                                                                          runtime):
    """NEON code of every rule (4 lanes, 32 registers: other tiles, tails and packing choices
    than x86's), run on the preset's emulated core, each part against onnxruntime."""
    from dwsep_compiler.compile import export_library
    from dwsep_compiler.device.emulate import run_aarch64

    target = resolve_target(preset)
    for label, parts in _neon_parts().items():
        fuse = "always" if label == "fuse=always" else False
        model, shapes = _side_by_side(parts)
        mod = import_onnx(model, shapes)
        _, applied = cpu_build.schedule_module(mod, target.tvm_target(), fuse=fuse)
        expected_rules = ({"FusedDepthwisePointwise"} if fuse else
                          {"Conv2D", "Depthwise", "Pointwise", "Dense"})
        assert expected_rules <= set(applied.values()), applied
        assert "Fallback" not in {r for n, r in applied.items() if "conv2d" in n}, applied
        (tmp_path / label).mkdir()
        library = export_library(build(mod, target, fuse=fuse), target, str(tmp_path / label))
        rng = np.random.default_rng(4)
        inputs = [rng.standard_normal(shapes[v.name]).astype(np.float32)
                  for v in model.graph.input]
        outs = run_aarch64(library.path, inputs, qemu_cpu=target.qemu_cpu, runtime=runtime)
        assert len(outs) == len(parts)
        for k, ((part, _), x, out) in enumerate(zip(parts, inputs, outs)):
            expected = run_onnx(part, {part.graph.input[0].name: x})[0]
            assert rel_error(out, expected) < 1e-5, (label, k, rel_error(out, expected))


def test_a_rule_that_raises_falls_through_and_is_recorded(monkeypatch):
    """A rule's bug must not fail the build: the next rule schedules the PrimFunc, the error is
    recorded per PrimFunc (and the library still matches onnxruntime)."""
    from dwsep_compiler.schedules import cpu

    class Broken:
        def apply(self, func, target, tunable):
            raise RuntimeError("planted")

    real = cpu.rules
    monkeypatch.setattr(cpu, "rules", lambda: [Broken(), *real()])
    model, shape, rank = _model(CASES[0])
    mod = import_onnx(model, {"x": shape})
    failures = {}
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target(), failures=failures)
    assert failures and all(m == "Broken: RuntimeError: planted" for m in failures.values())
    assert set(failures) == set(applied) and "Conv2D" in applied.values(), (failures, applied)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    out = run_executable(build(mod, HOST), [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


@pytest.mark.parametrize("target,rows", [("arm-neon", 7), ("x86-avx512", 7), ("x86-avx2", 1)])
def test_depthwise_register_tile_holds_several_output_rows(target, rows):
    """With 32 vector registers a 3x3 depthwise conv at 28x28 (bands of 7 rows) keeps 7 output
    rows in registers, the taps outside them (one load of an input row at a tap serves every
    row reading it); with 16 (AVX2) one row. Outputs: the awkward-shape tests (x86) and the
    qemu test (NEON) run the same rule."""
    from dwsep_compiler.schedules.cpu.depthwise import register_tile
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    model = conv_model(np.random.default_rng(0), in_channels=16, out_channels=16, kernel=(3, 3),
                       pads=(1, 1, 1, 1), input_hw=(28, 28))
    model = factorize_onnx(model, {"x": (1, 16, 28, 28)}, RankPolicy(rank=1, force=True)).model
    scheduled, applied = cpu_build.schedule_module(import_onnx(model, {"x": (1, 16, 28, 28)}),
                                                   TARGETS[target])
    [name] = [n for n, rule in applied.items() if rule == "Depthwise"]
    taps_then_rows = re.search(r"in T\.unroll\(T\.int64\(3\)\):\s+for \w+ in T\.unroll\("
                               r"T\.int64\(3\)\):\s+for \w+ in T\.unroll\(T\.int64\(7\)\)",
                               scheduled[name].script())
    assert bool(taps_then_rows) == (rows == 7), scheduled[name].script()
    assert register_tile(7, 7, 1, cpu_knobs(TARGETS[target]))[1] == rows


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_depthwise_register_tile_holds_every_output_of_a_channel(target):
    """With 32 vector registers the r outputs of a depth multiplier (all reading the same
    input channel) share the register tile where that still leaves 2 rows: the loads of an
    input row at a tap serve both outputs (3x3, 4 rows x 2 outputs: 18 loads per 72 FMAs,
    against 30 per 72 with 8 rows of one output). Bands of 7 rows keep one output (7 x 2
    accumulators spilled), as does AVX2 (16 registers: one row). Outputs: every x86 width
    here, NEON in the qemu test (its `_neon_parts` hold this model)."""
    from dwsep_compiler.schedules.cpu.depthwise import register_tile
    from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

    knobs = cpu_knobs(TARGETS[target])
    shares = target != "x86-avx2"
    assert register_tile(8, 20, 4, knobs, 2) == ((2, 4, 1) if shares else (1, 1, 4))
    assert register_tile(8, 20, 4, knobs, 3)[:2] == ((3, 4) if shares else (1, 1))
    assert register_tile(7, 7, 1, knobs, 2)[0] == 1 and register_tile(8, 8, 1, knobs, 8)[0] == 1
    model, shape = _shared_depthwise_model()
    mod = import_onnx(model, {"x": shape})
    scheduled, applied = cpu_build.schedule_module(mod, TARGETS[target])
    [name] = [n for n, rule in applied.items() if rule == "Depthwise"]
    taps_then_outputs = re.search(r"in T\.unroll\(T\.int64\(3\)\):\s+for \w+ in T\.unroll\("
                                  r"T\.int64\(2\)\):\s+for \w+ in T\.unroll\(T\.int64\(4\)\)",
                                  scheduled[name].script())
    assert bool(taps_then_outputs) == shares, scheduled[name].script()
    if target == "x86-avx512":  # (run_widths runs AVX2 too)
        x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
        assert rel_error(run_widths(mod, [x])[0], run_onnx(model, {"x": x})[0]) < 1e-5


def _one_channel_conv_model():
    """A grayscale input's first conv, factorized: 1 -> 2 channels, 3x3 stride 2 (ddddocr's,
    at a smaller size)."""
    return conv_model(np.random.default_rng(10), in_channels=1, out_channels=2, kernel=(3, 3),
                      strides=(2, 2), pads=(1, 1, 1, 1), input_hw=(32, 48)), (1, 1, 32, 48)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_one_channel_conv_runs_on_the_depthwise_rule(target):
    """A conv of a one-channel input is depthwise (r = its outputs), though TVM legalizes it
    as a plain conv2d: it runs on the depthwise rule (its strided planes, its register tile),
    not on the standard conv rule, which gathered a strided conv's columns lane by lane
    (ddddocr's at 64 x 160, emulated A76: 127K -> 33K instructions). A one-channel conv the
    weight packing took stays packed; several input channels stay standard. Outputs: every
    x86 width against onnxruntime here, NEON in the qemu test (`_neon_parts`)."""
    model, shape = _one_channel_conv_model()
    mod = import_onnx(model, {"x": shape})
    _, applied = cpu_build.schedule_module(mod, TARGETS[target])
    assert sorted(applied.values()) == ["Depthwise"], applied
    three, three_shape = _model((3, 4, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), (16, 16), 1))[:2]
    _, applied = cpu_build.schedule_module(import_onnx(three, {"x": three_shape}),
                                           TARGETS[target])
    assert "Depthwise" not in applied.values(), applied
    if target == "x86-avx512":  # (run_widths runs AVX2 too)
        x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
        assert rel_error(run_widths(mod, [x])[0], run_onnx(model, {"x": x})[0]) < 1e-5


def _shared_depthwise_model():
    """8 channels x 2 at 16 x 20 (bands of 8 rows), bias + ReLU."""
    return conv_model(np.random.default_rng(8), in_channels=8, out_channels=16, group=8,
                      kernel=(3, 3), pads=(1, 1, 1, 1), input_hw=(16, 20)), (1, 8, 16, 20)


@pytest.mark.parametrize("target,hw,outer_loops", [("arm-neon", (14, 14), 3),
                                                   ("arm-neon", (32, 32), 2),
                                                   ("x86-avx512", (28, 28), 3),
                                                   ("x86-avx2", (14, 14), 3)])
def test_depthwise_epilogue_runs_in_the_register_tile(target, hw, outer_loops):
    """A depthwise conv's epilogue (here bias + ReLU; at 14 columns on NEON and AVX2 also the
    slice of the rows widened to whole vectors) is computed inside the register tile, not
    after the band: the accumulators go through it straight to the output, and the conv's
    intermediate is one tile (a band's, over TVM's 1 KB stack limit, was taken from the
    workspace pool on every band). Outputs: every width against onnxruntime."""
    shape = (1, 16, *hw)
    model = conv_model(np.random.default_rng(3), in_channels=16, out_channels=32, group=16,
                       kernel=(3, 3), pads=(1, 1, 1, 1), input_hw=hw)
    mod = import_onnx(model, {"x": shape})
    scheduled, applied = cpu_build.schedule_module(mod, TARGETS[target])
    [name] = [n for n, rule in applied.items() if rule == "Depthwise"]
    sch = tvm.s_tir.Schedule(scheduled[name])
    blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    update = sch.get_sblock(next(b for b in blocks if b.endswith("_update")))
    # The tile's loops: the serial ones above the taps (the output of the channel where the
    # tile does not hold both, rows, vectors per row), the last of them the reduction's unit
    # loop.
    tile = [loop for loop in sch.get_loops(update)
            if sch.get(loop).kind == tvm.tirx.ForKind.SERIAL][:-1]
    epilogue = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(blocks[-1]))]
    assert len(tile) == outer_loops and all(any(sch.get(loop).same_as(e) for e in epilogue)
                                            for loop in tile), scheduled[name].script()
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    assert rel_error(run_widths(mod, [x])[0], run_onnx(model, {"x": x})[0]) < 1e-5


def test_neon_depthwise_tile_starts_with_a_multiply():
    """The CPU presets let LLVM ignore the sign of zero (`targets.FLOAT_FLAGS`): a depthwise
    register tile's accumulators then start with a multiply by the first tap instead of a
    zeroing and an FMA (7 output rows: 7 FMUL, 56 FMLA, no MOVI). Read in the A76 assembly;
    outputs: the qemu tests run the same presets."""
    model = conv_model(np.random.default_rng(5), in_channels=32, out_channels=96, group=32,
                       kernel=(3, 3), pads=(1, 1, 1, 1), input_hw=(28, 28), bias=False)
    model.graph.node.pop()  # no ReLU: the conv writes the output
    model.graph.node[0].output[0] = "y"
    assembly = build(import_onnx(model, {"x": (1, 32, 28, 28)}),
                     resolve_target("arm-a76")).mod.imports[0].inspect_source("s")
    kernel = re.search(r"^(\.L__tvm_parallel_lambda[\w.]*):$", assembly, re.M).group(1)
    body = assembly[assembly.index(kernel + ":"):]
    body = body[:body.index(".Lfunc_end")]
    counts = {op: len(re.findall(rf"\t{op}\t", body)) for op in ("movi", "fmul", "fmla")}
    assert counts == {"movi": 0, "fmul": 7, "fmla": 56}, counts


@pytest.mark.parametrize("target,cin,hw,unrolled,vectorized",
                         [("arm-neon", 64, (8, 8), True, True),
                          ("arm-neon", 16, (15, 15), True, False),
                          ("x86-avx512", 64, (8, 8), False, True)],
                         ids=["neon-pixel-tile", "neon-channel-tile", "avx512-pixel-tile"])
def test_pointwise_tile_epilogue_is_unrolled_on_neon(target, cin, hw, unrolled, vectorized):
    """NEON: the bias + ReLU epilogue of a pointwise register tile runs straight through the
    tile (its loops unrolled; the pixels vectorized in the pixel-vectorized tile, a transposed
    write-back in the channel tile), so each accumulator has a constant index and stays in its
    register; x86 keeps the loop (`CPUKnobs.unroll_epilogue`). Outputs: the qemu and x86 tests
    run the same tiles."""
    model, shape = _pointwise_model(np.random.default_rng(1), cin, 64, hw)
    scheduled, applied = cpu_build.schedule_module(import_onnx(model, {"x": shape}),
                                                   TARGETS[target])
    [name] = [n for n, rule in applied.items() if rule == "Pointwise"]
    script = scheduled[name].script()
    loops = script[script.rindex('_update")'):script.index('T.sblock("compute")')]
    serial = "range(" in loops or "T.grid(" in loops
    assert serial != unrolled and (loops.count("T.unroll(") >= 2) == unrolled, script
    assert loops.count("T.vectorized(") == int(vectorized), script


@pytest.mark.parametrize("activation,vectors", [("relu", 3), ("silu", 2)])
def test_neon_tile_leaves_registers_for_its_epilogue_constants(activation, vectors):
    """NEON, a 48 -> 192 1x1 conv at 16x40 (8-channel lane-weight tiles): with a ReLU
    epilogue the tile holds 8 x 3 vectors; a SiLU epilogue, unrolled through the tile, keeps
    11 constants live (`tiling.tile_accumulators`), so the tile holds 8 x 2 and the constants
    stay in registers. Outputs: the qemu tests run ddddocr's SiLU layers on the same rule."""
    from onnx import helper

    model, shape = _pointwise_model(np.random.default_rng(6), 48, 192, (16, 40))
    if activation == "silu":
        model.graph.node.pop()
        model.graph.node.extend([helper.make_node("Sigmoid", ["c"], ["s"]),
                                 helper.make_node("Mul", ["c", "s"], ["y"])])
    scheduled, applied = cpu_build.schedule_module(import_onnx(model, {"x": shape}),
                                                   TARGETS["arm-neon"])
    [name] = [n for n, rule in applied.items() if rule == "Pointwise"]
    sch = tvm.s_tir.Schedule(scheduled[name])
    blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    update = sch.get_sblock(next(b for b in blocks if b.endswith("_update")))
    *_, channels, pixel_vectors, lanes = (int(sch.get(loop).extent)
                                          for loop in sch.get_loops(update))
    assert (channels, pixel_vectors, lanes) == (8, vectors, 4), scheduled[name].script()


def test_neon_float16_epilogue_computed_in_float32_keeps_its_loop():
    """float16 tiles (A76): a ReLU epilogue is unrolled through the tile like float32's; a SiLU
    epilogue, whose fast sigmoid computes in float32 (two vectors per accumulator), keeps its
    loop (unrolled, it ran out of registers). Outputs: test_precision's fp16 qemu tests."""
    from onnx import TensorProto, helper, numpy_helper

    from helpers import make_model

    rng = np.random.default_rng(2)
    w = [numpy_helper.from_array(rng.standard_normal((64, 64, 1, 1)).astype(np.float32), name)
         for name in ("w", "v")]
    for activation, unrolled in (("relu", True), ("silu", False)):
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"])]
        if activation == "relu":
            nodes.append(helper.make_node("Relu", ["c"], ["a"]))
        else:
            nodes += [helper.make_node("Sigmoid", ["c"], ["s"]),
                      helper.make_node("Mul", ["c", "s"], ["a"])]
        # a second conv, so that the first kernel's output stays float16 (the graph output is
        # cast to float32 inside its kernel)
        nodes.append(helper.make_node("Conv", ["a", "v"], ["y"]))
        model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                 [1, 64, 8, 8])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], w)
        mod = import_onnx(model, {"x": (1, 64, 8, 8)}, "float16")
        scheduled, applied = cpu_build.schedule_module(mod, resolve_target("arm-a76").tvm_target())
        [name] = [n for n, rule in applied.items() if rule == "Pointwise" and activation in n]
        script = scheduled[name].script()
        tail = script[script.rindex('_update")'):]
        loops = tail[:tail.index("T.sblock(", tail.index("\n"))]
        serial = "range(" in loops or "T.grid(" in loops
        assert serial != unrolled, (activation, script)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7)], ids=["pixel-tile", "channel-tile"])
def test_neon_unrolls_the_input_channels_of_pointwise_tiles(hw):
    """NEON's pointwise tiles (pixels in the vectors at 8x8, channels at 7x7) step through 128
    input channels 16 at a time in one unrolled loop iteration (the loop's counter, pointers and
    branch once per 16 steps; 8 iterations left, `MIN_REDUCTION_ITERATIONS`), 48 channels 6 at
    a time; x86 leaves the loop to LLVM. Outputs: the qemu tests run the same tiles
    (`LANE_WEIGHT_CASES`, `PACKED_CASES`)."""
    for cin, steps in ((128, 16), (48, 6)):
        _check_unrolled_channels(cin, steps, hw)


def _check_unrolled_channels(cin, steps, hw):
    model, shape = _pointwise_model(np.random.default_rng(1), cin, 32, hw)
    for target, unrolled in ((TARGETS["arm-neon"], True), (TARGETS["x86-avx512"], False)):
        scheduled, applied = cpu_build.schedule_module(import_onnx(model, {"x": shape}), target)
        [name] = [n for n, rule in applied.items() if rule == "Pointwise"]
        script = scheduled[name].script()
        found = re.search(rf"for \w+ in range\(T\.int64\({cin // steps}\)\):\s+(?:[^\n]*\n\s+)*?"
                          rf"for \w+ in T\.unroll\(T\.int64\({steps}\)\)", script)
        assert bool(found) == unrolled, (str(target), script)


def _conv_then(model, nodes, inits=()):
    """``model`` (`conv_model`) with its Relu replaced by ``nodes`` (reading "conv_out",
    writing "y")."""
    from onnx import numpy_helper

    model.graph.node.pop()
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), name)
                                   for name, v in inits)
    return model


def _init_values(scheduled, applied) -> dict[str, str]:
    """"rule: reduction" -> what the reduction's accumulators start at (its ``_init`` block's
    stored value): "a buffer" where it loads one (the bias), else the constant. A conv's block
    (packed or not, grouped or not) is "conv"."""
    convs = (names.CONV2D, names.GROUP_CONV2D, names.PACKED_CONV)
    starts = {}
    for name, rule in applied.items():
        sch = tvm.s_tir.Schedule(scheduled[name])
        for block in map(sch.get, sch.get_child_blocks(sch.get_sblock("root"))):
            if block.name_hint.endswith("_init"):
                value = block.body.value
                reduction = block.name_hint[:-len("_init")]
                starts[f"{rule}: {'conv' if reduction in convs else reduction}"] = (
                    "a buffer" if isinstance(value, tvm.ir.expr.TensorLoad) else str(value))
    return starts


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_conv_accumulators_start_at_the_bias(target):
    """Where a conv's bias add is followed by more epilogue (an activation), its accumulators
    start at the bias instead of zero (`analysis.fold_bias`): one add less per output vector
    (ddddocr's backbone on the emulated A76: 35.85M -> 35.47M instructions). Not folded: a
    bias alone (the tile would accumulate in the output), and a clip straight after a conv
    without bias, then a ReLU (TVM's primitive would clip every partial sum: its accumulators
    would start at the clipped zero, and the outputs differ from onnxruntime's). Pointwise, depthwise, standard and fused depthwise-pointwise
    convs; outputs on every x86 width here, NEON in the qemu test (its models add a bias before
    their ReLU)."""
    from onnx import helper

    rng = np.random.default_rng(12)
    zero = "T.float32(0.0)"
    fused = factorize_onnx(conv_model(rng, in_channels=8, out_channels=16, input_hw=(8, 16)),
                           {"x": (1, 8, 8, 16)}, RankPolicy(rank=2)).model
    cases = {
        "pointwise relu": (_pointwise_model(rng, 24, 32, (8, 8))[0], (1, 24, 8, 8),
                           {"Pointwise: conv": "a buffer"}),
        "depthwise relu": (conv_model(rng, in_channels=16, out_channels=32, group=16,
                                      input_hw=(8, 16)), (1, 16, 8, 16),
                           {"Depthwise: conv": "a buffer"}),
        "conv relu": (conv_model(rng, in_channels=6, out_channels=16, input_hw=(8, 16)),
                      (1, 6, 8, 16), {"Conv2D: conv": "a buffer"}),
        "fused relu": (fused, (1, 8, 8, 16), {"FusedDepthwisePointwise: pointwise": "a buffer",
                                              "FusedDepthwisePointwise: depthwise": zero}),
        "bias alone": (_conv_then(conv_model(rng, in_channels=6, out_channels=16,
                                             input_hw=(8, 16)),
                                  [helper.make_node("Identity", ["conv_out"], ["y"])]),
                       (1, 6, 8, 16), {"Conv2D: conv": zero}),
        "clip, no bias": (_conv_then(conv_model(rng, in_channels=24, out_channels=32,
                                                kernel=(1, 1), pads=(0, 0, 0, 0),
                                                input_hw=(8, 8), bias=False),
                                     [helper.make_node("Clip", ["conv_out", "lo", "hi"],
                                                       ["clipped"]),
                                      helper.make_node("Relu", ["clipped"], ["y"])],
                                     [("lo", 0.0), ("hi", 2.0)]),
                          (1, 24, 8, 8), {"Pointwise: conv": zero}),
    }
    for case, (model, shape, expected) in cases.items():
        mod = import_onnx(model, {"x": shape})
        fuse = "always" if case == "fused relu" else True
        scheduled, applied = cpu_build.schedule_module(mod, TARGETS[target], fuse=fuse)
        assert _init_values(scheduled, applied) == expected, case
        if target == "x86-avx512":  # (run_widths runs AVX2 too)
            x = rng.standard_normal(shape).astype(np.float32)
            outputs = run_widths(mod, [x], fuse=fuse)
            assert rel_error(outputs[0], run_onnx(model, {"x": x})[0]) < 1e-5, case
