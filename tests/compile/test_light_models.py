"""Real architectures with random weights (`dwsep_compiler.zoo`), against onnxruntime.

The onnx wheel's own light models have every weight 0.02: all channels compute the same and
every class gets 0.001, so no check on them can see a swapped channel, a flipped kernel or a
wrong packed layout. These tests use the same architectures with re-drawn weights: the rewrite
at full rank (exact), the compiled libraries of the factorized and the original model for
AVX-512 and AVX2 (both run here) and for Cortex-A53 / A76 under qemu, on the logits and on
intermediate activations; and which schedule rule took each conv, pool and dense PrimFunc.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from dwsep_compiler import zoo
from dwsep_compiler.compile import cpu as cpu_build
from dwsep_compiler.compile import build, export_library, import_onnx, run_executable
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.model import load_model, resolve_input_shapes
from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx
from dwsep_compiler.targets import resolve_target

from helpers import HOST_WIDTHS, light_model_path, rel_error, run_onnx, with_outputs

MODELS = list(zoo.LIGHT_MODELS)
MAX_FC = 256  # hidden fully connected widths (the heads are not what these checks are about)
# Reduced resolutions for the builds that run under qemu (the smallest each architecture takes
# with a map left at its last pool).
ARM_HW = {"vgg19": 32, "resnet50": 32, "squeezenet": 32, "shufflenet": 32, "bvlc_alexnet": 67,
          "zfnet512": 64, "inception_v1": 64, "inception_v2": 32, "densenet121": 32}
# OpenCL lowering at reduced resolution, where no map shrinks to 1x1: dlight's GPU reduction
# schedule fails on ShuffleNet's grouped 1x1 convs over 1x1 maps (a TVM limit, not ours).
OPENCL_HW = {"bvlc_alexnet": 67}
TOLERANCE = 1e-4  # fp32, relative to the tensor's largest magnitude
# Rule assignment is checked for both x86 widths wherever this runs; code is executed for
# the widths this machine has (helpers.HOST_WIDTHS).
X86 = {"avx512": {"kind": "llvm", "mcpu": "skylake-avx512"},
       "avx2": {"kind": "llvm", "mcpu": "haswell"}}


def _probes(model, count: int = 4) -> list[str]:
    """The logits (the softmax's input, or the output) and ``count`` activations spread over
    the depth (ReLU outputs: the ends of fused kernels, so probing them changes no fusion)."""
    softmax = [n.input[0] for n in model.graph.node if n.op_type == "Softmax"]
    logits = softmax or [model.graph.output[0].name]
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    picks = [relus[int(i)] for i in np.linspace(0, len(relus) - 1, count)] if relus else []
    return list(dict.fromkeys(picks + logits))


def _by_name(model, outputs: list) -> dict:
    """A library's outputs by the model's output names (they come in graph output order)."""
    names = [o.name for o in model.graph.output]
    assert len(outputs) == len(names), (len(outputs), names)
    return dict(zip(names, outputs))


def _input(model, shapes, seed=1):
    (name,) = shapes
    return name, np.random.default_rng(seed).standard_normal(shapes[name]).astype(np.float32)


@pytest.fixture(scope="module", params=MODELS)
def full_rank(request):
    model = zoo.light_model(request.param, max_fc=MAX_FC)
    shapes = resolve_input_shapes(model)
    result = factorize_onnx(model, shapes, RankPolicy(rank="full", force=True))
    return request.param, model, shapes, result


def test_random_weights_make_the_outputs_depend_on_the_input():
    """What the wheel's models cannot do: logits differ by class and by input; channels differ."""
    for weights in ("wheel", "random"):
        model = (load_model(light_model_path("squeezenet")) if weights == "wheel"
                 else zoo.light_model("squeezenet"))
        shapes = resolve_input_shapes(model)
        name, x = _input(model, shapes, seed=1)
        _, y = _input(model, shapes, seed=2)
        a, b = (run_onnx(model, {name: v})[0].reshape(-1) for v in (x, y))
        varies = np.ptp(a) > 1e-3 and rel_error(a, b) > 1e-3
        assert varies == (weights == "random"), (weights, np.ptp(a), rel_error(a, b))


def test_layer_scaling_keeps_activations_near_unit_variance():
    model = zoo.light_model("densenet121", input_hw=(64, 64))
    shapes = resolve_input_shapes(model)
    name, x = _input(model, shapes)
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    outs = run_onnx(with_outputs(model, convs), {name: x}, convs)
    stds = [float(np.std(o)) for o in outs]
    assert 0.2 < min(stds) and max(stds) < 5, (min(stds), max(stds))


def test_full_rank_rewrite_is_exact_in_onnxruntime(full_rank):
    name, model, shapes, result = full_rank
    factorized = [layer for layer in result.layers if layer.factorized]
    eligible = [layer for layer in result.layers
                if layer.reason not in ("kernel_1x1", "grouped_or_depthwise")]
    assert factorized and len(factorized) == len(eligible), {l.reason for l in result.layers}
    outputs = {o for n in result.model.graph.node for o in n.output}
    probes = sorted({layer.name for layer in factorized} & {n.name for n in model.graph.node})
    probes = [n.output[0] for n in model.graph.node if n.name in probes]
    probes = [p for p in probes + _probes(model) if p in outputs]
    input_name, x = _input(model, shapes)
    expected = run_onnx(with_outputs(model, probes), {input_name: x}, probes)
    actual = run_onnx(with_outputs(result.model, probes), {input_name: x}, probes)
    for probe, a, e in zip(probes, actual, expected):
        assert rel_error(a, e) < TOLERANCE, probe


@pytest.mark.parametrize("variant", ["factorized", "original"])
def test_host_libraries_match_onnxruntime(full_rank, variant):
    """AVX-512 (this machine's) and AVX2 code of both models, logits and activations."""
    name, model, shapes, result = full_rank
    source = result.model if variant == "factorized" else model
    probes = _probes(model)
    probed = with_outputs(source, probes)
    input_name, x = _input(model, shapes)
    expected = run_onnx(with_outputs(model, probes), {input_name: x}, probes)
    mod = import_onnx(probed, shapes)
    for isa, preset in HOST_WIDTHS.items():
        outs = _by_name(probed, run_executable(build(mod, preset), [x]))
        for probe, e in zip(probes, expected):
            a = outs[probe]
            assert rel_error(a, e) < TOLERANCE, (isa, probe, rel_error(a, e))


def _expected_rule(func: tvm.tirx.PrimFunc, name: str, family: str) -> str | None:
    """The rule a PrimFunc must get, read from what it computes (its operator names and its
    weight's shape), not from the rules' own matchers. None: data movement and reductions
    (softmax, mean, reshape, concat), whichever rule takes them."""
    gpu = family == "opencl"
    shapes = [[int(d) for d in p.shape] for p in func.params]
    if "depthwise_pointwise" in name:
        return "FusedDepthwisePointwise"
    if "conv2d" in name:
        weight = shapes[1]  # conv2d(data, weight, ...): OIHW; packed: [O/b, C, b] (1x1) or
        grouped = len(weight) == 4 and 1 < weight[1] < shapes[0][1]  # [O/b, C/g, kh, kw, b]
        if gpu and grouped:  # the GPU rules take the rewrite's kernels; ShuffleNet's: dlight
            return "dlight"
        if len(weight) == 3 or weight[2:4] == [1, 1]:
            return "Pointwise"
        if weight[1] == 1 and "packed" not in name:
            return "Depthwise"
        return "dlight" if gpu else "Conv2D"
    if "pool2d" in name:
        if gpu:
            return "dlight"
        return "Reduction" if shapes[-1][2:] == [1, 1] else "Pool"  # a window over the map
    if "matmul" in name or "dense" in name:
        return "dlight" if gpu else "Dense"
    return None


def _schedules(model, shapes, family: str) -> tuple[dict, dict]:
    """({PrimFunc: rule}, {PrimFunc: function}) after our pipeline for ``family``."""
    mod = import_onnx(model, shapes)
    if family == "opencl":
        from dwsep_compiler.compile import opencl

        program = opencl.lower(mod, resolve_target("mali").tvm_target())
        funcs = program.relax_mod
        applied = program.schedules
    else:
        target = (resolve_target("arm").tvm_target() if family == "neon"
                  else tvm.target.Target(X86[family]))
        failures: dict = {}
        funcs, applied = cpu_build.schedule_module(mod, target, failures=failures)
        assert failures == {}, failures
        assert cpu_build.unscheduled_prim_funcs(funcs) == []
    return applied, {gv.name_hint: f for gv, f in funcs.functions_items()
                     if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("family", ["avx512", "avx2", "neon", "opencl"])
def test_each_conv_pool_and_dense_kernel_gets_its_rule(full_rank, family):
    """Per architecture and target family: every conv, pointwise, depthwise, pool and dense
    PrimFunc of the factorized and of the original model is scheduled by the rule for its
    kind, none by the fallback. On OpenCL our rules take the rewrite's kernels (depthwise,
    pointwise, fused pairs) and dlight the rest (standard and grouped convs, pools, dense), by
    design; it runs at reduced resolution there (the GPU lowering is the slow part)."""
    name, model, shapes, result = full_rank
    if family == "opencl":
        model = zoo.light_model(name, input_hw=(OPENCL_HW.get(name, 64),) * 2, max_fc=MAX_FC)
        shapes = resolve_input_shapes(model)
        result = factorize_onnx(model, shapes, RankPolicy(rank="full", force=True))
    for source in (result.model, model):
        applied, funcs = _schedules(source, shapes, family)
        checked = 0
        for prim, func in funcs.items():
            expected = _expected_rule(func, prim, family)
            if expected is not None:
                checked += 1
                assert applied.get(prim) == expected, (prim, applied.get(prim), expected)
        assert checked >= 3, applied


@pytest.mark.emulation
@pytest.mark.parametrize("preset,variant", [("arm-a53", "factorized"), ("arm-a76", "factorized"),
                                            ("arm-a53", "original")])
@pytest.mark.parametrize("name", MODELS)
def test_arm_libraries_match_onnxruntime_under_qemu(name, preset, variant, tmp_path, runtime):
    """NEON code of the architectures (factorized at full rank on both cores, the original on
    the A53; reduced resolution) run on the emulated core of the preset, logits and
    activations against onnxruntime."""
    from dwsep_compiler.device.emulate import run_aarch64

    target = resolve_target(preset)
    model = zoo.light_model(name, input_hw=(ARM_HW[name],) * 2, max_fc=MAX_FC)
    shapes = resolve_input_shapes(model)
    source = (factorize_onnx(model, shapes, RankPolicy(rank="full", force=True)).model
              if variant == "factorized" else model)
    probes = _probes(model)
    input_name, x = _input(model, shapes)
    expected = run_onnx(with_outputs(model, probes), {input_name: x}, probes)
    probed = with_outputs(source, probes)
    executable = build(import_onnx(probed, shapes), target)
    library = export_library(executable, target, str(tmp_path))
    assert library.linked
    outs = _by_name(probed, run_aarch64(library.path, [x], qemu_cpu=target.qemu_cpu,
                                        runtime=runtime))
    for probe, e in zip(probes, expected):
        a = outs[probe]
        assert rel_error(a, e) < TOLERANCE, (preset, probe, rel_error(a, e))


def test_vgg19_conv_mac_ratio_is_the_closed_form():
    model = zoo.light_model("vgg19", max_fc=MAX_FC)
    shapes = resolve_input_shapes(model)
    result = factorize_onnx(model, shapes, RankPolicy(rank=1))
    (input_name,) = shapes
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    outs = run_onnx(with_outputs(model, [n.output[0] for n in convs]),
                    {input_name: np.zeros(shapes[input_name], np.float32)},
                    [n.output[0] for n in convs])
    before = after = 0
    for layer, out in zip(result.layers, outs):
        n, m, (kh, kw), (ho, wo) = layer.out_channels, layer.in_channels, layer.kernel, out.shape[2:]
        assert out.shape[1] == n
        before += n * m * kh * kw * ho * wo
        after += layer.rank * (kh * kw + n) * m * ho * wo
    totals = {"before": sum(l.macs_before for l in result.layers),
              "after": sum(l.macs_after for l in result.layers)}
    assert totals == {"before": before, "after": after}
    assert all(layer.rank == 1 for layer in result.layers)


def test_cli_on_vgg19_rank1_host(tmp_path):
    """dwsep-compile on random-weight VGG-19 at rank 1: the report's MAC ratio is the closed
    form, and the library computes what onnxruntime computes on the written model."""
    import json
    import subprocess
    import sys

    import onnx

    source = tmp_path / "vgg19.onnx"
    onnx.save(zoo.light_model("vgg19", input_hw=(64, 64), max_fc=MAX_FC), str(source))
    out = tmp_path / "vgg"
    proc = subprocess.run([sys.executable, "-m", "dwsep_compiler.cli", str(source),
                           "--rank", "1", "--target", "host", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    model = load_model(str(source))
    shapes = resolve_input_shapes(model)
    (input_name,) = shapes
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    zeros = np.zeros(shapes[input_name], np.float32)
    conv_outs = run_onnx(with_outputs(model, [n.output[0] for n in convs]), {input_name: zeros},
                         [n.output[0] for n in convs])
    before = after = 0
    for layer, y in zip(report["layers"], conv_outs):
        n, m, (kh, kw), (ho, wo) = (layer["out_channels"], layer["in_channels"],
                                    layer["kernel"], y.shape[2:])
        before += n * m * kh * kw * ho * wo
        after += 1 * (kh * kw + n) * m * ho * wo
    assert report["totals"]["conv_macs_ratio"] == pytest.approx(after / before, rel=1e-12)
    _, x = _input(model, shapes)
    written = load_model(str(out / "model.onnx"))
    (probs,) = run_executable(str(out / "model.so"), [x])
    expected = run_onnx(written, {input_name: x})[0]
    assert np.ptp(expected) > 1e-4  # the probabilities depend on the input
    assert rel_error(probs, expected) < TOLERANCE
    assert report["verification"]["max_rel_error"] < TOLERANCE
