"""End-to-end fine-tuning (optional PyTorch extra): the torch executor against onnxruntime, the
training on the Fashion-MNIST example, models with an operator the executor cannot run (trained
on the runnable prefix), and the CLI errors (which need no torch)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.pipeline import compile_model
from helpers import conv_model, make_model, run_onnx, small_cnn, with_outputs

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch (the finetune extra) is not installed")
EXAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fashion_mnist")
EXAMPLE = os.path.join(EXAMPLE_DIR, "fashion_cnn.onnx")
CALIBRATION = os.path.join(EXAMPLE_DIR, "calibration.npz")


def _shape_ops_model() -> onnx.ModelProto:
    """Shape arithmetic as exporters write it between a backbone and its head: Shape (with
    start), Gather (scalar and negative indices), Unsqueeze, Squeeze, Concat, Reshape,
    ConstantOfShape."""
    def ints(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("Unsqueeze", ["flat", "axes_1_last"], ["u"]),
        helper.make_node("Squeeze", ["u", "axis1"], ["sq"]),
        helper.make_node("Shape", ["sq"], ["tail"], start=1),
        helper.make_node("Concat", ["n1", "tail"], ["sq_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["sq_shape"], ["half"],
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Add", ["sq", "half"], ["y"]),
        helper.make_node("Gather", ["x", "last_first"], ["g"], axis=2),
    ]
    inits = [ints("zero", 0), ints("axis0", [0]), ints("minus1", [-1]),
             ints("axes_1_last", [1, -1]), ints("axis1", [1]), ints("last_first", [-1, 0])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits, opset=15)


@needs_torch
@pytest.mark.parametrize("make", ["small_cnn", "conv_bn", "shape_ops"])
def test_onnx_module_matches_onnxruntime(make):
    from dwsep_compiler.initialization.finetune import OnnxModule

    rng = np.random.default_rng(0)
    if make == "small_cnn":
        model, x = small_cnn(rng), rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
        capture = ["r1", "c4"]
    elif make == "shape_ops":
        model, x = _shape_ops_model(), rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
        capture = ["n", "tail", "g"]
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
    model.graph.node[1].op_type = "Celu"
    with pytest.raises(DwsepError, match="operator Celu is not supported"):
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
    assert info["teacher_cached"]
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


def _time_major(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a second output, its conv features transposed so that the samples are on
    axis 1 (how a recurrent head's ``[T, N, C]`` sequence comes out)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node.append(helper.make_node("Transpose", ["c2"], ["tnc"], perm=[2, 0, 1, 3]))
    out.graph.output.append(helper.make_tensor_value_info("tnc", TensorProto.FLOAT, None))
    return out


@needs_torch
@pytest.mark.parametrize("case", ["dynamic batch", "fixed batch 1", "time-major",
                                  "over the budget"])
def test_teacher_targets_match_the_teacher_per_sample(case):
    """What the training loop gets for any set of samples equals the teacher run on exactly
    those samples, whether kept once (sample-major tensors within the budget, or one-sample
    feeds, whatever their layout) or computed on each call (a tensor whose axis 0 is not the
    samples, with feeds of several samples; over the budget)."""
    import torch
    from dwsep_compiler.initialization.calibration import load_calibration
    from dwsep_compiler.initialization.finetune import OnnxModule, TeacherTargets

    rng = np.random.default_rng(0)
    model = small_cnn(rng)
    if case == "time-major":
        model = _time_major(model)
    x = rng.standard_normal((20, 3, 16, 16)).astype(np.float32)
    if case == "fixed batch 1":
        model = _time_major(model)  # a one-sample feed is kept whatever its layout
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    calib = load_calibration([{"x": x}], model, {"x": (1, 3, 16, 16)})
    chunk = calib.batch or 8
    teacher = OnnxModule(model).eval()
    budget = 1000 if case == "over the budget" else 1 << 30
    targets = TeacherTargets(teacher, ["r1"], calib, chunk, budget)
    assert targets.cached == (case in ("dynamic batch", "fixed batch 1"))

    for indices in ([np.array([7])] if case == "fixed batch 1"
                    else [np.array([3, 17, 0, 9, 12, 5, 19, 8]), np.array([11, 2])]):
        feed = {"x": x[indices]}
        got = targets(indices, feed)
        with torch.no_grad():
            want = teacher(capture=["r1"], **feed)
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape, name
            np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-5,
                                       atol=1e-5)


def _backbone_then(rng, head: str) -> onnx.ModelProto:
    """x [N, 2, 6, 10] -> conv1 3x3 -> relu -> conv2 3x3 -> relu, with an operator the torch
    executor cannot run: ``"lstm"``, a plain RNN (ONNX ``RNN``, outside the executor, unlike
    LSTM and GRU) over the width axis after the backbone (an OCR model's recurrent head; its
    input, the cut tensor, is "seq"); ``"first"``, a Hardmax before
    conv1; ``"middle"``, a Hardmax between the convs."""
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * scale, name)
             for name, shape, scale in (("w1", (8, 2, 3, 3), 0.3), ("b1", (8,), 0.1),
                                        ("w2", (8, 8, 3, 3), 0.15), ("b2", (8,), 0.1))]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    hardmax = [helper.make_node("Hardmax", ["x" if head == "first" else "r1"], ["h"],
                                name="hardmax", axis=-1)]
    nodes = [*(hardmax if head == "first" else []),
             helper.make_node("Conv", ["h" if head == "first" else "x", "w1", "b1"], ["c1"],
                              name="conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             *(hardmax if head == "middle" else []),
             helper.make_node("Conv", ["h" if head == "middle" else "r1", "w2", "b2"], ["c2"],
                              name="conv2", **conv),
             helper.make_node("Relu", ["c2"], ["feat" if head == "lstm" else "y"], name="relu2")]
    if head == "lstm":
        hidden = 8
        inits += [numpy_helper.from_array(np.array([0, 0, -1], np.int64), "seq_shape"),
                  numpy_helper.from_array(rng.standard_normal((1, hidden, 48)).astype(
                      np.float32) * 0.2, "W"),
                  numpy_helper.from_array(rng.standard_normal((1, hidden, hidden)).astype(
                      np.float32) * 0.2, "R")]
        nodes += [helper.make_node("Transpose", ["feat"], ["wnch"], perm=[3, 0, 1, 2]),
                  helper.make_node("Reshape", ["wnch", "seq_shape"], ["seq"]),
                  helper.make_node("RNN", ["seq", "W", "R"], ["y"], name="lstm",
                                   hidden_size=hidden)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


def _layerwise(tmp_path, model, x):
    """Rank 1 everywhere, layer-wise distilled on ``x``: (model, report layers)."""
    path = str(tmp_path / "model.onnx")
    onnx.save(model, path)
    result = compile_model(path, output_dir=str(tmp_path / "out"), compile=False, rank=1,
                           calibration=[{"x": x}])
    return onnx.load(result.model_path), result.report.layers


@needs_torch
def test_finetune_trains_the_prefix_before_an_unsupported_head(tmp_path):
    """LSTM head: the backbone is trained on the cut tensor (the LSTM's input) + the layer
    features, and the trained weights land in the full model, which still runs."""
    from dwsep_compiler.initialization.calibration import load_calibration
    from dwsep_compiler.initialization.finetune import finetune, trainable_names

    rng = np.random.default_rng(0)
    original = _backbone_then(rng, "lstm")
    x = rng.uniform(0, 1, (32, 2, 6, 10)).astype(np.float32)
    layerwise, layers = _layerwise(tmp_path, original, x)
    calib = load_calibration([{"x": x}], original, {"x": (32, 2, 6, 10)})
    tuned, info = finetune(original, layerwise, layers, calib, steps=60, lr=3e-3)

    assert info["outputs"] == {"kind": "cut tensors", "names": ["seq"],
                               "first_unsupported_op": "RNN", "first_unsupported_node": "lstm",
                               "layers_not_reached": []}
    assert info["kept"] == "trained" and info["loss_end"] < info["loss_start"]
    assert set(info["layer_output_rel_error"]) == {"conv1", "conv2"}
    trained = trainable_names(layerwise, layers)
    before = {t.name: numpy_helper.to_array(t) for t in layerwise.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) == (k not in trained) for k in before)

    # The written-back full model, run in onnxruntime: the cut features are closer to the
    # original's than the layer-wise model's (in the relative RMS error the loss trains; the
    # worst element may move either way).
    [teacher] = run_onnx(with_outputs(original, ["seq"]), {"x": x}, ["seq"])
    errors = {}
    for name, model in (("layerwise", layerwise), ("tuned", tuned)):
        y, seq = run_onnx(with_outputs(model, ["seq"]), {"x": x}, ["y", "seq"])
        assert y.shape == (10, 1, 32, 8)
        errors[name] = float(np.linalg.norm(seq - teacher) / np.linalg.norm(teacher))
    assert errors["tuned"] < errors["layerwise"], errors


@needs_torch
def test_finetune_trains_the_same_with_the_teacher_kept(tmp_path, monkeypatch):
    """The teacher's tensors kept once (`TeacherTargets`) or computed on every step: the same
    training, step for step (fails if a minibatch were matched to other samples' targets)."""
    from dwsep_compiler.initialization import finetune as ft
    from dwsep_compiler.initialization.calibration import load_calibration

    rng = np.random.default_rng(2)
    original = small_cnn(rng)
    x = rng.standard_normal((24, 3, 16, 16)).astype(np.float32)
    layerwise, layers = _layerwise(tmp_path, original, x)
    calib = load_calibration([{"x": x}], original, {"x": (24, 3, 16, 16)})
    kept, kept_info = ft.finetune(original, layerwise, layers, calib, steps=12, lr=3e-3,
                                  batch_size=8)
    monkeypatch.setattr(ft, "TEACHER_CACHE_BYTES", 0)
    rerun, rerun_info = ft.finetune(original, layerwise, layers, calib, steps=12, lr=3e-3,
                                    batch_size=8)
    assert kept_info["teacher_cached"] and not rerun_info["teacher_cached"]
    assert kept_info["kept"] == "trained" and kept_info["loss_end"] < kept_info["loss_start"]
    assert kept_info["loss_end"] == pytest.approx(rerun_info["loss_end"], rel=1e-4)
    for a, b in zip(kept.graph.initializer, rerun.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b),
                                   rtol=1e-4, atol=1e-6)


@needs_torch
def test_finetune_leaves_layers_beyond_the_cut_alone(tmp_path):
    from dwsep_compiler.initialization.calibration import load_calibration
    from dwsep_compiler.initialization.finetune import finetune

    rng = np.random.default_rng(1)
    original = _backbone_then(rng, "middle")
    x = rng.uniform(0, 1, (16, 2, 6, 10)).astype(np.float32)
    layerwise, layers = _layerwise(tmp_path, original, x)
    calib = load_calibration([{"x": x}], original, {"x": (16, 2, 6, 10)})
    tuned, info = finetune(original, layerwise, layers, calib, steps=5, lr=1e-3)
    assert info["outputs"]["names"] == ["r1"]
    assert info["outputs"]["layers_not_reached"] == ["conv2"]
    assert set(info["layer_output_rel_error"]) == {"conv1"}
    second = {i for node in layerwise.graph.node if node.name.startswith("conv2_")
              for i in node.input[1:]}
    assert second
    for before, after in zip(layerwise.graph.initializer, tuned.graph.initializer):
        if before.name in second:
            assert before == after


@needs_torch
def test_finetune_without_a_runnable_factorized_layer_names_the_op(tmp_path):
    from dwsep_compiler.initialization.calibration import load_calibration
    from dwsep_compiler.initialization.finetune import finetune

    rng = np.random.default_rng(2)
    original = _backbone_then(rng, "first")
    x = rng.uniform(0, 1, (8, 2, 6, 10)).astype(np.float32)
    layerwise, layers = _layerwise(tmp_path, original, x)
    assert sum(layer.factorized for layer in layers) == 2
    calib = load_calibration([{"x": x}], original, {"x": (8, 2, 6, 10)})
    with pytest.raises(DwsepError, match="operator Hardmax") as caught:
        finetune(original, layerwise, layers, calib, steps=5)
    assert "\n" not in str(caught.value)


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
    # Three Adam steps may overshoot a good layer-wise start: then the start is what is kept.
    assert info["steps"] == 3
    assert info["loss_end"] <= info["loss_start"] or info["kept"] == "initial", info


@needs_torch
def test_end_to_end_keeps_the_layerwise_weights_when_its_loss_rises(tmp_path):
    """An lr far too large makes the calibration loss rise (here to NaN: a diverged run, which
    a plain ``end > start`` let through): the layer-wise weights come back unchanged and the
    info says so."""
    from onnx import numpy_helper as nh

    from dwsep_compiler.initialization.calibration import load_calibration
    from dwsep_compiler.initialization.finetune import finetune
    from dwsep_compiler.model import resolve_input_shapes

    result = compile_model(EXAMPLE, output_dir=str(tmp_path / "out"), compile=False, rank=2,
                           calibration=CALIBRATION)
    layerwise = onnx.load(result.model_path)
    original = onnx.load(EXAMPLE)
    calib = load_calibration(CALIBRATION, original, resolve_input_shapes(original, None))
    tuned, info = finetune(original, layerwise, result.report.layers, calib, steps=5, lr=10.0)
    assert not info["loss_end"] <= info["loss_start"] and info["kept"] == "initial", info
    before = {t.name: nh.to_array(t) for t in layerwise.graph.initializer}
    after = {t.name: nh.to_array(t) for t in tuned.graph.initializer}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
