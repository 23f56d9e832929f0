"""The dwsep-compile command: the main job end to end, and every bad input as one line + exit 2."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import conv_model, make_model, rel_error, run_onnx, small_cnn

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "fashion_mnist",
                       "fashion_cnn.onnx")


def dwsep(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dwsep_compiler.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def cnn_path(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(np.random.default_rng(0)), path)
    return path


def test_main_job_on_a_small_cnn(tmp_path, cnn_path):
    before = digest(cnn_path)
    out = tmp_path / "out"
    proc = dwsep(cnn_path, "--target", "host", "--rank", "2", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert digest(cnn_path) == before
    assert sorted(os.listdir(out)) == ["model.onnx", "model.so", "report.json"]
    report = json.loads((out / "report.json").read_text())
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["conv1"]["status"] == "factorized" and layers["conv1"]["rank"] == 2
    assert layers["pointwise"]["reason"] == "kernel_1x1"
    totals = report["totals"]
    assert totals["conv_macs_ratio"] == pytest.approx(
        totals["conv_macs_after"] / totals["conv_macs_before"])
    assert totals["model_macs_before"] - totals["model_macs_after"] == \
        totals["conv_macs_before"] - totals["conv_macs_after"]
    assert report["verification"]["max_rel_error"] < 1e-4
    assert "conv1" in proc.stdout and "factorized" in proc.stdout
    # The written model runs in onnxruntime and equals what the report says it is.
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    original = run_onnx(onnx.load(cnn_path), {"x": x})[0]
    rewritten = run_onnx(str(out / "model.onnx"), {"x": x})[0]
    assert rewritten.shape == original.shape
    # Running again replaces the output directory atomically.
    proc = dwsep(cnn_path, "--rank", "full", "--force-rewrite", "--no-compile", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["model.onnx", "report.json"]
    assert rel_error(run_onnx(str(out / "model.onnx"), {"x": x})[0], original) < 1e-5


def test_default_output_dir_and_arm_target(tmp_path, cnn_path):
    proc = dwsep(cnn_path, "--target", "arm", "--energy", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "cnn.dwsep"
    files = sorted(os.listdir(out))
    assert "model.onnx" in files and ("model.so" in files or "model.tar" in files)
    if "model.so" in files:  # linked with the cross compiler: an aarch64 ELF
        header = (out / "model.so").read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "arm" and report["rank_policy"] == "energy=0.5"


def test_bundled_example(tmp_path):
    proc = dwsep(EXAMPLE, "--target", "host", "-o", tmp_path / "ex")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "ex" / "report.json").read_text())
    assert report["totals"]["factorized"] >= 1
    assert "no calibration" in " ".join(report["notes"])


def test_list_targets():
    proc = dwsep("--list-targets")
    assert proc.returncode == 0
    for name in ("host", "arm", "arm-a53", "arm-a76", "mali", "adreno"):
        assert f"\n{name} " in "\n" + proc.stdout
    assert '"mtriple": "aarch64-linux-gnu"' in proc.stdout


# --- bad input: one line on stderr, exit 2, no output directory, input untouched -------------

def test_missing_file(tmp_path):
    proc = dwsep(tmp_path / "nope.onnx", "-o", tmp_path / "out")
    assert_one_line_error(proc, "not found", "nope.onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"hello, this is not a model\n", "truncated"])
def test_unreadable_truncated_or_not_onnx(tmp_path, cnn_path, content):
    bad = tmp_path / "bad.onnx"
    if content == "truncated":
        data = cnn_path.read_bytes()
        content = data[: len(data) // 2]
    bad.write_bytes(content)
    proc = dwsep(bad, "-o", tmp_path / "out")
    assert_one_line_error(proc, "bad.onnx")
    assert not (tmp_path / "out").exists()
    assert bad.read_bytes() == content


def test_model_without_convs(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = tmp_path / "relu.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], []), path)
    proc = dwsep(path, "-o", tmp_path / "out")
    assert_one_line_error(proc, "no Conv")
    assert not (tmp_path / "out").exists()


def test_no_eligible_convs_writes_the_unchanged_model(tmp_path):
    path = tmp_path / "pw.onnx"
    model = conv_model(np.random.default_rng(0), kernel=(1, 1), pads=(0, 0, 0, 0))
    onnx.save(model, path)
    proc = dwsep(path, "-o", tmp_path / "out")
    assert_one_line_error(proc, "no eligible convolutions", "kernel_1x1")
    written = onnx.load(tmp_path / "out" / "model.onnx")
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in model.graph.node]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["layers"][0]["reason"] == "kernel_1x1"


def test_dynamic_spatial_dims_ask_for_input_shape(tmp_path):
    model = conv_model(np.random.default_rng(0))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    proc = dwsep(path, "-o", tmp_path / "out", "--no-compile")
    assert_one_line_error(proc, "--input-shape", "width")
    assert not (tmp_path / "out").exists()
    proc = dwsep(path, "-o", tmp_path / "out", "--no-compile", "--rank", "1",
                 "--input-shape", "x=2,8,12,20")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["layers"][0]["macs_before"] == 2 * 16 * 8 * 9 * 12 * 20
    proc = dwsep(path, "-o", tmp_path / "o2", "--input-shape", "x=2,8")
    assert_one_line_error(proc, "rank")


def test_missing_external_data(tmp_path):
    model = conv_model(np.random.default_rng(0), in_channels=32, out_channels=64)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    os.remove(tmp_path / "ext.data")
    proc = dwsep(path, "-o", tmp_path / "out")
    assert_one_line_error(proc, "external data", "ext.data")
    assert not (tmp_path / "out").exists()


def test_unknown_target_and_bad_options(tmp_path, cnn_path):
    proc = dwsep(cnn_path, "--target", "pentium", "-o", tmp_path / "out")
    assert_one_line_error(proc, "unknown target 'pentium'")
    proc = dwsep(cnn_path, "--target", '{"kind": "nope"}', "-o", tmp_path / "out")
    assert_one_line_error(proc, "target")
    proc = dwsep(cnn_path, "--rank", "0")
    assert_one_line_error(proc, "rank")
    proc = dwsep(cnn_path, "--skip", "no_such_conv", "-o", tmp_path / "out")
    assert_one_line_error(proc, "no_such_conv")
    proc = dwsep(cnn_path, "--input-shape", "y=1,2", "-o", tmp_path / "out")
    assert_one_line_error(proc, "'y'")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, cnn_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    proc = dwsep(cnn_path, "-o", tmp_path / "mine")
    assert_one_line_error(proc, "not a dwsep-compile output")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    proc = dwsep(cnn_path, "-o", tmp_path)
    assert_one_line_error(proc)
    assert not list(tmp_path.glob(".dwsep-*"))


def test_an_internal_error_is_one_line_and_exit_1(tmp_path, cnn_path):
    """A bug of ours (planted: MAC counting raises) is one line naming the exception, exit 1,
    no output; DWSEP_DEBUG=1 shows the traceback."""
    script = ("import sys\nfrom dwsep_compiler import cli, pipeline\n"
              "def boom(*a, **k):\n    raise RuntimeError('planted')\n"
              "pipeline.model_macs = boom\nsys.exit(cli.main(sys.argv[1:]))\n")
    args = [sys.executable, "-c", script, str(cnn_path), "--rank", "2", "-o", str(tmp_path / "o")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dwsep-compile: internal error: RuntimeError: planted"), lines
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    debug = subprocess.run(args, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "DWSEP_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
