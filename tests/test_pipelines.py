"""The factorization inside other tools' pipelines: models and datasets passed as objects
(ModelProto, onnx_ir.Model; torch DataLoader, nncf.Dataset, lists), an onnx_ir pass chained with
onnxscript's, and the input left untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nncf
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule

from helpers import rel_error, run_onnx, small_cnn
from dwsep_compiler import DwsepError, compile_model, factorize
from dwsep_compiler.onnx_ir import FactorizePass

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "fashion_mnist",
                       "fashion_cnn.onnx")


def _samples(count=24, seed=0):
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _convs(model: onnx.ModelProto) -> int:
    """Conv nodes: each factorized layer adds one (depthwise + pointwise for one conv)."""
    return sum(1 for node in model.graph.node if node.op_type == "Conv")


def test_factorize_leaves_a_model_proto_byte_identical_and_matches_the_path():
    model = onnx.load(EXAMPLE)
    before = model.SerializeToString()
    from_proto, report = factorize(model, rank=2)
    assert model.SerializeToString() == before
    from_path, _ = factorize(EXAMPLE, rank=2)
    assert from_proto.SerializeToString() == from_path.SerializeToString()
    assert report.factorized_layers
    assert _convs(from_proto) == _convs(model) + len(report.factorized_layers)
    assert report.target is None and report.model == "<model in memory>"
    assert np.isfinite(run_onnx(from_proto, {"image": _samples(2)})[0]).all()


def test_calibration_kinds_give_identical_factors():
    """A list of feed dicts, a torch DataLoader of (image, label) batches, an nncf.Dataset with
    a transform, and the samples as one array or tensor: the same distilled weights."""
    x = _samples()
    feeds = [{"image": x[i:i + 8]} for i in range(0, len(x), 8)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.zeros(len(x))), batch_size=8)
    dataset = nncf.Dataset(loader, lambda batch: batch[0].numpy())
    results = [factorize(EXAMPLE, macs_ratio=0.5, calibration=kind) for kind in
               (feeds, loader, dataset, x, torch.from_numpy(x))]
    reference = _weights(results[0][0])
    for model, report in results:
        assert report.calibration["samples"] == len(x)
        weights = _weights(model)
        assert weights.keys() == reference.keys()
        assert all(np.array_equal(weights[name], reference[name]) for name in reference)
    assert "DataLoader" in results[1][1].calibration["source"]
    assert results[2][1].calibration["source"] == "nncf.Dataset"
    # and they are distilled factors, not the data-free SVD
    svd, _ = factorize(EXAMPLE, rank=None, macs_ratio=0.5)
    assert any(not np.array_equal(w, reference[n]) for n, w in _weights(svd).items()
               if n in reference)


def test_onnx_ir_model_and_ignored_scope_patterns():
    model = ir.serde.deserialize_model(onnx.load(EXAMPLE))
    out, report = factorize(model, rank=2, ignored_scope=[r".*conv1_\d/Conv",
                                                          "/features/conv3_2/Conv"])
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["/features/conv1_1/Conv"] == reasons["/features/conv1_2/Conv"] == \
        reasons["/features/conv3_2/Conv"] == "skipped_by_user"
    assert reasons["/features/conv2_1/Conv"] is None  # factorized
    assert isinstance(out, onnx.ModelProto)


@pytest.mark.parametrize("call, message", [
    (lambda: factorize(b"not a model"), "model must be a path to an .onnx file, an "
                                        "onnx.ModelProto or an onnx_ir.Model, not bytes"),
    (lambda: factorize(EXAMPLE, calibration=3), "calibration must be a .npz/.npy path"),
    (lambda: factorize(EXAMPLE, calibration=[(np.zeros((2, 1, 28, 28), np.float64),)]),
     "feed 0: 'image' has dtype float64"),
    (lambda: factorize(EXAMPLE, ignored_scope=["conv9"]), "'conv9' matches no conv"),
    (lambda: factorize(EXAMPLE, ignored_scope=["conv("]), "no valid regular expression"),
])
def test_wrong_kinds_are_one_line_errors(call, message):
    with pytest.raises(DwsepError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_compile_model_takes_a_model_proto(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = onnx.load(EXAMPLE)
    before = model.SerializeToString()
    result = compile_model(model, compile=False, rank=2, calibration=[_samples(8)])
    assert model.SerializeToString() == before
    assert result.output_dir == str(tmp_path / "model.dwsep")
    written = onnx.load(result.model_path)
    assert _convs(written) == _convs(model) + len(result.report.factorized_layers) > _convs(model)
    assert result.report.calibration["samples"] == 8


def test_factorize_pass_chains_with_onnxscript_passes():
    """onnxscript's BatchNorm fusion, our pass at full rank (the exact rewrite), onnx_ir's dead
    node removal: the output equals the input model's, which is left as it was."""
    model = small_cnn(np.random.default_rng(3))
    original = ir.serde.deserialize_model(model)
    before = ir.serde.serialize_model(original).SerializeToString()
    factorize_pass = FactorizePass(rank="full")
    manager = ir.passes.PassManager([RewritePass([fuse_batchnorm_into_conv_rule]),
                                     factorize_pass,
                                     ir.passes.common.RemoveUnusedNodesPass()])
    result = manager(original)
    assert result.modified and result.model is not original
    assert ir.serde.serialize_model(original).SerializeToString() == before
    out = ir.serde.serialize_model(result.model)
    assert len(factorize_pass.report.factorized_layers) >= 2
    assert _convs(out) == _convs(model) + len(factorize_pass.report.factorized_layers)
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert rel_error(run_onnx(out, {"x": x})[0], run_onnx(model, {"x": x})[0]) < 1e-4


@pytest.mark.parametrize("order", ["import dwsep_compiler, tvm", "import tvm, dwsep_compiler",
                                   "import tvm.relax.pipeline; import dwsep_compiler"])
def test_import_registers_the_relax_pipelines_in_either_order(order):
    code = (f"{order}\nimport sys\nfrom tvm.relax.pipeline import PIPELINE_MAP\n"
            "from tvm.tirx.compilation_pipeline import PIPELINE_MAP as TIR\n"
            "print(sorted(n for n in PIPELINE_MAP if n.startswith('dwsep')),\n"
            "      sorted(n for n in TIR if n.startswith('dwsep')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and (out.stdout.split("\n")[-2]
                                    == "['dwsep_cpu', 'dwsep_opencl'] ['dwsep_cpu']"), \
        out.stderr[-2000:]
    # the package alone does not import TVM (the CLI's --help and the device tools stay light)
    light = subprocess.run([sys.executable, "-c", "import sys, dwsep_compiler; "
                            "print('tvm' in sys.modules)"], capture_output=True, text=True,
                           timeout=300)
    assert light.stdout.strip() == "False", light.stderr[-2000:]


def _factorized_module():
    from dwsep_compiler.compile import import_onnx

    model, report = factorize(EXAMPLE, rank=2)
    return import_onnx(model, {"image": (1, 1, 28, 28)}), model


def _assembly(executable) -> str:
    return "\n".join(module.inspect_source("asm") for module in executable.mod.imports)


def test_relax_pipeline_dwsep_cpu_builds_what_build_builds():
    import tvm

    from dwsep_compiler import compile as tvm_compile
    from dwsep_compiler.compile.cpu import PASS_CONFIG
    from dwsep_compiler.targets import resolve_target

    mod, model = _factorized_module()
    preset = resolve_target("host")
    ours = tvm_compile.build(mod, preset)
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        plain = tvm.compile(mod, target=preset.tvm_target(), relax_pipeline="dwsep_cpu",
                            tir_pipeline="dwsep_cpu")
    x = _samples(1, seed=5)
    expected = tvm_compile.run_executable(ours, [x])[0]
    assert np.array_equal(tvm_compile.run_executable(plain, [x])[0], expected)
    assert rel_error(expected, run_onnx(model, {"image": x})[0]) < 1e-5
    # the same program, to the kernels' machine code (the unscheduled build's differs)
    assert plain.as_text() == ours.as_text() and _assembly(plain) == _assembly(ours)
    with pytest.raises(Exception, match="needs a target of kind 'llvm'"):
        tvm.compile(mod, target=tvm.target.Target({"kind": "opencl", "host": {"kind": "llvm"}}),
                    relax_pipeline="dwsep_cpu")


def test_relax_pipeline_dwsep_opencl_builds_what_build_builds():
    import tvm

    from dwsep_compiler.compile import opencl
    from dwsep_compiler.compile import build
    from dwsep_compiler.targets import resolve_target

    mod, _ = _factorized_module()
    preset = resolve_target("mali")
    plain = tvm.compile(mod, target=preset.tvm_target(), relax_pipeline="dwsep_opencl")
    assert opencl.opencl_source(plain) == opencl.opencl_source(build(mod, preset))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dwsep_compiler.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=1200, cwd=cwd)


@pytest.fixture(scope="module")
def factorized_example(tmp_path_factory):
    """The Fashion example factorized with calibration (as a pipeline's first step would)."""
    model, _ = factorize(EXAMPLE, macs_ratio=0.5, calibration=[_samples(32, seed=7)])
    path = tmp_path_factory.mktemp("factorized") / "model.onnx"
    onnx.save(model, path)
    return path


def test_no_factorize_compiles_the_model_as_given(factorized_example, tmp_path):
    out = tmp_path / "as_given"
    proc = _cli(factorized_example, "--no-factorize", "--target", "host", "-q", "-o", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["factorized"] == 0 and report["verification"]["ran"]
    reasons = {layer["reason"] for layer in report["layers"]}
    assert reasons <= {"factorization_off", "grouped_or_depthwise", "kernel_1x1"}
    assert "grouped_or_depthwise" in reasons  # the depthwise convs of the earlier factorization
    assert onnx.load(out / "model.onnx").SerializeToString() == \
        onnx.load(factorized_example).SerializeToString()
    x = _samples(1, seed=9)
    from dwsep_compiler.compile import run_executable

    assert rel_error(run_executable(str(out / "model.so"), [x])[0],
                     run_onnx(str(factorized_example), {"image": x})[0]) < 1e-5
    refused = _cli(factorized_example, "--no-factorize", "--rank", "2", "-o", tmp_path / "r")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--no-factorize" in refused.stderr and "rank" in refused.stderr


def test_nncf_per_tensor_quantization_of_our_output_runs_and_compiles(factorized_example,
                                                                     tmp_path):
    """NNCF with per-tensor activation quantizers (its per-channel default on depthwise inputs
    gives models onnxruntime refuses) quantizes our output into a QDQ model that onnxruntime
    runs near the float model; --no-factorize compiles it as TVM imports it (float ops), and
    verifies it against the QDQ graph, saying so in the report."""
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       QuantizationParameters)

    calibration = _samples(32, seed=7)
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(32)], lambda x: {"image": x})
    quantized = nncf.quantize(
        onnx.load(factorized_example), dataset, subset_size=32,
        advanced_parameters=AdvancedQuantizationParameters(
            activations_quantization_params=QuantizationParameters(per_channel=False)))
    assert any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)
    path = tmp_path / "quantized.onnx"
    onnx.save(quantized, path)
    x = calibration[:4]
    assert rel_error(run_onnx(str(path), {"image": x})[0],
                     run_onnx(str(factorized_example), {"image": x})[0]) < 0.1
    out = tmp_path / "q"
    proc = _cli(path, "--no-factorize", "--target", "host", "-q", "-o", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["ran"]
    assert sum("the model is quantized" in note for note in report["notes"]) == 1


def test_no_factorize_tunes_the_model_as_given(factorized_example, tmp_path):
    """Tuning a model compiled as given: its own kernels are tuned, nothing is gated."""
    out, records = tmp_path / "tuned", tmp_path / "records"
    proc = _cli(factorized_example, "--no-factorize", "--target", "host", "--tune", "--trials",
                "2", "--tuning-records", records, "-q", "-o", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tuning"]["gated_layers"] == [] and report["tuning"]["trials_run"] >= 1
    assert report["verification"]["ran"] and report["totals"]["factorized"] == 0


class _TorchCNN(torch.nn.Module):
    """Nested blocks, a conv with batch norm and no bias, a strided conv, a 1x1 and a grouped
    conv (both kept), a functional conv on a computed weight (no module: kept)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.ModuleDict({"down": nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                    "mix": nn.Conv2d(32, 32, 1),
                                    "grouped": nn.Conv2d(32, 32, 3, padding=1, groups=4)})
        self.scale = nn.Parameter(torch.ones(32, 32, 3, 3) * 0.01)
        self.head = nn.Linear(32, 10)

    def forward(self, image):
        x = self.stem(image)
        x = torch.relu(self.block["down"](x))
        x = self.block["grouped"](self.block["mix"](x))
        x = torch.nn.functional.conv2d(x, self.scale * 2.0, padding=1)
        return self.head(x.mean((2, 3)))


def _torch_cnn(seed=0):
    torch.manual_seed(seed)
    model = _TorchCNN().eval()
    with torch.no_grad():  # batch-norm statistics of a trained model, not the identity
        model.stem[1].running_mean.normal_(0, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
        model.stem[1].weight.uniform_(0.5, 1.5)
    return model


def test_torch_factorize_equals_the_onnx_pass_and_its_export_compiles(tmp_path):
    from dwsep_compiler.torch import export_onnx, factorize_

    images = torch.rand(32, 3, 16, 16)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.zeros(32)), batch_size=8)
    model = _torch_cnn()
    example = images[:1]
    reference, expected_report = factorize(export_onnx(model, (example,)), macs_ratio=0.8,
                                           calibration=loader)
    report = factorize_(model, example, macs_ratio=0.8, calibration=loader)
    assert "block.down" in {layer.name for layer in report.factorized_layers}
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["block.mix"] == "kernel_1x1" and reasons["block.grouped"] == \
        "grouped_or_depthwise"
    assert list(reasons.values()).count("no_conv2d_module") == 1  # the functional conv
    assert [layer.rank for layer in report.layers] == \
        [layer.rank for layer in expected_report.layers]
    assert isinstance(model.block["down"], torch.nn.Sequential)
    assert model.block["down"][0].groups == 16 and model.block["down"][1].kernel_size == (1, 1)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        ours = model(x).numpy()
    assert rel_error(ours, run_onnx(reference, {"image": x.numpy()})[0]) < 1e-5
    # the factorized module exports and compiles as given
    path = tmp_path / "factorized.onnx"
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["image"])
    proc = _cli(path, "--no-factorize", "--target", "host", "-q", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    compiled = json.loads((tmp_path / "out" / "report.json").read_text())
    assert compiled["verification"]["ran"]
    assert sum(layer["reason"] == "grouped_or_depthwise" for layer in compiled["layers"]) == \
        1 + len(report.factorized_layers)  # the grouped conv and each new depthwise one


def test_torch_factorize_ignored_scope_takes_module_paths():
    from dwsep_compiler.torch import factorize_

    model = _torch_cnn()
    report = factorize_(model, torch.rand(1, 3, 16, 16), rank=2, ignored_scope=["stem\\..*"])
    assert [layer.name for layer in report.factorized_layers] == ["block.down"]
    assert isinstance(model.stem[0], torch.nn.Conv2d)
    with pytest.raises(DwsepError, match="'trunk' matches no conv"):
        factorize_(_torch_cnn(), torch.rand(1, 3, 16, 16), ignored_scope=["trunk"])


def test_olive_workflow_factorizes_then_quantizes(tmp_path):
    """examples/olive as a user runs it: our package config, then `olive run`: factorize ->
    OnnxPeepholeOptimizer -> OnnxStaticQuantization gives a QDQ model with depthwise convs that
    onnxruntime runs and that agrees with the original model's top-1."""
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    shutil.copytree(os.path.join(examples, "olive"), tmp_path / "olive")
    os.symlink(os.path.abspath(os.path.join(examples, "fashion_mnist")),
               tmp_path / "fashion_mnist")
    work, config = tmp_path / "olive", tmp_path / "olive" / "olive_config.json"
    written = subprocess.run([sys.executable, "-m", "dwsep_compiler.olive", "package-config",
                              "-o", config], capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr
    passes = json.loads(config.read_text())["passes"]
    assert passes["DwsepFactorize"]["module_path"] == "dwsep_compiler.olive.DwsepFactorize"
    assert "OnnxStaticQuantization" in passes and "OnnxPeepholeOptimizer" in passes
    run = subprocess.run([sys.executable, "-m", "olive", "run", "--config", "workflow.json",
                          "--package-config", str(config)], cwd=work, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = onnx.load(work / "olive-output" / "model.onnx")
    assert any(node.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                              for a in node.attribute) for node in out.graph.node)
    assert any(node.op_type == "QuantizeLinear" for node in out.graph.node)
    images = np.load(os.path.join(examples, "fashion_mnist", "calibration.npz"))["image"][:16]
    ours = np.concatenate([run_onnx(out, {"image": x[None]})[0] for x in images])
    original = np.concatenate([run_onnx(EXAMPLE, {"image": x[None]})[0] for x in images])
    assert (ours.argmax(1) == original.argmax(1)).mean() >= 0.8
    reports = list((work / "olive-cache").rglob("dwsep_report.json"))
    assert reports and json.loads(reports[0].read_text())["totals"]["factorized"] >= 1


def test_plot_draws_the_rank_allocation(tmp_path):
    calibration = os.path.join(os.path.dirname(EXAMPLE), "calibration.npz")
    plot = tmp_path / "allocation.png"
    proc = _cli(EXAMPLE, "--macs-ratio", "0.4", "--calibration", calibration, "--no-compile",
                "-q", "-o", tmp_path / "o", "--plot", plot)
    assert proc.returncode == 0, proc.stderr
    from matplotlib import image

    pixels = image.imread(str(plot))  # a PNG matplotlib itself reads back
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pixels.shape[0] > 300
    assert pixels.std() > 0.05  # drawn, not blank
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert set(report["rank_allocation"]["curves"]) == {
        layer["name"] for layer in report["layers"] if layer["reason"] in
        (None, "kept_by_rank_allocation")}
    refused = _cli(EXAMPLE, "--rank", "2", "--no-compile", "-o", tmp_path / "r", "--plot", plot)
    assert refused.returncode == 2 and "--macs-ratio or --max-error" in refused.stderr
    assert not (tmp_path / "r").exists()
