"""The Relax pass makes the same decisions and computes the same outputs as the ONNX pass."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import onnx as rx_onnx

from dwsep_compiler.compile import run_executable
from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx
from dwsep_compiler.passes.rewrite.relax_factorize import FactorizeConv2D, factorize_relax

from helpers import conv_model, rel_error, run_onnx, small_cnn

HOST = tvm.target.Target({"kind": "llvm"})


def _relax(model, shape):
    return rx_onnx.from_onnx(model, shape_dict={"x": list(shape)}, keep_params_in_input=False)


@pytest.mark.parametrize("case", ["small_cnn", "conv_bn_bias", "conv_bn", "strided_1x7"])
def test_relax_and_onnx_passes_agree(case):
    rng = np.random.default_rng(7)
    if case == "small_cnn":
        model, shape = small_cnn(rng), (2, 3, 16, 16)
    elif case == "strided_1x7":
        model, shape = conv_model(rng, kernel=(1, 7), strides=(2, 3), pads=(0, 2, 0, 4),
                                  dilations=(1, 2), input_hw=(11, 19)), (1, 8, 11, 19)
    else:
        model, shape = conv_model(rng, batch_norm=True, bias=case == "conv_bn_bias"), (1, 8, 12, 12)
    policy = RankPolicy(rank=2)
    x = rng.standard_normal(shape).astype(np.float32)

    onnx_result = factorize_onnx(model, {"x": shape}, policy)
    mod, layers = factorize_relax(_relax(model, shape), policy)
    relax_out = run_executable(tvm.compile(mod, target=HOST), [x])[0]
    onnx_out = run_onnx(onnx_result.model, {"x": x})[0]
    assert rel_error(relax_out, onnx_out) < 1e-5

    # Same decisions: status, reason, rank, MACs and error for each conv, in graph order.
    def key(layer):
        return (layer.status, layer.reason, layer.rank, layer.macs_before, layer.macs_after,
                round(layer.weight_rel_error or 0.0, 5))
    assert [key(layer) for layer in layers] == [key(layer) for layer in onnx_result.layers]
    assert any(layer.factorized for layer in layers)
    # And the rewrite is real: rank 2 differs from the original.
    assert rel_error(relax_out, run_onnx(model, {"x": x})[0]) > 1e-3


def test_factorize_conv2d_inside_a_users_sequential():
    rng = np.random.default_rng(8)
    model = conv_model(rng, in_channels=4, out_channels=24, bias=False)
    x = rng.standard_normal((1, 4, 12, 12)).astype(np.float32)
    factorize = FactorizeConv2D(rank="full", force=True)
    seq = tvm.transform.Sequential([relax.transform.FoldConstant(), factorize,
                                    relax.transform.FoldConstant()])
    mod = seq(_relax(model, x.shape))
    text = mod.script()
    assert text.count("R.nn.conv2d") == 2 and "groups=4" in text
    assert [layer.status for layer in factorize.layers] == ["factorized"]
    out = run_executable(tvm.compile(mod, target=HOST), [x])[0]
    assert rel_error(out, run_onnx(model, {"x": x})[0]) < 1e-5


def test_a_non_nchw_conv_is_skipped_as_unsupported_layout():
    """A Relax conv2d in NHWC / HWIO (what other frontends emit) is left alone and named."""
    from tvm.script import relax as R

    w = np.random.default_rng(9).standard_normal((3, 3, 4, 8)).astype(np.float32)

    @tvm.script.ir_module
    class NHWC:
        @R.function
        def main(x: R.Tensor((1, 12, 12, 4), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, R.const(w), padding=[1, 1, 1, 1], data_layout="NHWC",
                                kernel_layout="HWIO")
                R.output(y)
            return y

    mod, layers = factorize_relax(NHWC, RankPolicy(rank=1))
    assert [layer.reason for layer in layers] == ["unsupported_layout"]
    assert mod.script().count("R.nn.conv2d") == 1
