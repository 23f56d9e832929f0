"""End-to-end fine-tuning (optional PyTorch extra): the torch executor against onnxruntime, the
training on the Fashion-MNIST example, and the CLI errors (which need no torch)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.pipeline import compile_model
from helpers import conv_model, run_onnx, small_cnn, with_outputs

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch (the finetune extra) is not installed")
EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "examples", "fashion_mnist")
EXAMPLE = os.path.join(EXAMPLE_DIR, "fashion_cnn.onnx")
CALIBRATION = os.path.join(EXAMPLE_DIR, "calibration.npz")


@needs_torch
@pytest.mark.parametrize("make", ["small_cnn", "conv_bn"])
def test_onnx_module_matches_onnxruntime(make):
    from dwsep_compiler.initialization.finetune import OnnxModule

    rng = np.random.default_rng(0)
    if make == "small_cnn":
        model, x = small_cnn(rng), rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
        capture = ["r1", "c4"]
    else:
        model = conv_model(rng, batch_norm=True, strides=(2, 2), pads=(0, 1, 1, 2))
        x, capture = rng.standard_normal((2, 8, 12, 12)).astype(np.float32), ["bn_out"]
    names = [model.graph.output[0].name, *capture]
    expected = run_onnx(with_outputs(model, capture), {"x": x}, names)
    out = OnnxModule(model)(capture=capture, x=x)
    assert list(out) == names
    for name, ref in zip(names, expected):
        got = out[name].detach().numpy()
        assert got.shape == ref.shape
        assert np.max(np.abs(got - ref)) <= 1e-4 * max(1.0, np.max(np.abs(ref)))


@needs_torch
def test_onnx_module_names_unsupported_op():
    from dwsep_compiler.initialization.finetune import OnnxModule

    model = small_cnn(np.random.default_rng(0))
    model.graph.node[1].op_type = "Elu"
    with pytest.raises(DwsepError, match="operator Elu is not supported"):
        OnnxModule(model)


@needs_torch
def test_finetune_on_fashion_example(tmp_path):
    """Rank 2 (0.28x conv MACs), layer-wise distilled, then 150 Adam steps end to end."""
    sys.path.insert(0, EXAMPLE_DIR)
    try:
        import data
    finally:
        sys.path.remove(EXAMPLE_DIR)
    from dwsep_compiler.initialization.calibration import load_calibration
    from dwsep_compiler.initialization.finetune import finetune, layer_pairs, student_module
    from dwsep_compiler.model import resolve_input_shapes

    result = compile_model(EXAMPLE, output_dir=str(tmp_path / "out"), compile=False, rank=2,
                           calibration=CALIBRATION)
    layerwise = onnx.load(result.model_path)
    original = onnx.load(EXAMPLE)
    layers = result.report.layers
    pairs = layer_pairs(layers, layerwise)
    assert len(pairs) == sum(layer.factorized for layer in layers) == 6
    assert all(s == t for s, t in pairs)
    student = student_module(layerwise, layers)
    assert len(student.onnx_parameters()) == 18  # DW weight, PW weight, PW bias per layer

    calib = load_calibration(CALIBRATION, original, resolve_input_shapes(original, None))
    tuned, info = finetune(original, layerwise, layers, calib, steps=150, lr=1e-4)
    assert info["steps"] == 150 and info["loss_end"] <= info["loss_start"]
    assert set(info["layer_output_rel_error"]) == {l.name for l in layers if l.factorized}

    images, labels = data.load_fashion_mnist("test")
    x, y = data.preprocess(images[:500]), labels[:500]
    teacher = run_onnx(original, {"image": x})[0].argmax(1)
    scores = {}
    for name, model in (("layerwise", layerwise), ("finetuned", tuned)):
        predicted = run_onnx(model, {"image": x})[0].argmax(1)
        scores[name] = (float((predicted == y).mean()), float((predicted == teacher).mean()))
    print("accuracy, agreement with the original on 500 test images:", scores)
    # Measured: see the README. Only the training loss is asserted (64 samples overfit easily).
    assert scores["finetuned"][0] > 0.8


def _cli(*args, hide_torch=False):
    code = ("import sys\n"
            + ("sys.modules['torch'] = None\n" if hide_torch else "")
            + "from dwsep_compiler.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_cli_finetune_needs_calibration(tmp_path):
    done = _cli(EXAMPLE, "--rank", "2", "--no-compile", "-o", str(tmp_path / "o"),
                "--finetune-steps", "5")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dwsep-compile: error: --finetune-steps needs --calibration"]
    assert not (tmp_path / "o").exists()


def test_cli_finetune_without_torch_says_what_to_install(tmp_path):
    done = _cli(EXAMPLE, "--rank", "2", "--no-compile", "-o", str(tmp_path / "o"),
                "--calibration", CALIBRATION, "--finetune-steps", "5", hide_torch=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'dwsep-compiler[finetune]'" in lines[0]
    assert not (tmp_path / "o").exists()


@needs_torch
def test_cli_finetune_small_steps(tmp_path):
    import json

    out = tmp_path / "o"
    done = _cli(EXAMPLE, "--rank", "2", "--no-compile", "-q", "-o", str(out),
                "--calibration", CALIBRATION, "--finetune-steps", "3", "--finetune-lr", "1e-4")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    info = report["calibration"]["finetune"]
    assert info["steps"] == 3 and info["loss_end"] <= info["loss_start"]
