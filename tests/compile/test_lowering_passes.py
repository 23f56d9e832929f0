"""The CPU lowering passes (`passes/lowering`), each on a model that makes it fire: what it
rewrites into, that the rule meant for the result claims it, and that the built library still
matches onnxruntime at every x86 width."""


import numpy as np
import pytest
import tvm

from dwsep_compiler.compile import cpu as cpu_build
from dwsep_compiler.compile import import_onnx
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs
from dwsep_compiler.targets import resolve_target

from helpers import conv_model, rel_error, run_onnx, run_widths

HOST = resolve_target("host")


@pytest.mark.parametrize("strides,hw", [((2, 2), (14, 14)), ((2, 1), (15, 9)), ((3, 2), (7, 11))])
def test_strided_pointwise_becomes_slice_then_gemm(strides, hw):
    """A strided 1x1 conv (ResNet's projections) is rewritten to a strided slice and a stride-1
    pointwise conv that the Pointwise rule schedules; the output matches onnxruntime."""
    from dwsep_compiler.passes.lowering.strided_pointwise import StridedPointwiseToSlice

    model = conv_model(np.random.default_rng(hw[0]), in_channels=24, out_channels=40,
                       kernel=(1, 1), strides=strides, pads=(0, 0, 0, 0), input_hw=hw)
    shape = (1, 24, *hw)
    mod = import_onnx(model, {"x": shape})
    rewrite = StridedPointwiseToSlice()
    rewrite(mod)
    assert rewrite.rewritten == 1
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert "Pointwise" in applied.values() and "Conv2D" not in applied.values(), applied
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


# (in, out, kernel, strides, pads, output_padding, dilations, group, hw): a decoder's 4x4 / 2,
# a 3x3 / 2 with output padding, asymmetric pads on odd sizes, a dilated stride-1 one, a 1x1;
# grouped ones stay transposed convs.
CONV_TRANSPOSE_CASES = [
    (16, 8, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), (1, 1), 1, (14, 14)),
    (12, 20, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (1, 1), 1, (9, 7)),
    (5, 7, (3, 2), (3, 2), (0, 1, 2, 0), (0, 1), (1, 1), 1, (6, 11)),
    (8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (0, 0), (2, 2), 1, (10, 10)),
    (6, 10, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (1, 1), 1, (5, 5)),
    (8, 8, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), (1, 1), 2, (8, 8)),
]


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES,
                         ids=lambda c: f"{c[0]}x{c[1]}k{c[2][0]}x{c[2][1]}s{c[3][0]}g{c[7]}")
def test_transposed_convs_become_convs_over_the_dilated_input(case):
    """ConvTranspose (decoders, upsampling): a stride dilation of the input and a stride-1 conv
    with the flipped kernel, which the conv rules schedule (TVM's legalized transposed conv only
    took the generic fallback: a small decoder 819 ms against onnxruntime's 10); outputs match
    onnxruntime, grouped ones included (left as they are)."""
    from onnx import helper, numpy_helper

    from dwsep_compiler.passes.lowering.conv_transpose import ConvTransposeToConv
    from helpers import make_model

    cin, cout, kernel, strides, pads, output_padding, dilations, group, hw = case
    rng = np.random.default_rng(cin * cout)
    w = numpy_helper.from_array(
        rng.standard_normal((cin, cout // group, *kernel)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B")
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], kernel_shape=list(kernel),
                          strides=list(strides), pads=list(pads), dilations=list(dilations),
                          output_padding=list(output_padding), group=group),
         helper.make_node("Relu", ["c"], ["y"])],
        [helper.make_tensor_value_info("x", 1, [1, cin, *hw])],
        [helper.make_tensor_value_info("y", 1, None)], [w, b])
    shape = (1, cin, *hw)
    mod = import_onnx(model, {"x": shape})
    rewrite = ConvTransposeToConv()
    rewrite(mod)
    assert rewrite.rewritten == int(group == 1)
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    transposed = [name for name in applied if "conv2d_transpose" in name]
    assert (transposed == []) == (group == 1), applied
    if group == 1:
        assert {"Conv2D", "Pointwise"} & set(applied.values()), applied
    x = rng.standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    expected = run_onnx(model, {"x": x})[0]
    assert out.shape == expected.shape
    assert rel_error(out, expected) < 1e-5


def test_padded_or_3x3_strided_convs_are_not_rewritten():
    from dwsep_compiler.passes.lowering.strided_pointwise import StridedPointwiseToSlice

    for kernel, pads in [((1, 1), (1, 1, 1, 1)), ((3, 3), (0, 0, 0, 0))]:
        model = conv_model(np.random.default_rng(0), kernel=kernel, strides=(2, 2), pads=pads)
        rewrite = StridedPointwiseToSlice()
        rewrite(import_onnx(model, {"x": (1, 8, 12, 12)}))
        assert rewrite.rewritten == 0, (kernel, pads)


def test_sigmoid_is_vectorizable_and_matches_onnxruntime():
    """Sigmoid is rewritten to 1 / (1 + 2^(-x log2 e)) before legalization, and a pointwise
    conv's SiLU epilogue x * sigmoid(x) to x / (1 + 2^(-x log2 e)) (no multiply left), fused
    into the conv; both stay within 1e-5 of onnxruntime over float32's range, saturation
    included."""
    from onnx import helper, numpy_helper

    from dwsep_compiler.passes.lowering.fast_sigmoid import FastSigmoid
    from helpers import make_model

    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((24, 12, 1, 1)).astype(np.float32), "W")
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Sigmoid", ["c"], ["s"]),
         helper.make_node("Mul", ["c", "s"], ["y"]), helper.make_node("Sigmoid", ["x"], ["z"])],
        [helper.make_tensor_value_info("x", 1, [1, 12, 10, 9])],
        [helper.make_tensor_value_info("y", 1, [1, 24, 10, 9]),
         helper.make_tensor_value_info("z", 1, [1, 12, 10, 9])], [w])
    shape = (1, 12, 10, 9)
    mod = import_onnx(model, {"x": shape})
    rewrite = FastSigmoid()
    mod = rewrite(mod)
    assert rewrite.rewritten == 3  # two sigmoids, and the SiLU made one division
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert any(rule == "Pointwise" and name.endswith("_silu")
               for name, rule in applied.items()), applied
    assert not any("multiply" in name for name in applied), applied
    x = (rng.standard_normal(shape) * 30).astype(np.float32)  # saturates both ends
    x.flat[:4] = [-100.0, 100.0, 0.0, -87.0]
    outs = run_widths(mod, [x])
    for out, expected in zip(outs, run_onnx(model, {"x": x})):
        assert rel_error(out, expected) < 1e-5


def test_fast_sigmoid_passes_over_calls_that_return_tuples():
    """A split (its call returns a tuple, which has no dtype) in front of a SiLU: the pass
    rewrites the SiLU and leaves the split alone; the output matches onnxruntime."""
    from onnx import helper

    from dwsep_compiler.passes.lowering.fast_sigmoid import FastSigmoid
    from helpers import make_model

    model = make_model(
        [helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
         helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["y"]),
         helper.make_node("Add", ["y", "b"], ["z"])],
        [helper.make_tensor_value_info("x", 1, [1, 8, 5, 6])],
        [helper.make_tensor_value_info("z", 1, [1, 4, 5, 6])], [], opset=18)
    mod = import_onnx(model, {"x": (1, 8, 5, 6)})
    rewrite = FastSigmoid()
    mod = rewrite(mod)
    assert rewrite.rewritten == 2
    x = (np.random.default_rng(1).standard_normal((1, 8, 5, 6)) * 10).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


def _on_float32_grid(compute):
    """``(x, compute(x))`` float64, computed in float32 by a kernel built from the TE function
    ``compute``: a dense grid over [-100, 100] and, first, the extremes (+-3.4e38, 0, +-88,
    1e-30)."""
    from tvm import te

    x = te.placeholder((200003,), "float32", name="x")
    kernel = tvm.compile(te.create_prim_func([x, compute(x)]), target="llvm")
    xs = np.linspace(-100, 100, 200003).astype(np.float32)
    xs[:6] = [-3.4e38, 3.4e38, 0.0, -88.0, 88.0, 1e-30]
    out = tvm.runtime.tensor(np.zeros_like(xs))
    kernel(tvm.runtime.tensor(xs), out)
    return xs.astype(np.float64), out.numpy().astype(np.float64)


def test_fast_sigmoid_is_float32_accurate_over_its_whole_range():
    """The base-2 sigmoid (a degree-5 polynomial, the exponent added to the float's bits), on a
    dense grid of float32 inputs plus the extremes, against float64 numpy: absolute error under
    2e-7 everywhere, relative under 1e-5 wherever the sigmoid is above 1e-30 (the clamp at
    |z| = 125 leaves 2^-125 below that), exactly 0.5 at 0 and never NaN."""
    from dwsep_compiler.passes.lowering.fast_sigmoid import fast_sigmoid

    xs, got = _on_float32_grid(fast_sigmoid)
    with np.errstate(over="ignore"):
        ref = 1.0 / (1.0 + np.exp(-xs))
    assert not np.isnan(got).any() and got[2] == 0.5
    assert np.abs(got - ref).max() < 2e-7
    live = ref > 1e-30
    assert (np.abs(got - ref)[live] / ref[live]).max() < 1e-5


def test_fast_silu_is_float32_accurate_over_its_whole_range():
    """SiLU as x / (1 + 2^(-x log2 e)), on the same grid: relative error under 1e-5 wherever
    |silu| is above 1e-30 (under that the clamp leaves x / 2^125), exactly 0 at 0, x itself
    at the largest floats, never NaN."""
    from dwsep_compiler.passes.lowering.fast_sigmoid import fast_silu

    xs, got = _on_float32_grid(fast_silu)
    with np.errstate(over="ignore"):
        ref = xs / (1.0 + np.exp(-xs))
    assert not np.isnan(got).any() and got[2] == 0.0 and got[1] == xs[1]
    live = np.abs(ref) > 1e-30
    assert (np.abs(got - ref)[live] / np.abs(ref[live])).max() < 1e-5


@pytest.mark.parametrize("kind", ["3x3", "1x1-packed", "depthwise", "bn-on-input"])
def test_batch_norm_folds_into_the_conv_or_decomposes(kind):
    """Conv + bias + BatchNormalization + ReLU: the batch norm is folded into the conv's weights
    and bias (one kernel: conv, add, relu); a batch norm on the graph input is decomposed into
    elementwise ops; no batch_norm kernel is left and the output matches onnxruntime."""
    from onnx import helper, numpy_helper

    from dwsep_compiler.passes.lowering.fold_bn import FoldBatchNormIntoConv2D
    from dwsep_compiler.tuning import gating
    from helpers import make_model

    rng = np.random.default_rng(7)
    hw, cin, cout = (7, 7), (96 if kind == "1x1-packed" else 8), 32
    if kind == "bn-on-input":
        stats = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
                 [("g", rng.uniform(0.5, 1.5, cin)), ("b", rng.standard_normal(cin)),
                  ("m", rng.standard_normal(cin)), ("v", rng.uniform(0.5, 1.5, cin))]]
        model = make_model([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"],
                                             ["y"], epsilon=1e-3)],
                           [helper.make_tensor_value_info("x", 1, [1, cin, *hw])],
                           [helper.make_tensor_value_info("y", 1, [1, cin, *hw])], stats)
    else:
        kernel, group, cout = {"3x3": ((3, 3), 1, 16), "1x1-packed": ((1, 1), 1, 32),
                               "depthwise": ((3, 3), cin, cin)}[kind]
        pads = (1, 1, 1, 1) if kernel == (3, 3) else (0, 0, 0, 0)
        model = conv_model(rng, in_channels=cin, out_channels=cout, kernel=kernel, pads=pads,
                           input_hw=hw, batch_norm=True, group=group)
    shape = (1, cin, *hw)
    mod = import_onnx(model, {"x": shape})
    fold = FoldBatchNormIntoConv2D()
    fold(mod)
    assert fold.rewritten == (0 if kind == "bn-on-input" else 1)
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert not any("batch_norm" in name for name in applied), applied
    if kind != "bn-on-input":
        conv = [n for n in applied if "conv2d" in n]
        assert len(conv) == 1 and "relu" in conv[0], applied
        assert kind != "1x1-packed" or "conv2d_packed" in conv[0], applied
        # The tuning gate still finds the conv's kernel by its ONNX weight (folded, packed).
        weight = {t.name: t for t in model.graph.initializer}["W"]
        wanted = gating.digest(numpy_helper.to_array(weight))
        assert any(wanted in held for _, held in gating.kernel_calls(mod, HOST.tvm_target()))
    x = rng.standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


def test_onnx_sum_becomes_adds_fused_into_the_conv():
    """ONNX Sum (a residual add, here with a broadcast third input): imported as stack + sum,
    rewritten into adds that fuse with the ReLU into the conv's kernel; matches onnxruntime."""
    from onnx import helper, numpy_helper

    from dwsep_compiler.passes.lowering.sum_to_add import SumToAdd
    from helpers import make_model

    rng = np.random.default_rng(8)
    w = numpy_helper.from_array(rng.standard_normal((12, 12, 3, 3)).astype(np.float32), "W")
    c = numpy_helper.from_array(rng.standard_normal((12, 1, 1)).astype(np.float32), "C")
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Sum", ["conv", "x"], ["s2"]),
         helper.make_node("Sum", ["s2", "C", "x"], ["s3"]),
         helper.make_node("Relu", ["s3"], ["y"])],
        [helper.make_tensor_value_info("x", 1, [1, 12, 9, 11])],
        [helper.make_tensor_value_info("y", 1, [1, 12, 9, 11])], [w, c])
    shape = (1, 12, 9, 11)
    mod = import_onnx(model, {"x": shape})
    rewrite = SumToAdd()
    rewrite(mod)
    assert rewrite.rewritten == 2
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert not any("stack" in name or "sum" in name for name in applied), applied
    assert len(applied) == 1 and "relu" in next(iter(applied)), applied
    x = rng.standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


def test_inference_dropout_is_removed_and_the_pool_before_it_gets_its_rule():
    """Inception's head: a global average pool then Dropout (imported as a copy plus a mask).
    The dropout is the identity at inference: removed, so the pool is one reduction the
    reduction rule takes (the fallback took the pool + dropout kernel); matches onnxruntime."""
    from onnx import helper, numpy_helper

    from dwsep_compiler.passes.lowering.drop_dropout import DropDropout
    from helpers import make_model

    rng = np.random.default_rng(11)
    w = numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "W")
    model = make_model(
        [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[7, 7]),
         helper.make_node("Dropout", ["p"], ["d"], ratio=0.4),
         helper.make_node("Flatten", ["d"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)],
        [helper.make_tensor_value_info("x", 1, [1, 16, 7, 7])],
        [helper.make_tensor_value_info("y", 1, [1, 10])], [w], opset=11)
    mod = import_onnx(model, {"x": (1, 16, 7, 7)})
    drop = DropDropout()
    drop(mod)
    assert drop.rewritten == 1
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert not any("dropout" in name for name in applied), applied
    assert {rule for name, rule in applied.items() if "pool" in name} == {"Reduction"}, applied
    x = rng.standard_normal((1, 16, 7, 7)).astype(np.float32)
    out = run_widths(mod, [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


# (channels, multiplier, hw, stride, pads): Fashion's 14x14 and 7x7 rows, a 10-wide one with
# asymmetric pads, stride 2 (56 -> 28 columns, whole vectors on 4 lanes: not widened there), a
# 2x2 map (widened to one whole 4-lane vector), a 1-column map (not widened: 4x the work).
WIDEN_CASES = [(32, 5, (14, 14), 1, (1, 1, 1, 1)), (16, 2, (7, 7), 1, (1, 1, 1, 1)),
               (12, 1, (9, 10), 1, (0, 1, 2, 1)), (8, 3, (56, 56), 2, (1, 1, 1, 1)),
               (24, 1, (2, 2), 1, (1, 1, 1, 1)), (8, 2, (5, 1), 1, (1, 1, 1, 1))]


@pytest.mark.parametrize("case", WIDEN_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2][0]}x{c[2][1]}s{c[3]}")
def test_depthwise_rows_are_widened_to_whole_vectors(case):
    """A depthwise conv (bias + ReLU after it) whose output rows are not whole vectors is
    computed at the next whole-vector width and sliced back: on NEON (16-byte vectors) the
    pass rewrites exactly the rows that are not a multiple of 4 columns and at most double;
    on this machine's widths the Depthwise rule takes the conv with the slice, bias and ReLU
    fused into it (no kernel of their own) and the output matches onnxruntime."""
    from dwsep_compiler.passes.lowering.widen_depthwise import WidenDepthwiseRows, widened_width

    channels, multiplier, hw, stride, pads = case
    model = conv_model(np.random.default_rng(channels), in_channels=channels,
                       out_channels=channels * multiplier, group=channels,
                       strides=(stride, stride), pads=pads, input_hw=hw)
    shape = (1, channels, *hw)
    mod = import_onnx(model, {"x": shape})
    out_w = (hw[1] + pads[1] + pads[3] - 3) // stride + 1
    neon = WidenDepthwiseRows(16)
    neon(mod)
    assert neon.rewritten == int(out_w % 4 != 0 and out_w >= 2), out_w
    assert widened_width(out_w, 4) == (None if not neon.rewritten else -(-out_w // 4) * 4)
    _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
    assert list(applied.values()) == ["Depthwise"], applied
    lanes = cpu_knobs(HOST.tvm_target()).lanes
    assert ("strided_slice" in next(iter(applied))) == (widened_width(out_w, lanes) is not None)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = run_widths(mod, [x])[0]
    expected = run_onnx(model, {"x": x})[0]
    assert out.shape == expected.shape and np.count_nonzero(expected) > expected.size // 4
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("rows,k,n", [(1, 300, 1000), (2, 256, 48), (3, 37, 1001)])
def test_dense_weights_pack_into_tiles_and_compute_the_same(rows, k, n):
    """`pack_dense.py` (NEON's pipeline runs it; here it is applied by hand so that x86 builds
    check its arithmetic at every width): a Gemm's transposed constant weight becomes
    ``[K/R, N/C, R, C]`` tiles that the dense rule claims, and the library still matches
    onnxruntime; columns that are no whole vectors (1001) keep the plain matmul."""
    from onnx import helper, numpy_helper

    from dwsep_compiler.passes import names
    from dwsep_compiler.passes.lowering.pack_dense import PackDenseWeights
    from dwsep_compiler.schedules.cpu.dense import packed_dense_tile

    from helpers import make_model

    rng = np.random.default_rng(k)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", 1, [rows, k])],
                       [helper.make_tensor_value_info("y", 1, [rows, n])], inits)
    rewrite = PackDenseWeights(lanes=4)
    mod = rewrite(import_onnx(model, {"x": (rows, k)}))
    tile = packed_dense_tile(rows, k, n, 4)
    assert rewrite.rewritten == (tile is not None)
    if tile is not None:
        r, c = tile
        shape = ", ".join(f"T.int64({d})" for d in (k // r, n // c, r, c))
        assert f"T.Buffer(({shape})" in mod[names.PACKED_DENSE].script(), mod.script()
        _, applied = cpu_build.schedule_module(mod, HOST.tvm_target())
        assert [rule for name, rule in applied.items() if names.PACKED_DENSE in name] == ["Dense"]
    x = rng.standard_normal((rows, k)).astype(np.float32)
    assert rel_error(run_widths(mod, [x])[0], run_onnx(model, {"x": x})[0]) < 1e-5
