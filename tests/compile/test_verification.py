"""Verification that can fail: the built library against onnxruntime on several random inputs and
the calibration inputs, on this CPU, under qemu for ARM presets, on PoCL for OpenCL presets; a
library that computes something else fails the build with one line and exit 1.

The planted bug is a spatially flipped kernel in the module TVM builds (the model written next
to it stays right), the kind of bug a schedule or layout change makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from dwsep_compiler import compile as tvm_compile
from dwsep_compiler import compile_model
from dwsep_compiler.compile.verify import RANDOM_INPUTS, TOLERANCE, VerificationFailed

from helpers import flip_first_kernel, small_cnn

# The CLI in a child Python with the planted bug (argv after the script).
PLANTED_CLI = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from helpers import flip_first_kernel
from dwsep_compiler import cli
from dwsep_compiler import compile as tvm_compile

real = tvm_compile.import_onnx
tvm_compile.import_onnx = lambda model, *rest: real(flip_first_kernel(model), *rest)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def cnn(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(np.random.default_rng(5)), path)
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=np.random.default_rng(6).uniform(0, 1, (4, 3, 16, 16))
             .astype(np.float32))
    return path, calibration


@pytest.fixture
def planted(monkeypatch):
    real = tvm_compile.import_onnx
    monkeypatch.setattr(tvm_compile, "import_onnx",
                        lambda model, *rest: real(flip_first_kernel(model), *rest))


def test_host_build_is_verified_on_random_and_calibration_inputs(tmp_path, cnn):
    path, calibration = cnn
    result = compile_model(str(path), target="host", output_dir=str(tmp_path / "out"), rank=2,
                           calibration=str(calibration))
    checked = result.report.verification
    assert checked["ran"] == "this machine's CPU"
    assert checked["tolerance"] == TOLERANCE
    # batch 1: each of the 4 calibration samples is one input
    assert len(checked["inputs"]) == RANDOM_INPUTS + 4, checked["inputs"]
    assert checked["max_rel_error"] < TOLERANCE and checked["worst_output"] == "logits"


def test_a_library_that_computes_something_else_is_not_written(tmp_path, cnn, planted):
    path, _ = cnn
    out = tmp_path / "out"
    with pytest.raises(VerificationFailed) as failure:
        compile_model(str(path), target="host", output_dir=str(out), rank=2)
    message = str(failure.value)
    assert "\n" not in message and "'logits'" in message and "tolerance 1e-04" in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dwsep")]


def test_the_cli_fails_with_one_line_and_exit_1(tmp_path, cnn):
    path, _ = cnn
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", PLANTED_CLI, str(path), "--rank", "2",
                           "-o", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "verification failed" in lines[0], proc.stderr
    assert not out.exists()
    # --no-verify keeps the old behaviour: the (wrong) library is written, nothing is checked
    proc = subprocess.run([sys.executable, "-c", PLANTED_CLI, str(path), "--rank", "2",
                           "-o", str(out), "-q", "--no-verify"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["verification"] is None


@pytest.mark.emulation
def test_arm_builds_are_verified_under_qemu(tmp_path, cnn, runtime, monkeypatch):
    path, _ = cnn
    result = compile_model(str(path), target="arm-a76", output_dir=str(tmp_path / "a76"),
                           rank=2)
    checked = result.report.verification
    assert checked["ran"] == "qemu-aarch64 (cortex-a76)", checked
    assert checked["max_rel_error"] < TOLERANCE
    real = tvm_compile.import_onnx
    monkeypatch.setattr(tvm_compile, "import_onnx",
                        lambda model, *rest: real(flip_first_kernel(model), *rest))
    with pytest.raises(VerificationFailed, match="qemu-aarch64"):
        compile_model(str(path), target="arm-a53", output_dir=str(tmp_path / "a53"), rank=2)


def test_without_an_emulation_root_the_report_says_so(tmp_path, cnn, monkeypatch):
    path, _ = cnn
    monkeypatch.setenv("DWSEP_CACHE_DIR", str(tmp_path / "empty-cache"))
    result = compile_model(str(path), target="arm", output_dir=str(tmp_path / "arm"), rank=2)
    checked = result.report.verification
    assert checked["ran"] is None and "emulate --prepare" in checked["skipped"], checked


@pytest.mark.opencl
def test_opencl_builds_are_verified_on_the_local_device(tmp_path, cnn):
    path, _ = cnn
    result = compile_model(str(path), target="mali", output_dir=str(tmp_path / "mali"), rank=2)
    checked = result.report.verification
    assert checked["ran"].startswith("OpenCL device"), checked
    assert checked["max_rel_error"] < TOLERANCE


@pytest.mark.opencl
def test_a_wrong_opencl_build_fails(tmp_path, cnn, planted):
    path, _ = cnn
    with pytest.raises(VerificationFailed, match="OpenCL device"):
        compile_model(str(path), target="adreno", output_dir=str(tmp_path / "adreno"), rank=2)
