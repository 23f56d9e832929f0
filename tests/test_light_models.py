"""Real architectures from the onnx wheel (all weights 0.02: rank 1 is exact per input channel).

Their final Softmax sees identical logits, so the checks compare the pre-softmax tensor and the
output of every rewritten layer, not the (always uniform) probabilities.
"""

import numpy as np
import pytest
import tvm

from dwsep_compiler.compile import build, export_library, import_onnx, run_executable
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.model import load_model, resolve_input_shapes
from dwsep_compiler.passes.onnx_factorize import factorize_onnx
from dwsep_compiler.targets import resolve_target

from helpers import light_model_path, real_input_names, rel_error, run_onnx, with_outputs

MODELS = ["vgg19", "resnet50", "zfnet512", "bvlc_alexnet", "inception_v1", "squeezenet", "shufflenet"]


def _probes(model, layers):
    """Tensors both models share: each rewritten layer's output and the softmax input."""
    names = set()
    for node in model.graph.node:
        if node.op_type == "Softmax":
            names.add(node.input[0])
    factorized = {layer.name for layer in layers if layer.factorized}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.name in factorized:
            names.add(node.output[0])
    return sorted(names)


def _rewrite(name):
    model = load_model(light_model_path(name))
    shapes = resolve_input_shapes(model)
    result = factorize_onnx(model, shapes, RankPolicy(rank=1))
    return model, shapes, result


@pytest.fixture(scope="module", params=MODELS)
def rewritten(request):
    model, shapes, result = _rewrite(request.param)
    (input_name,) = real_input_names(model)
    x = np.random.default_rng(0).uniform(0, 1, shapes[input_name]).astype(np.float32)
    return request.param, model, shapes, result, input_name, x


def test_rank1_is_exact_in_onnxruntime(rewritten):
    name, model, shapes, result, input_name, x = rewritten
    factorized = [layer for layer in result.layers if layer.factorized]
    eligible = [layer for layer in result.layers
                if layer.reason not in ("kernel_1x1", "grouped_or_depthwise")]
    assert factorized and len(factorized) == len(eligible), {l.reason for l in result.layers}
    for layer in factorized:
        assert layer.weight_rel_error < 1e-6
    probes = [p for p in _probes(model, result.layers)
              if p in {o for n in result.model.graph.node for o in n.output}]
    expected = run_onnx(with_outputs(model, probes), {input_name: x}, probes)
    actual = run_onnx(with_outputs(result.model, probes), {input_name: x}, probes)
    for probe, a, e in zip(probes, actual, expected):
        assert rel_error(a, e) < 1e-5, probe


def test_rank1_is_exact_in_the_tvm_host_build(rewritten):
    name, model, shapes, result, input_name, x = rewritten
    probe = [n.input[0] for n in model.graph.node if n.op_type == "Softmax"] or \
            [model.graph.output[0].name]
    expected = run_onnx(with_outputs(model, probe), {input_name: x}, probe)[0]
    executable = build(import_onnx(with_outputs(result.model, probe), shapes),
                       resolve_target("host"))
    outputs = run_executable(executable, [x])
    assert rel_error(outputs[-1], expected) < 1e-4


def test_vgg19_conv_mac_ratio_is_the_closed_form():
    model, shapes, result = _rewrite("vgg19")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    outs = run_onnx(with_outputs(model, [n.output[0] for n in convs]),
                    {"data_0": np.zeros(shapes["data_0"], np.float32)},
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
    """The issue's own check: dwsep-compile light_vgg19 --rank 1 --target host."""
    import json
    import subprocess
    import sys

    from dwsep_compiler.compile import run_executable

    out = tmp_path / "vgg"
    proc = subprocess.run([sys.executable, "-m", "dwsep_compiler.cli", light_model_path("vgg19"),
                           "--rank", "1", "--target", "host", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    model = load_model(light_model_path("vgg19"))
    shapes = resolve_input_shapes(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    zeros = np.zeros(shapes["data_0"], np.float32)
    conv_outs = run_onnx(with_outputs(model, [n.output[0] for n in convs]), {"data_0": zeros},
                         [n.output[0] for n in convs])
    before = after = 0
    for layer, y in zip(report["layers"], conv_outs):
        n, m, (kh, kw), (ho, wo) = (layer["out_channels"], layer["in_channels"],
                                    layer["kernel"], y.shape[2:])
        before += n * m * kh * kw * ho * wo
        after += 1 * (kh * kw + n) * m * ho * wo
    assert report["totals"]["conv_macs_ratio"] == pytest.approx(after / before, rel=1e-12)
    # The written model matches the original before the softmax, and so does the library.
    x = np.random.default_rng(1).uniform(0, 1, shapes["data_0"]).astype(np.float32)
    probe = [n.input[0] for n in model.graph.node if n.op_type == "Softmax"]
    expected = run_onnx(with_outputs(model, probe), {"data_0": x}, probe)[0]
    written = load_model(str(out / "model.onnx"))
    assert rel_error(run_onnx(with_outputs(written, probe), {"data_0": x}, probe)[0],
                     expected) < 1e-5
    (probs,) = run_executable(str(out / "model.so"), [x])
    np.testing.assert_allclose(probs, run_onnx(model, {"data_0": x})[0], rtol=1e-5, atol=1e-7)
    assert report["verification"]["max_rel_error"] < 1e-4
