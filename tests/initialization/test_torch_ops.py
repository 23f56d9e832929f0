"""The torch executor of the end-to-end stage, operator by operator against onnxruntime, and
end to end through a recurrent head."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, rel_error, run_onnx

torch = pytest.importorskip("torch")  # tests/run.sh installs it: nothing skips there

from dwsep_compiler.initialization.finetune import OnnxModule  # noqa: E402

F32 = TensorProto.FLOAT


def _check(nodes, inputs: dict, initializers=(), outputs=None, opset=13, tol=1e-5):
    """Build a model of ``nodes``, run it in onnxruntime and in `OnnxModule`, compare."""
    values = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                            list(array.shape)) for name, array in inputs.items()]
    outputs = outputs or [nodes[-1].output[0]]
    model = make_model(nodes, values, [helper.make_empty_tensor_value_info(o) for o in outputs],
                       [numpy_helper.from_array(v, k) for k, v in dict(initializers).items()],
                       opset=opset)
    expected = run_onnx(model, inputs, outputs)
    with torch.no_grad():
        got = OnnxModule(model)(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    for name, want in zip(outputs, expected):
        have = got[name].numpy()
        assert have.shape == want.shape, (name, have.shape, want.shape)
        if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(have, want)
        else:
            assert rel_error(have, want) < tol, (name, rel_error(have, want))


RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _i64(*values):
    return np.array(values, dtype=np.int64)


@pytest.mark.parametrize("op, attrs", [
    ("Tanh", {}), ("Exp", {}), ("Erf", {}), ("Neg", {}), ("Abs", {}), ("Softplus", {}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("HardSwish", {}), ("Elu", {"alpha": 0.7}),
    ("Floor", {}), ("Ceil", {}), ("Softmax", {"axis": 1}), ("LogSoftmax", {"axis": -1}),
])
def test_unary(op, attrs):
    _check([helper.make_node(op, ["x"], ["y"], **attrs)], {"x": _x(2, 5, 3)},
           opset=14 if op == "HardSwish" else 13)


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_positive_unary(op):
    _check([helper.make_node(op, ["x"], ["y"])], {"x": np.abs(_x(3, 4)) + 0.1})


@pytest.mark.parametrize("op", ["Pow", "Max", "Min", "Sum", "Add", "Div"])
def test_binary_broadcast(op):
    a = np.abs(_x(2, 3, 4)) + 0.5 if op == "Pow" else _x(2, 3, 4)
    _check([helper.make_node(op, ["a", "b"], ["y"])], {"a": a, "b": _x(3, 1)})


@pytest.mark.parametrize("op", ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"])
def test_comparisons_and_where(op):
    a = np.round(_x(3, 4))
    b = np.round(_x(1, 4))
    _check([helper.make_node(op, ["a", "b"], ["c"]),
            helper.make_node("Not", ["c"], ["n"]),
            helper.make_node("Or", ["c", "n"], ["o"]),
            helper.make_node("And", ["c", "o"], ["d"]),
            helper.make_node("Where", ["d", "a", "b"], ["y"])],
           {"a": a, "b": b}, outputs=["y", "d"])


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"])
@pytest.mark.parametrize("axes, keep", [([1], 1), ([-1, 0], 0), (None, 1)])
def test_reductions_axes_attribute(op, axes, keep):
    attrs = {"keepdims": keep, **({"axes": axes} if axes is not None else {})}
    _check([helper.make_node(op, ["x"], ["y"], **attrs)], {"x": _x(2, 3, 4)}, opset=13)


@pytest.mark.parametrize("axes, keep", [([1], 1), ([0, 2], 0)])
def test_reductions_axes_input(axes, keep):
    _check([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=keep)],
           {"x": _x(2, 3, 4)}, {"axes": _i64(*axes)}, opset=13)
    _check([helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keep)],
           {"x": _x(2, 3, 4)}, {"axes": _i64(*axes)}, opset=18)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("last", [0, 1])
def test_arg_reductions(op, last):
    x = np.round(_x(3, 5) * 2)  # ties
    _check([helper.make_node(op, ["x"], ["y"], axis=1, keepdims=0, select_last_index=last)],
           {"x": x})


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([1, 0], [3, -1], [0, 2], [1, 2]),
    ([-1], [-100], [1], [-1]),
    ([5, 2], [0, 100], [2, 1], [-2, 1]),
    ([0], [1000], [-1], None),
])
def test_slice(starts, ends, axes, steps):
    init = {"s": _i64(*starts), "e": _i64(*ends), "a": _i64(*axes)}
    names = ["x", "s", "e", "a"]
    if steps is not None:
        init["st"] = _i64(*steps)
        names.append("st")
    _check([helper.make_node("Slice", names, ["y"])], {"x": _x(4, 5, 6)}, init)


def test_split_and_concat():
    _check([helper.make_node("Split", ["x", "s"], ["a", "b", "c"], axis=1),
            helper.make_node("Concat", ["c", "a"], ["y"], axis=1)],
           {"x": _x(2, 7, 3)}, {"s": _i64(2, 4, 1)}, outputs=["y", "b"])
    _check([helper.make_node("Split", ["x"], ["a", "b"], axis=-1)], {"x": _x(2, 6)},
           outputs=["a", "b"])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode):
    pads = _i64(0, 0, 1, 2, 0, 0, 2, 1)
    inputs = ["x", "p"] + (["v"] if mode == "constant" else [])
    init = {"p": pads, **({"v": np.array(1.5, np.float32)} if mode == "constant" else {})}
    _check([helper.make_node("Pad", inputs, ["y"], mode=mode)], {"x": _x(1, 2, 4, 5)}, init)


def test_pad_negative_crops():
    _check([helper.make_node("Pad", ["x", "p"], ["y"])], {"x": _x(1, 2, 4, 5)},
           {"p": _i64(0, 0, -1, 1, 0, 0, 0, -2)})


def test_cast_expand_tile_range():
    _check([helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
            helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Expand", ["f", "shape"], ["e"]),
            helper.make_node("Tile", ["e", "reps"], ["y"])],
           {"x": _x(3, 1) * 4}, {"shape": _i64(2, 3, 4), "reps": _i64(1, 2, 1)},
           outputs=["y", "i"])
    _check([helper.make_node("Range", ["a", "b", "d"], ["y"])], {"a": np.array(1.0, np.float32)},
           {"b": np.array(7.0, np.float32), "d": np.array(1.5, np.float32)})


def test_matmul_transpose_gather_layernorm():
    _check([helper.make_node("MatMul", ["a", "b"], ["m"]),
            helper.make_node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),
            helper.make_node("Gather", ["t", "idx"], ["g"], axis=1),
            helper.make_node("LayerNormalization", ["g", "s", "bias"], ["y"], axis=-1)],
           {"a": _x(2, 3, 4), "b": _x(4, 5)},
           {"idx": _i64(4, 0, -1), "s": _x(3), "bias": _x(3)}, opset=17, tol=1e-4)


@pytest.mark.parametrize("mode, transform, nearest", [
    ("nearest", "asymmetric", "floor"),
    ("nearest", "half_pixel", "round_prefer_floor"),
    ("nearest", "align_corners", "round_prefer_ceil"),
    ("linear", "half_pixel", None),
    ("linear", "align_corners", None),
    ("linear", "asymmetric", None),
    ("linear", "pytorch_half_pixel", None),
])
@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize(mode, transform, nearest, by):
    attrs = {"mode": mode, "coordinate_transformation_mode": transform}
    if nearest:
        attrs["nearest_mode"] = nearest
    init = {"roi": np.zeros(0, np.float32)}
    if by == "scales":
        init["scales"] = np.array([1, 1, 2.0, 1.5], np.float32)
        names = ["x", "roi", "scales"]
    else:
        init["scales"] = np.zeros(0, np.float32)
        init["sizes"] = _i64(1, 2, 7, 5)
        names = ["x", "roi", "scales", "sizes"]
    _check([helper.make_node("Resize", names, ["y"], **attrs)], {"x": _x(1, 2, 4, 6)}, init,
           tol=1e-5)


def _rnn_weights(op, directions, hidden, inputs, peepholes=False):
    gates = 4 if op == "LSTM" else 3
    init = {"W": _x(directions, gates * hidden, inputs) * 0.5,
            "R": _x(directions, gates * hidden, hidden) * 0.5,
            "B": _x(directions, 2 * gates * hidden) * 0.5}
    if peepholes:
        init["P"] = _x(directions, 3 * hidden) * 0.5
    return init


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("extras", ["plain", "lens_and_states"])
def test_recurrent(op, direction, extras):
    directions, hidden, seq, batch, size = (2 if direction == "bidirectional" else 1), 5, 6, 3, 4
    init = _rnn_weights(op, directions, hidden, size)
    attrs = {"hidden_size": hidden, "direction": direction}
    names = ["x", "W", "R", "B"]
    outs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    x = _x(seq, batch, size)
    if extras == "lens_and_states":
        init["lens"] = np.array([6, 2, 4], np.int32)
        init["h0"] = _x(directions, batch, hidden)
        names += ["lens", "h0"]
        if op == "LSTM":
            init["c0"] = _x(directions, batch, hidden)
            names.append("c0")
    if op == "GRU" and extras != "plain":
        attrs["linear_before_reset"] = 1
    _check([helper.make_node(op, names, outs, **attrs)], {"x": x}, init, outputs=outs,
           opset=14, tol=1e-4)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_recurrent_batch_major_layout(op):
    """layout=1 ([batch, seq, ...]; onnxruntime refuses it): the same as layout 0 in
    onnxruntime on the transposed input, outputs transposed back."""
    hidden, seq, batch, size = 5, 6, 3, 4
    init = _rnn_weights(op, 2, hidden, size)
    init["lens"] = np.array([6, 2, 4], np.int32)
    init["h0"] = _x(2, batch, hidden)
    outs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    names = ["x", "W", "R", "B", "lens", "h0"]

    def build(layout):
        values = dict(init, h0=init["h0"].transpose(1, 0, 2) if layout else init["h0"])
        node = helper.make_node(op, names, outs, hidden_size=hidden, direction="bidirectional",
                                layout=layout)
        return make_model([node], [helper.make_tensor_value_info("x", F32, None)],
                          [helper.make_empty_tensor_value_info(o) for o in outs],
                          [numpy_helper.from_array(v, k) for k, v in values.items()], opset=14)

    x = _x(seq, batch, size)
    expected = run_onnx(build(0), {"x": x}, outs)
    with torch.no_grad():
        got = OnnxModule(build(1))(x=torch.from_numpy(x.transpose(1, 0, 2).copy()))
    assert rel_error(got["y"].numpy(), expected[0].transpose(2, 0, 1, 3)) < 1e-4
    assert rel_error(got["y_h"].numpy(), expected[1].transpose(1, 0, 2)) < 1e-4


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_fused_recurrence_matches_onnxruntime_and_the_stepped_gradients(op, direction):
    """Where torch's own LSTM/GRU computes the node (default activations, full-length
    sequences, a GRU's linear_before_reset) the executor calls it (seen in torch's profiler):
    outputs against onnxruntime, and outputs and input gradients against the time-step loop
    (forced by a clip too large to act)."""
    directions, hidden, seq, batch, size = (2 if direction == "bidirectional" else 1), 5, 6, 3, 4
    init = _rnn_weights(op, directions, hidden, size)
    init["lens"] = np.full(batch, seq, np.int32)
    init["h0"] = _x(directions, batch, hidden)
    names = ["x", "W", "R", "B", "lens", "h0"]
    outs = ["y", "y_h"]
    if op == "LSTM":
        init["c0"] = _x(directions, batch, hidden)
        names.append("c0")
        outs.append("y_c")
    attrs = {"hidden_size": hidden, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    x = _x(seq, batch, size)
    _check([helper.make_node(op, names, outs, **attrs)], {"x": x}, init, outputs=outs,
           opset=14, tol=1e-4)

    def run(extra):
        model = make_model([helper.make_node(op, names, outs, **attrs, **extra)],
                           [helper.make_tensor_value_info("x", F32, None)],
                           [helper.make_empty_tensor_value_info(o) for o in outs],
                           [numpy_helper.from_array(v, k) for k, v in init.items()], opset=14)
        inputs = torch.from_numpy(x).requires_grad_(True)
        with torch.profiler.profile() as profile:
            got = OnnxModule(model)(x=inputs)
        sum(got[o].square().sum() for o in outs).backward()
        fused = any(e.name == f"aten::{op.lower()}" for e in profile.events())
        return fused, [got[o].detach().numpy() for o in outs], inputs.grad.numpy()

    fused, outputs, gradient = run({})
    stepped, loop_outputs, loop_gradient = run({"clip": 1e9})
    assert fused and not stepped
    for a, b in zip(outputs, loop_outputs):
        assert rel_error(a, b) < 1e-5
    assert rel_error(gradient, loop_gradient) < 1e-5


def test_lstm_peepholes_clip_input_forget():
    init = _rnn_weights("LSTM", 1, 4, 3, peepholes=True)
    init["lens"] = np.array([5, 5], np.int32)
    init["h0"] = _x(1, 2, 4)
    init["c0"] = _x(1, 2, 4)
    _check([helper.make_node("LSTM", ["x", "W", "R", "B", "lens", "h0", "c0", "P"],
                             ["y", "y_h", "y_c"], hidden_size=4, clip=0.8, input_forget=1)],
           {"x": _x(5, 2, 3)}, init, outputs=["y", "y_h", "y_c"], tol=1e-4)


def _cnn_lstm_head(rng):
    """conv -> relu -> conv -> relu -> [W, N, C] -> bidirectional LSTM -> linear: an OCR-like
    recognizer."""
    c1, c2, hidden = 8, 16, 12
    init = {
        "w1": rng.normal(size=(c1, 1, 3, 3)).astype(np.float32) * 0.5,
        "w2": rng.normal(size=(c2, c1, 3, 3)).astype(np.float32) * 0.2,
        "shape": _i64(0, c2 * 2, -1),
        "W": rng.normal(size=(2, 4 * hidden, c2 * 2)).astype(np.float32) * 0.2,
        "R": rng.normal(size=(2, 4 * hidden, hidden)).astype(np.float32) * 0.2,
        "B": rng.normal(size=(2, 8 * hidden)).astype(np.float32) * 0.1,
        "fc": rng.normal(size=(2 * hidden, 10)).astype(np.float32) * 0.3,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p2", "shape"], ["f"]),  # [N, C*H, W]
        helper.make_node("Transpose", ["f"], ["seq"], perm=[2, 0, 1]),  # [W, N, C*H]
        helper.make_node("LSTM", ["seq", "W", "R", "B"], ["y", "y_h", "y_c"], hidden_size=hidden,
                         direction="bidirectional"),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "shape2"], ["yf"]),
        helper.make_node("MatMul", ["yf", "fc"], ["logits"]),
    ]
    init["shape2"] = _i64(0, 0, -1)
    inputs = [helper.make_tensor_value_info("x", F32, [None, 1, 8, 32])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("logits", F32, None)],
                       [numpy_helper.from_array(v, k) for k, v in init.items()])
    return model


def test_end_to_end_through_an_lstm_head(tmp_path):
    from dwsep_compiler.pipeline import compile_model

    rng = np.random.default_rng(3)
    model = _cnn_lstm_head(rng)
    path = tmp_path / "ocr_like.onnx"
    onnx.save(model, path)
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=rng.random((32, 1, 8, 32), dtype=np.float32))
    x = rng.random((1, 1, 8, 32), dtype=np.float32)
    # The executor runs the whole graph, LSTM included.
    with torch.no_grad():
        got = OnnxModule(model)(x=torch.from_numpy(x))["logits"].numpy()
    assert rel_error(got, run_onnx(model, {"x": x})[0]) < 1e-4
    result = compile_model(str(path), compile=False, output_dir=str(tmp_path / "o"), rank=1,
                           calibration=str(calibration), finetune_steps=40, finetune_lr=1e-3,
                           input_shapes={"x": (1, 1, 8, 32)})
    info = result.report.calibration["finetune"]
    assert info["outputs"]["kind"] == "model outputs", info["outputs"]
    assert info["outputs"]["first_unsupported_op"] is None
    assert info["kept"] == "trained" and info["loss_end"] < info["loss_start"], info


@pytest.mark.parametrize("name, feed", [
    ("common.onnx", {"input1": (1, 1, 64, 160)}),
    ("common_det.onnx", {"images": (1, 3, 416, 416)}),
])
def test_real_ocr_and_detector_graphs_run_whole(name, feed):
    """ddddocr's recognizer (conv backbone + bidirectional LSTM head) and its detector (Slice
    focus stem, Resize, Concat necks): the executor runs every node, as onnxruntime does."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("ddddocr")
    assert spec is not None, "tests/run.sh installs ddddocr==1.6.1 (its model files)"
    model = onnx.load(os.path.join(list(spec.submodule_search_locations)[0], name))
    rng = np.random.default_rng(0)
    inputs = {k: rng.random(shape, dtype=np.float32) for k, shape in feed.items()}
    outputs = [o.name for o in model.graph.output]
    expected = run_onnx(model, inputs, outputs)
    with torch.no_grad():
        got = OnnxModule(model)(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    for out, want in zip(outputs, expected):
        assert rel_error(got[out].numpy(), want) < 1e-3, out
