"""The post-activation fit and the model-output sensitivity of the rank allocation: the math
against its definition, and each against the method it replaces on constructed cases."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dwsep_compiler.initialization import distill, output_error
from dwsep_compiler.initialization.activation import Activation
from dwsep_compiler.initialization.sensitivity import (PROBE_MACS, interpolated_gain, probe_plan,
                                                      probed_ranks)
from dwsep_compiler.pipeline import compile_model
from helpers import make_model, rel_error, run_onnx

ACTIVATIONS = [Activation.relu(), Activation.leaky_relu(0.1), Activation.clip(0.0, 6.0),
               Activation.leaky_relu(np.array([0.0, 0.2, 0.5])), Activation.smooth("Silu"),
               Activation.smooth("Sigmoid"), Activation.smooth("Tanh")]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a.name)
def test_relaxed_target_minimizes_its_objective(activation):
    """The z update against a dense grid search of the same per-element objective (exact for
    the piecewise-linear ones; the smooth line search may only beat the grid's points between
    y and the teacher)."""
    rng = np.random.default_rng(0)
    teacher, linear = rng.normal(0, 3, (200, 3)), rng.normal(0, 3, (200, 3))
    target = activation(teacher)
    for penalty in (0.01, 0.3, 3.0):
        z = activation.relaxed_target(teacher, linear, penalty)
        cost = (target - activation(z)) ** 2 + penalty * (z - linear) ** 2
        grid = np.linspace(-12, 12, 4801)[:, None, None]
        costs = (target - activation(np.broadcast_to(grid, (4801, 200, 3)))) ** 2 \
            + penalty * (grid - linear) ** 2
        if activation.function is None:
            assert np.all(cost <= costs.min(axis=0) + 1e-6)
        else:
            between = (grid >= np.minimum(linear, teacher)) & (grid <= np.maximum(linear, teacher))
            best = np.where(between, costs, np.inf).min(axis=0)
            ends = np.minimum(penalty * (teacher - linear) ** 2, (target - activation(linear)) ** 2)
            assert np.all(cost <= ends + 1e-9)  # never worse than z = teacher or z = y
            assert cost.sum() <= 1.05 * best.sum() + 1e-9  # near the best point between them


def _relu_layer(seed=0, bias=-1.5):
    """A 3x3 conv 16 -> 32 whose bias pushes most outputs below zero, and its patches."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(32, 16, 3, 3)).astype(np.float32)
    b = np.full(32, bias * 3, np.float32)
    x = rng.normal(size=(32, 16, 10, 10)).astype(np.float32)
    geometry = distill.ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1))
    patches = distill.conv_patches(x, geometry)
    teacher = patches @ w.reshape(32, -1).T + b
    return w, b, patches, teacher


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_post_activation_fit_beats_the_linear_fit_after_relu(rank):
    w, b, patches, teacher = _relu_layer()
    assert np.mean(teacher < 0) > 0.6
    gram = distill.LayerGram(16, 9, 32)
    gram.add(patches, teacher)
    linear = distill.fit_layer(gram, distill.svd_factors(w, b, rank))
    relu = Activation.relu()
    target = relu(teacher)
    before = distill.post_activation_error(patches, target, linear.factors, relu)
    fit = distill.fit_post_activation(patches, teacher, linear.factors, relu)
    assert fit.svd_error == pytest.approx(before)  # the history starts at the linear fit
    assert fit.error <= before  # never worse on the calibration pixels
    assert fit.error < 0.97 * before, (before, fit.error)
    assert distill.post_activation_error(patches, target, fit.factors, relu) == \
        pytest.approx(fit.error)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_linear_output_is_the_conv_with_the_effective_kernel(rank):
    """The factorized evaluation (depthwise, then pointwise) against the effective kernel."""
    w, b, patches, _ = _relu_layer()
    factors = distill.svd_factors(w, b, rank)
    expected = patches.astype(np.float64) @ factors.kernel().T + factors.bias
    got = distill.linear_output(patches, factors)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pixel_sample_is_bounded_and_uniform():
    geometry = distill.ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1))
    x = np.random.default_rng(0).normal(size=(20, 4, 8, 8)).astype(np.float32)
    t = np.random.default_rng(1).normal(size=(20, 6, 8, 8)).astype(np.float32)
    row_bytes = 4 * (4 * 9 + 6)
    sample = distill.PixelSample(geometry, 4, 6, total_rows=20 * 64, budget_bytes=300 * row_bytes)
    for start in range(0, 20, 5):
        sample.add_conv(x[start:start + 5], t[start:start + 5])
    patches, teacher = sample.arrays()
    assert 200 <= len(patches) <= 300 and patches.nbytes + teacher.nbytes <= 300 * row_bytes
    full = distill.conv_patches(x, geometry)
    rows = {row.tobytes() for row in full}
    assert all(row.tobytes() in rows for row in patches)  # real pixel rows, paired right:
    index = {row.tobytes(): k for k, row in enumerate(full)}
    pixels = distill.output_pixels(t)
    for row, target in zip(patches[:20], teacher[:20]):
        np.testing.assert_array_equal(target, pixels[index[row.tobytes()]])
    every = distill.PixelSample(geometry, 4, 6, total_rows=20 * 64)
    every.add_conv(x, t)
    assert len(every.arrays()[0]) == 20 * 64


def test_distillation_reports_the_post_activation_fit(tmp_path):
    """The Fashion example (conv -> BN -> ReLU): every activated layer is refit after its
    ReLU, and the refit's post-activation error is never above the linear fit's."""
    import os

    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fashion_mnist")
    result = compile_model(os.path.join(example, "fashion_cnn.onnx"), compile=False,
                           output_dir=str(tmp_path / "o"), rank=2,
                           calibration=os.path.join(example, "calibration.npz"))
    layers = [layer for layer in result.report.layers if layer.factorized]
    assert layers and all(layer.activation == "Relu" for layer in layers)
    for layer in layers:
        assert layer.post_activation_rel_error <= layer.linear_post_activation_rel_error
    assert sum(l.post_activation_rel_error for l in layers) < \
        0.98 * sum(l.linear_post_activation_rel_error for l in layers)
    linear = compile_model(os.path.join(example, "fashion_cnn.onnx"), compile=False,
                           output_dir=str(tmp_path / "l"), rank=2, fit="linear",
                           calibration=os.path.join(example, "calibration.npz"))
    assert all(layer.activation is None for layer in linear.report.layers)


# --------------------------------------------------------------------------- sensitivity

def test_probed_ranks_and_gain_interpolation():
    assert probed_ranks([1, 2, 3]) == [1, 2, 3]
    picked = probed_ranks(list(range(1, 31)), most=5)
    assert picked[0] == 1 and picked[-1] == 30 and len(picked) <= 5
    layer = {1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2}
    out = interpolated_gain(layer, {1: 1.0, 4: 0.8})  # gains 2 and 4
    assert out[1] == 1.0 and out[4] == 0.8
    assert out[2] == pytest.approx(0.4 * (2 + 2 / 3)) and out[3] == pytest.approx(0.3 * (2 + 4 / 3))


def test_probe_plan_stays_within_its_budget():
    assert probe_plan(10 ** 7, 4, 64) == (32, 5)  # a small model: everything
    assert probe_plan(10 ** 7, 4, 10) == (10, 5)  # never more inputs than given
    for macs, layers in ((4 * 10 ** 8, 10), (3 * 10 ** 9, 31), (2 * 10 ** 10, 50)):
        samples, ranks = probe_plan(macs, layers, 64)
        assert 2 <= ranks <= 5 and 4 <= samples <= 32
        assert macs * layers * samples * ranks <= PROBE_MACS or (samples, ranks) == (4, 2)


def _kernel(rng):
    """A 3x3 conv kernel [16, 8, 3, 3] whose per-input-channel singular values are 1, 1/2,
    1/4, ...: rank matters."""
    u = np.linalg.qr(rng.normal(size=(8, 16, 9)))[0]  # [M, N, 9] orthonormal columns
    v = np.linalg.qr(rng.normal(size=(8, 9, 9)))[0]
    s = 0.5 ** np.arange(9)
    return np.einsum("mnk,k,mtk->nmt", u, s, v).reshape(16, 8, 3, 3).astype(np.float32)


def _two_conv_model(wa, wb, gain, join):
    """Two 3x3 convs on the same input; the output joins ``gain * relu(convA)`` and
    ``relu(convB)`` by ``join`` ("Add": A's error reaches the same outputs ``gain`` times
    amplified; "Concat": A's outputs are separate channels ``gain`` times the scale)."""
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ya"], name="convA", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["yb"], name="convB", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ya"], ["ra"]),
             helper.make_node("Relu", ["yb"], ["rb"]),
             helper.make_node("Mul", ["ra", "gain"], ["ga"]),
             helper.make_node(join, ["ga", "rb"], ["out"],
                              **({"axis": 1} if join == "Concat" else {}))]
    inits = [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb"),
             numpy_helper.from_array(np.array(gain, np.float32), "gain")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            [1, 8, 12, 12])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)


def _amplified_model(rng):
    """``30 * relu(convA) + relu(convB)``: an error in A costs the output 30x more."""
    return _two_conv_model(_kernel(rng), _kernel(rng), 30.0, "Add")


def test_sensitivity_keeps_the_amplified_layer_richer(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "amplified.onnx"
    onnx.save(_amplified_model(rng), path)
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=rng.normal(size=(24, 8, 12, 12)).astype(np.float32))
    x = rng.normal(size=(1, 8, 12, 12)).astype(np.float32)
    reference = run_onnx(str(path), {"x": x})[0]
    results = {}
    for sensitivity in ("layer", "model-output"):
        result = compile_model(str(path), compile=False, output_dir=str(tmp_path / sensitivity),
                               macs_ratio=0.45, calibration=str(calibration),
                               sensitivity=sensitivity)
        ranks = {layer.name: layer.rank or 99 for layer in result.report.layers}
        error = rel_error(run_onnx(result.model_path, {"x": x})[0], reference)
        results[sensitivity] = (ranks, error, result.report)
        assert result.report.totals()["conv_macs_ratio"] <= 0.45
    (layer_ranks, layer_error, _), (out_ranks, out_error, report) = \
        results["layer"], results["model-output"]
    assert out_ranks["convA"] > layer_ranks["convA"], (layer_ranks, out_ranks)
    assert out_error < 0.8 * layer_error, (layer_error, out_error)
    allocation = report.rank_allocation
    assert set(allocation["sensitivity"]) == {"convA", "convB"}
    curve = allocation["sensitivity"]["convA"]
    assert curve["model_output_error_measured"] and curve["layer_error"]


# --------------------------------------------------------------------------- output error

def test_output_error_is_taken_per_feature():
    """A detector-like head ``[N, anchors, 6]``: four loud box columns, one quiet score
    column. Half the score's energy wrong is a 2.6% relative error of the whole tensor, and
    the per-feature measure sees it as the largest term; numpy and torch agree."""
    import torch

    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.normal(0, 1.5, (2, 500, 4)),
                                rng.uniform(0, 0.2, (2, 500, 1))], axis=2)
    got = reference.copy()
    got[..., 4] *= 1 + np.sqrt(0.5)
    whole = float(np.sum((got - reference) ** 2) / np.sum(reference ** 2))
    per_feature = output_error.squared_relative_error(got, reference)
    assert whole < 1e-3
    assert per_feature == pytest.approx(0.5 / 5)  # one feature of five, 50% squared
    assert float(output_error.squared_relative_error(
        torch.from_numpy(got), torch.from_numpy(reference))) == pytest.approx(per_feature)
    # a near-empty feature counts as one at QUIET times the mean energy, not as noise / 0
    quiet = reference.copy()
    quiet[..., 4] = 1e-12
    wrong = quiet.copy()
    wrong[..., 4] = 1e-6
    assert output_error.squared_relative_error(wrong, quiet) < 1e-6
    # 4-D outputs: the features are the channels (axis 1)
    image = rng.normal(size=(2, 3, 4, 5))
    image[:, 0] *= 10
    off = image.copy()
    off[:, 2] *= 2
    assert output_error.squared_relative_error(off, image) == pytest.approx(1 / 3)
    assert output_error.feature_energies(image).shape == (3,)


def test_sensitivity_prices_a_quiet_output_feature(tmp_path):
    """``Concat(0.1 * relu(convA), relu(convB))`` with the same kernel in A and B: A's
    channels are 10x quieter, not less important. The probe measures the same model-output
    error for both, so the allocation does not starve A (a whole-tensor relative error puts
    A's at 1/10 of B's and gives A the lowest rank)."""
    rng = np.random.default_rng(1)
    kernel = _kernel(rng)
    path = tmp_path / "quiet.onnx"
    onnx.save(_two_conv_model(kernel, kernel.copy(), 0.1, "Concat"), path)
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=rng.normal(size=(24, 8, 12, 12)).astype(np.float32))
    result = compile_model(str(path), compile=False, output_dir=str(tmp_path / "out"),
                           macs_ratio=0.45, calibration=str(calibration))
    ranks = {layer.name: layer.rank or 99 for layer in result.report.layers}
    measured = result.report.rank_allocation["sensitivity"]
    a, b = (measured[name]["model_output_error_measured"] for name in ("convA", "convB"))
    assert a.keys() == b.keys() and a
    for rank in a:
        assert a[rank] == pytest.approx(b[rank], rel=1e-3), (a, b)
    assert ranks["convA"] >= ranks["convB"], ranks
