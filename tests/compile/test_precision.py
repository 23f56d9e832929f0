"""`--precision fp16`: float16 inside the library on ARMv8.2 cores, float32 at its interface.

The fp16 library is checked against onnxruntime's float32 run of the same model under qemu on
the core it is built for (Cortex-A76) within `FP16_TOLERANCE`, its kernels really compute on
8-lane float16 vectors, it dies with SIGILL on a core without fp16 arithmetic (Cortex-A53), and
the option is refused in one line for every target without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from dwsep_compiler import DwsepError, compile_model
from dwsep_compiler.compile import cpu as cpu_build
from dwsep_compiler.compile import import_onnx
from dwsep_compiler.compile.precision import FP16_TOLERANCE
from dwsep_compiler.device.remote import find_artifact
from dwsep_compiler.targets import resolve_target
from dwsep_compiler.zoo import light_model

from helpers import rel_error, run_onnx

EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fashion_mnist")
EXAMPLE = os.path.join(EXAMPLE_DIR, "fashion_cnn.onnx")
CALIBRATION = os.path.join(EXAMPLE_DIR, "calibration.npz")


@pytest.mark.parametrize("target", ["host", "arm", "arm-a53", "arm-a72", "mali", "adreno"])
def test_fp16_is_refused_where_the_core_has_none(tmp_path, target):
    with pytest.raises(DwsepError, match="--precision fp16"):
        compile_model(EXAMPLE, target=target, output_dir=str(tmp_path / "out"), rank=2,
                      precision="fp16")
    assert not (tmp_path / "out").exists()


def test_fp16_refusal_is_one_line_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dwsep_compiler.cli", EXAMPLE, "--target",
                           "arm-a53", "--precision", "fp16", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "fp16 arithmetic" in lines[0] and "arm-a76" in lines[0]


@pytest.mark.parametrize("target", ["arm-a55", "arm-a76", "arm-a78"])
def test_fp16_kernels_compute_on_eight_lane_vectors(target):
    """The rules take their lanes from the kernel's element type: a float16 kernel's vectors
    hold 8 values on NEON (4 would leave half of each register empty)."""
    mod = import_onnx(onnx.load(EXAMPLE), {"image": (1, 1, 28, 28)}, "float16")
    scheduled, applied = cpu_build.schedule_module(mod, resolve_target(target).tvm_target())
    convs = [name for name, rule in applied.items()
             if rule in ("Pointwise", "Depthwise", "Conv2D", "FusedDepthwisePointwise")]
    assert convs, applied
    for name in convs:
        widths = [int(w) for w in re.findall(r"in T\.vectorized\((?:T\.int64\()?(\d+)",
                                              scheduled[name].script())]
        assert widths and all(w % 8 == 0 for w in widths), (name, widths)


@pytest.mark.emulation
def test_fp16_library_matches_onnxruntime_on_a76_and_dies_on_a53(tmp_path, runtime):
    """The bundled example at 0.4x conv MACs, calibrated: verified under qemu on the A76 (the
    build fails above the tolerance), its report prices the precision on the calibration data;
    on an A53 the same library dies with SIGILL."""
    from dwsep_compiler.device.emulate import run_aarch64
    from dwsep_compiler.device.qemu import EmulationError

    result = compile_model(EXAMPLE, target="arm-a76", output_dir=str(tmp_path / "fp16"),
                           calibration=CALIBRATION, macs_ratio=0.4, precision="fp16")
    verification = result.report.verification
    assert verification["ran"] == "qemu-aarch64 (cortex-a76)", verification
    assert verification["tolerance"] == FP16_TOLERANCE
    precision = result.report.to_dict()["precision"]
    assert precision["precision"] == "fp16" and precision["dtype"] == "float16"
    assert precision["calibration"]["batches"] > 0
    assert 0 < precision["calibration"]["max_rel_error"] <= FP16_TOLERANCE
    assert precision["calibration"]["argmax_agreement"]["logits"] >= 0.9
    assert find_artifact(result.output_dir).precision == "fp16"

    x = np.random.default_rng(3).uniform(0, 1, (1, 1, 28, 28)).astype(np.float32)
    (out,) = run_aarch64(result.library.path, [x], "cortex-a76", runtime)
    assert out.dtype == np.float32
    expected = run_onnx(onnx.load(result.model_path), {"image": x})[0]
    error = rel_error(out, expected)
    assert 1e-6 < error <= FP16_TOLERANCE, error  # float16 inside: not the float32 result
    with pytest.raises(EmulationError) as info:
        run_aarch64(result.library.path, [x], "cortex-a53", runtime)
    assert info.value.signal_name == "SIGILL"


@pytest.mark.emulation
def test_fp16_resnet50_stays_within_the_tolerance(tmp_path, runtime):
    """A deeper network (light ResNet-50, random weights, 48 px, rank 2: 7e-3 measured) with
    residual adds and a strided projection on every stage, against the float32 model."""
    from dwsep_compiler.device.emulate import run_aarch64

    model = light_model("resnet50", input_hw=(48, 48), max_fc=64)
    result = compile_model(model, target="arm-a76", output_dir=str(tmp_path / "r50"), rank=2,
                           precision="fp16", verify=False)
    factorized = onnx.load(result.model_path)
    name = factorized.graph.input[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)
    (out,) = run_aarch64(result.library.path, [x], "cortex-a76", runtime)
    assert rel_error(out, run_onnx(factorized, {name: x})[0]) <= FP16_TOLERANCE


def test_fp16_sigmoid_stays_vectorizable_and_close():
    """SiLU layers (ddddocr, YOLO): a float16 sigmoid is rewritten like a float32 one (computed
    in float32 inside, no libm call per element) and stays within the tolerance. Built for
    this machine's CPU, which computes float16 by widening: the numbers, not the speed."""
    from onnx import TensorProto, helper, numpy_helper

    from dwsep_compiler.compile import build, run_executable
    from dwsep_compiler.passes.lowering.fast_sigmoid import FastSigmoid

    from helpers import make_model

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) / 8, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [1, 8, 16, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    mod = import_onnx(model, {"x": (1, 8, 16, 16)}, "float16")
    rewrite = FastSigmoid()
    mod = rewrite(mod)
    assert rewrite.rewritten == 2  # the sigmoid, then the SiLU it is part of
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    (out,) = run_executable(build(mod, resolve_target("host")), [x])
    assert rel_error(out, run_onnx(model, {"x": x})[0]) <= FP16_TOLERANCE
