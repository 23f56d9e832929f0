"""The factorization inside other tools' pipelines: models and datasets passed as objects
(ModelProto, onnx_ir.Model; torch DataLoader, nncf.Dataset, lists), an onnx_ir pass chained with
onnxscript's, and the input left untouched."""

from __future__ import annotations

import os
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


def test_three_calibration_kinds_give_identical_factors():
    """A list of feed dicts, a torch DataLoader of (image, label) batches and an nncf.Dataset
    with a transform: the same samples, the same distilled weights."""
    x = _samples()
    feeds = [{"image": x[i:i + 8]} for i in range(0, len(x), 8)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.zeros(len(x))), batch_size=8)
    dataset = nncf.Dataset(loader, lambda batch: batch[0].numpy())
    results = [factorize(EXAMPLE, macs_ratio=0.5, calibration=kind) for kind in
               (feeds, loader, dataset)]
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
            "print(sorted(n for n in PIPELINE_MAP if n.startswith('dwsep')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.split("\n")[-2] == "['dwsep_cpu', 'dwsep_opencl']", \
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
    from dwsep_compiler.schedules import PASS_CONFIG
    from dwsep_compiler.targets import resolve_target

    mod, model = _factorized_module()
    preset = resolve_target("host")
    ours = tvm_compile.build(mod, preset)
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        plain = tvm.compile(mod, target=preset.tvm_target(), relax_pipeline="dwsep_cpu")
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

    from dwsep_compiler import opencl
    from dwsep_compiler.compile import build
    from dwsep_compiler.targets import resolve_target

    mod, _ = _factorized_module()
    preset = resolve_target("mali")
    plain = tvm.compile(mod, target=preset.tvm_target(), relax_pipeline="dwsep_opencl")
    assert opencl.opencl_source(plain) == opencl.opencl_source(build(mod, preset))
