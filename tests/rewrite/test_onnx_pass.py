"""The ONNX pass: exact at full rank on every conv configuration, named skips, untouched input."""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from dwsep_compiler.initialization import lowrank
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx

from helpers import conv_model, make_model, rel_error, run_onnx, small_cnn


@st.composite
def conv_configs(draw):
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    auto_pad = draw(st.sampled_from([None, None, "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime (the reference) refuses dilation with SAME_* padding.
    dilations = ((1, 1) if auto_pad and auto_pad.startswith("SAME")
                 else (draw(st.integers(1, 3)), draw(st.integers(1, 3))))
    pads = tuple(draw(st.integers(0, k - 1)) for k in (*kernel, *kernel))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    hw = tuple(e + draw(st.integers(0, 6)) for e in extent)
    return dict(
        in_channels=draw(st.integers(1, 64)), out_channels=draw(st.integers(1, 64)),
        kernel=kernel, strides=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        dilations=dilations, pads=pads, auto_pad=auto_pad, bias=draw(st.booleans()),
        batch_norm=draw(st.booleans()), input_hw=hw, batch=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**31 - 1)))


def _build(config):
    config = dict(config)
    rng = np.random.default_rng(config.pop("seed"))
    batch = config.pop("batch")
    model = conv_model(rng, **config)
    x = rng.standard_normal((batch, config["in_channels"], *config["input_hw"])).astype(np.float32)
    return model, x


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_full_rank_rewrite_matches_onnxruntime(config):
    model, x = _build(config)
    before = model.SerializeToString()
    result = factorize_onnx(model, {"x": x.shape}, RankPolicy(rank="full", force=True))
    assert model.SerializeToString() == before, "the input model was modified"
    layer = result.layers[0]
    expected = run_onnx(model, {"x": x})[0]
    actual = run_onnx(result.model, {"x": x})[0]
    assert actual.shape == expected.shape
    if config["kernel"] == (1, 1):
        assert layer.status == "skipped" and layer.reason == "kernel_1x1"
        return
    assert layer.status == "factorized"
    assert layer.bn_folded == config["batch_norm"]
    assert rel_error(actual, expected) < 1e-5
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "Conv", "Relu"], ops


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(1, 4))
def test_rank_r_weight_error_is_the_dropped_energy(config, rank):
    if config["kernel"] == (1, 1):
        config["kernel"] = (3, 1)
        config["pads"] = (1, 0, 1, 0)
    model, x = _build(config)
    result = factorize_onnx(model, {"x": x.shape}, RankPolicy(rank=rank, force=True))
    layer = result.layers[0]
    assert layer.status == "factorized"
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    dw = inits["conv_dw_weight"]
    pw = inits["conv_pw_weight"]
    kernel = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W"))
    if config["batch_norm"]:
        p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        kernel, _ = lowrank.fold_batch_norm(kernel, p.get("B"), p["scale"], p["shift"],
                                            p["mean"], p["var"], 1e-3)
    n, m = kernel.shape[:2]
    chosen = min(rank, n, kernel.shape[2] * kernel.shape[3])
    assert layer.rank == chosen and dw.shape[0] == m * chosen
    singular = np.stack([np.linalg.svd(kernel[:, c].reshape(n, -1).astype(np.float64),
                                       compute_uv=False) for c in range(m)])
    dropped = np.sum(singular[:, chosen:] ** 2)
    total = np.sum(singular ** 2)
    error = np.sum((lowrank.compose(dw, pw, m).astype(np.float64) - kernel) ** 2)
    assert error == pytest.approx(dropped, rel=1e-3, abs=1e-5 * total)
    assert layer.weight_rel_error == pytest.approx(np.sqrt(dropped / total), rel=1e-4, abs=1e-6)


def test_report_counts_macs_and_params():
    rng = np.random.default_rng(0)
    model = conv_model(rng, in_channels=8, out_channels=32, kernel=(3, 5), strides=(2, 1),
                       pads=(1, 2, 1, 2), input_hw=(20, 20))
    result = factorize_onnx(model, {"x": (3, 8, 20, 20)}, RankPolicy(rank=2))
    layer = result.layers[0]
    ho, wo = (20 + 2 - 3) // 2 + 1, (20 + 4 - 5) // 1 + 1
    assert layer.macs_before == 3 * 32 * 8 * 15 * ho * wo
    assert layer.macs_after == 3 * (8 * 2 * 15 + 32 * 8 * 2) * ho * wo
    assert layer.params_before == 32 * 8 * 15 + 32
    assert layer.params_after == 8 * 2 * 15 + 32 * 16 + 32
    assert (layer.in_channels, layer.out_channels, layer.kernel, layer.stride) == (8, 32, [3, 5], [2, 1])


def test_every_skip_has_a_named_reason():
    rng = np.random.default_rng(1)
    model = small_cnn(rng, channels=(3, 8, 16))
    result = factorize_onnx(model, {"x": (1, 3, 16, 16)}, RankPolicy(rank=1), skip={"conv2"})
    reasons = {layer.name: (layer.status, layer.reason) for layer in result.layers}
    assert reasons == {
        "conv1": ("factorized", None),
        "conv2": ("skipped", "skipped_by_user"),
        "pointwise": ("skipped", "kernel_1x1"),
        "depthwise": ("skipped", "grouped_or_depthwise"),
    }
    # 3 -> 8 at rank 8 would not cut MACs: 8 * (9 + 8) >= 8 * 9.
    result = factorize_onnx(model, {"x": (1, 3, 16, 16)}, RankPolicy(rank=8))
    assert result.layers[0].reason == "no_mac_reduction"
    for layer in result.layers:
        if layer.status == "skipped":
            assert layer.macs_after == layer.macs_before
            assert layer.detail


def test_non_constant_and_non_float32_weights_are_skipped():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="runtime_w")],
                       [x, w_in], [y], [])
    result = factorize_onnx(model, {"x": (1, 4, 8, 8), "w": (8, 4, 3, 3)}, RankPolicy(rank=1))
    assert result.layers[0].reason == "non_constant_weights"

    xd = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4, 8, 8])
    w = numpy_helper.from_array(np.ones((8, 4, 3, 3)), "w")
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="f64")], [xd], [y], [w])
    result = factorize_onnx(model, {"x": (1, 4, 8, 8)}, RankPolicy(rank=1))
    assert result.layers[0].reason == "non_float32_weights"


def test_rewritten_model_keeps_interface_and_opset():
    rng = np.random.default_rng(2)
    model = small_cnn(rng)
    result = factorize_onnx(model, {"x": (1, 3, 16, 16)}, RankPolicy(rank=1))
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert [o.name for o in result.model.graph.output] == ["logits"]
    assert result.model.graph.input[0].type == model.graph.input[0].type
    assert list(result.model.opset_import) == list(model.opset_import)
    onnx.checker.check_model(result.model, full_check=True)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)  # symbolic batch still works
    assert run_onnx(result.model, {"x": x})[0].shape == (2, 10)


def test_conv1d_runtime_bias_and_unknown_shape_are_skipped_by_name():
    """The README's other skip reasons, each on a model where it is the only obstacle; the
    model around them still runs in onnxruntime as before."""
    rng = np.random.default_rng(4)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)

    # not_2d: a 1-D conv (3-D weight)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4, 3)).astype(np.float32), "w")
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1d", pads=[1, 1])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
                       [y], [w1])
    assert factorize_onnx(model, {"x": (1, 4, 16)}, RankPolicy(rank=1)).layers[0].reason == \
        "not_2d"

    # non_constant_bias: the bias is a graph input
    w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="runtime_b")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
                        helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])], [y], [w])
    result = factorize_onnx(model, {"x": (1, 4, 8, 8), "b": (8,)}, RankPolicy(rank=1))
    assert result.layers[0].reason == "non_constant_bias"

    # unknown_shape: the conv's input is reshaped to a shape known only at run time
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [4])
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["r"]),
                        helper.make_node("Conv", ["r", "w"], ["y"], name="late_shape")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256]), shape],
                       [y], [w])
    result = factorize_onnx(model, {"x": (1, 256), "shape": (4,)}, RankPolicy(rank=1))
    assert result.layers[0].reason == "unknown_shape"
    feed = {"x": rng.standard_normal((1, 256)).astype(np.float32),
            "shape": np.array([1, 4, 8, 8], np.int64)}
    assert rel_error(run_onnx(result.model, feed)[0], run_onnx(model, feed)[0]) == 0.0


def test_weights_from_constant_nodes_are_rewritten():
    """Weights and bias as ``Constant`` node outputs (exporters write them so): factorized, and
    exact at full rank."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    model = make_model(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
         helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b, "b")),
         helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [])
    result = factorize_onnx(model, {"x": (1, 6, 10, 10)}, RankPolicy(rank="full", force=True))
    assert [layer.status for layer in result.layers] == ["factorized"]
    x = rng.standard_normal((1, 6, 10, 10)).astype(np.float32)
    assert rel_error(run_onnx(result.model, {"x": x})[0], run_onnx(model, {"x": x})[0]) < 1e-5
