"""`compile_model` artifacts for every device target, executed here and compared with
onnxruntime on the original model: ARM libraries under qemu-user pinned to the preset's core,
mali/adreno kernels on PoCL. The rewrite is exact (rank full), so any difference is a bug of
the build, the schedules or the target, not an approximation."""

import os

import numpy as np
import onnx
import pytest

from dwsep_compiler import compile_model
from dwsep_compiler.compile import import_onnx
from dwsep_compiler.targets import PRESETS, resolve_target

from helpers import rel_error, run_onnx, small_cnn

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fashion_mnist",
                       "fashion_cnn.onnx")
ARM = [name for name, preset in PRESETS.items() if preset.cross_compiled and not preset.is_gpu]


@pytest.fixture(scope="module")
def example_inputs():
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, 28, 28)).astype(np.float32)
    return x, run_onnx(onnx.load(EXAMPLE), {"image": x})[0]


def _compile(tmp_path, target):
    return compile_model(EXAMPLE, target=target, output_dir=str(tmp_path / target),
                         rank="full", force=True)


@pytest.mark.emulation
@pytest.mark.parametrize("target", ARM)
def test_arm_library_runs_on_its_core_and_matches(tmp_path, target, example_inputs):
    from dwsep_compiler.device.emulate import run_aarch64

    x, expected = example_inputs
    result = _compile(tmp_path, target)
    assert result.library is not None and result.library.linked, "needs aarch64-linux-gnu-g++"
    assert result.report.totals()["factorized"] == 6
    (out,) = run_aarch64(result.library.path, [x], qemu_cpu=PRESETS[target].qemu_cpu)
    assert rel_error(out, expected) < 1e-4


@pytest.mark.opencl
@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_gpu_kernels_run_on_pocl_and_match(tmp_path, target, example_inputs):
    from dwsep_compiler.compile import opencl
    from dwsep_compiler.device import pocl

    x, expected = example_inputs
    result = _compile(tmp_path, target)
    preset = resolve_target(target)
    written = onnx.load(result.model_path)
    program = opencl.lower(import_onnx(written, {"image": (1, 1, 28, 28)}), preset.tvm_target())
    # The kernels we execute are the ones shipped in the library.
    assert program.source.encode() in open(result.library.path, "rb").read()
    assert not opencl.check_limits(program.kernels.values(), preset.gpu_limits)
    (out,) = pocl.run_on_pocl(program, [x])
    assert rel_error(out, expected) < 1e-4


def test_host_build_is_verified_against_onnxruntime(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(np.random.default_rng(5)), path)
    result = compile_model(str(path), target="host", output_dir=str(tmp_path / "out"), rank=2)
    assert result.report.verification["max_rel_error"] < 1e-4
