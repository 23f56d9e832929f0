"""Helpers for tests: small ONNX models made in-process, onnxruntime reference runs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dwsep_compiler.model import graph_inputs
from dwsep_compiler.targets import TargetPreset


def _host_widths() -> dict[str, TargetPreset]:
    """The x86 vector widths this machine can execute, widest first: code for each is built
    and run by the rule tests (an AVX-512 machine runs AVX2 code too)."""
    import tvm

    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    has = tvm.target.codegen.llvm_cpu_has_features
    widths = {}
    if has(["avx512f"], host):
        widths["avx512"] = TargetPreset("x86-avx512", "AVX-512",
                                        {"kind": "llvm", "mcpu": "skylake-avx512"}, "host")
    if has(["avx2"], host):
        widths["avx2"] = TargetPreset("x86-avx2", "AVX2", {"kind": "llvm", "mcpu": "haswell"},
                                      "host")
    return widths or {"host": TargetPreset("host", "host", {"kind": "llvm"}, "host")}


HOST_WIDTHS = _host_widths()

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def light_model_path(name: str) -> str:
    return os.path.join(LIGHT_DIR, f"light_{name}.onnx")


def make_model(nodes, inputs, outputs, initializers, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def conv_model(rng, in_channels=8, out_channels=16, kernel=(3, 3), strides=(1, 1),
               dilations=(1, 1), pads=(1, 1, 1, 1), auto_pad=None, bias=True, batch_norm=False,
               input_hw=(12, 12), batch=1, group=1) -> onnx.ModelProto:
    """One Conv (optionally + BatchNormalization) then Relu, random weights."""
    w = rng.standard_normal((out_channels, in_channels // group, *kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(
            rng.standard_normal(out_channels).astype(np.float32), "B"))
        conv_inputs.append("B")
    attrs = {"kernel_shape": list(kernel), "strides": list(strides),
             "dilations": list(dilations), "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    nodes = [helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv", **attrs)]
    last = "conv_out"
    if batch_norm:
        for name, value in [("scale", rng.uniform(0.5, 1.5, out_channels)),
                            ("shift", rng.standard_normal(out_channels)),
                            ("mean", rng.standard_normal(out_channels)),
                            ("var", rng.uniform(0.5, 1.5, out_channels))]:
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization",
                                      [last, "scale", "shift", "mean", "var"], ["bn_out"],
                                      name="bn", epsilon=1e-3))
        last = "bn_out"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="relu"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels, *input_hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


def small_cnn(rng, channels=(3, 8, 16), hw=(16, 16)) -> onnx.ModelProto:
    """conv3x3 -> relu -> conv3x3(stride 2) -> relu -> 1x1 conv -> depthwise 3x3 -> gap -> gemm."""
    c0, c1, c2 = channels
    inits, nodes = [], []

    def weight(name, shape):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name))
        return name

    nodes.append(helper.make_node("Conv", ["x", weight("w1", (c1, c0, 3, 3)),
                                           weight("b1", (c1,))], ["c1"], name="conv1",
                                  pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    nodes.append(helper.make_node("Conv", ["r1", weight("w2", (c2, c1, 3, 3))], ["c2"],
                                  name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]))
    nodes.append(helper.make_node("Relu", ["c2"], ["r2"], name="relu2"))
    nodes.append(helper.make_node("Conv", ["r2", weight("w3", (c2, c2, 1, 1))], ["c3"],
                                  name="pointwise"))
    nodes.append(helper.make_node("Conv", ["c3", weight("w4", (c2, 1, 3, 3))], ["c4"],
                                  name="depthwise", pads=[1, 1, 1, 1], group=c2))
    nodes.append(helper.make_node("GlobalAveragePool", ["c4"], ["g"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["f", weight("fc", (10, c2)), weight("fcb", (10,))],
                                  ["logits"], name="fc", transB=1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c0, *hw])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    return make_model(nodes, [x], [y], inits)


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(model, inputs: dict[str, np.ndarray], outputs: list[str] | None = None):
    return session(model).run(outputs, inputs)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(helper.make_empty_tensor_value_info(name))
    return out


def real_input_names(model: onnx.ModelProto) -> list[str]:
    return [v.name for v in graph_inputs(model)]


def rel_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)


def flip_first_kernel(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose first spatial conv kernel is flipped vertically: the planted
    bug of the checks that must fail (a schedule or layout bug computes the same kind of
    wrong)."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for i, tensor in enumerate(bad.graph.initializer):
        value = numpy_helper.to_array(tensor)
        if value.ndim == 4 and value.shape[2] > 1:
            bad.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(value[:, :, ::-1].copy(), tensor.name))
            return bad
    raise AssertionError("no spatial kernel to flip")


def run_widths(mod, inputs, fuse=True):
    """Build ``mod`` for every x86 vector width this machine runs (AVX-512 and AVX2 here) and
    run each; returns the first width's outputs after checking the others compute the same
    (within fp32 reordering), so every width is held to the test's onnxruntime comparison."""
    from dwsep_compiler.compile import build, run_executable

    results = {name: run_executable(build(mod, preset, fuse=fuse), inputs)
               for name, preset in HOST_WIDTHS.items()}
    first, *others = results.values()
    for name, outs in results.items():
        for a, b in zip(outs, first):
            assert rel_error(a, b) < 1e-5, f"{name} differs from {next(iter(results))}"
    return first
