"""Architectures to check the compiler on: the onnx wheel's light models with random weights.

The wheel's ``light_*`` models are real architectures (VGG-19, ResNet-50, DenseNet-121, ...)
whose weights are all 0.02: every channel computes the same thing and every class gets 0.001,
so a check on them passes with a channel swapped, a kernel flipped or a packed layout wrong.
`light_model` re-draws every float constant (fixed seed) and scales each conv and fully
connected layer so its output has unit standard deviation on a random input (layer-sequential
unit variance: activations neither vanish nor explode, logits differ by class), at the wheel's
224x224 or a reduced resolution, with the fully connected head optionally narrowed.

The forward pass that measures each layer runs node by node in onnxruntime, so the scaling is
exact for the input it saw and needs nothing beyond the core dependencies.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.model import attribute, graph_inputs, infer_shapes

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = ("vgg19", "resnet50", "squeezenet", "shufflenet", "bvlc_alexnet", "zfnet512",
                "inception_v1", "inception_v2", "densenet121")


def light_model_path(name: str) -> str:
    path = os.path.join(LIGHT_DIR, f"light_{name}.onnx")
    if not os.path.exists(path):
        raise DwsepError(f"no light model '{name}' in the onnx wheel (known: "
                         f"{', '.join(LIGHT_MODELS)})")
    return path


@functools.lru_cache(maxsize=16)
def _cached(name: str, seed: int, input_hw: tuple[int, int] | None, max_fc: int | None) -> bytes:
    return _randomize(onnx.load(light_model_path(name)), seed, input_hw, max_fc).SerializeToString()


def light_model(name: str, seed: int = 0, input_hw: tuple[int, int] | None = None,
                max_fc: int | None = None) -> onnx.ModelProto:
    """The wheel's ``light_<name>`` with random weights (see the module docstring).

    ``input_hw``: the input's spatial size (default the wheel's 224x224); pools over the whole
    map become global pools and reshapes follow the new sizes. ``max_fc``: the hidden fully
    connected layers get at most this many features (VGG's and AlexNet's 4096-wide heads are
    hundreds of MB of weights that no conv check needs). The classifier keeps its classes.
    """
    model = onnx.ModelProto()
    model.ParseFromString(_cached(name, seed, tuple(input_hw) if input_hw else None, max_fc))
    return model


# --- re-drawing -------------------------------------------------------------------------------

def _draw(rng: np.random.Generator, op: str, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """A value for a constant read by ``op`` at input ``index``, by the role it has there."""
    if op == "Conv" and index == 1 or op == "Gemm" and index == 1:
        fan_in = int(np.prod(shape[1:])) if op == "Conv" else int(shape[-1])
        return rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
    if op == "BatchNormalization":
        return (rng.uniform(0.5, 1.5, shape) if index in (1, 4)  # scale, variance
                else rng.standard_normal(shape) * 0.1)  # shift, mean
    if op == "Mul":  # a decomposed batch norm's scale
        return rng.uniform(0.5, 1.5, shape)
    return rng.standard_normal(shape) * 0.1  # biases, shifts


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers plus the outputs of Constant / ConstantOfShape-of-a-constant nodes."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(
                next(a for a in node.attribute if a.name == "value").t)
        elif node.op_type == "ConstantOfShape" and node.input[0] in values:
            fill = attribute(node, "value")
            fill = numpy_helper.to_array(fill).reshape(-1)[0] if fill is not None else 0.0
            values[node.output[0]] = np.full(tuple(values[node.input[0]].astype(np.int64)), fill,
                                             np.float32)
    return values


def _run_node(node: onnx.NodeProto, inputs: dict[str, np.ndarray], opset: list) -> list:
    """One node in onnxruntime (its inputs fed, nothing folded)."""
    feeds = {name: inputs[name] for name in node.input if name}
    graph = helper.make_graph(
        [node], "node",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in feeds.items()],
        [helper.make_empty_tensor_value_info(o) for o in node.output if o])
    model = helper.make_model(graph, opset_imports=opset)
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _randomize(model: onnx.ModelProto, seed: int, input_hw, max_fc) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    constants = _constants(model)
    (image,) = [v for v in graph_inputs(model)]
    shape = [d.dim_value for d in image.type.tensor_type.shape.dim]
    original_shapes = infer_shapes(model, {image.name: tuple(shape)})
    if input_hw:
        shape = [*shape[:2], *input_hw]
    last_read = {name: i for i, node in enumerate(model.graph.node) for name in node.input}
    kept = {o.name for o in model.graph.output}
    last_gemm = max((i for i, n in enumerate(model.graph.node) if n.op_type == "Gemm"),
                    default=-1)

    weights: dict[str, np.ndarray] = {}  # the new model's initializers
    tensors = {image.name: rng.standard_normal(shape).astype(np.float32)}
    nodes = []
    for index, source in enumerate(model.graph.node):
        if source.op_type in ("Constant", "ConstantOfShape") and source.output[0] in constants:
            continue
        node = onnx.NodeProto()
        node.CopyFrom(source)
        for i, name in enumerate(node.input):
            if not name or name in tensors or name in weights:
                continue
            value = constants[name]
            if value.dtype == np.float32:
                if node.op_type == "Gemm" and i == 1:
                    value = _gemm_weight(node, tensors[node.input[0]], value, max_fc,
                                         last=index == last_gemm)
                elif node.op_type == "Gemm" and i == 2:
                    b = weights.get(node.input[1], tensors.get(node.input[1]))
                    value = np.zeros(b.shape[0 if attribute(node, "transB", 0) else 1])
                value = _draw(rng, node.op_type, i, value.shape).astype(np.float32)
            elif node.op_type == "Reshape" and i == 1:
                data = tensors.get(node.input[0], weights.get(node.input[0]))
                value = _reshape_target(value, original_shapes.get(node.input[0]), data.shape)
            weights[name] = value
        if node.op_type == "AveragePool" and input_hw:
            _globalize(node, original_shapes.get(node.input[0]))
        feeds = {**tensors, **weights}
        outputs = _run_node(node, feeds, list(model.opset_import))
        if all(name in weights for name in node.input if name):
            weights.update((name, value) for name, value in zip(node.output, outputs) if name)
            continue  # folded: a reshaped or unsqueezed weight is a weight
        if node.op_type in ("Conv", "Gemm"):
            std = float(np.std(outputs[0]))
            if not np.isfinite(std) or std == 0.0:
                raise DwsepError(f"light model: {node.name or node.output[0]} computes zeros")
            for name in node.input[1:3]:
                if name:
                    weights[name] = (weights[name] / std).astype(np.float32)
            outputs[0] = (outputs[0] / std).astype(np.float32)
        for name, value in zip(node.output, outputs):
            if name:
                tensors[name] = value
        for name in list(tensors):  # keep only what a later node reads
            if last_read.get(name, -1) <= index and name not in kept:
                del tensors[name]
        nodes.append(node)

    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, model.graph.name,
        [helper.make_tensor_value_info(image.name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, tensors[o.name].shape)
         for o in model.graph.output],
        [numpy_helper.from_array(v, n) for n, v in weights.items() if n in used])
    out = helper.make_model(graph, opset_imports=list(model.opset_import),
                            producer_name="dwsep_compiler.zoo")
    out.ir_version = 8  # initializers need not be graph inputs
    return out


def _gemm_weight(node, x: np.ndarray, old: np.ndarray, max_fc, last: bool) -> np.ndarray:
    """The shape a Gemm's weight needs for input ``x`` (its features follow the resolution),
    with at most ``max_fc`` outputs unless it is the classifier."""
    trans_a, trans_b = attribute(node, "transA", 0), attribute(node, "transB", 0)
    features = x.shape[0 if trans_a else 1]
    outputs = old.shape[0 if trans_b else 1]
    if max_fc and not last:
        outputs = min(outputs, max_fc)
    return np.zeros((outputs, features) if trans_b else (features, outputs), np.float32)


def _reshape_target(target: np.ndarray, old_in, new_in: tuple[int, ...]) -> np.ndarray:
    """A Reshape's shape at the new resolution: a flatten to [N, K] keeps N and infers K; a
    shape that ends in the old input's spatial dims (a channel shuffle) takes the new ones."""
    target = target.astype(np.int64)
    if old_in is None or tuple(old_in) == tuple(new_in):
        return target
    if target.size == 2:
        return np.array([new_in[0], -1], np.int64)
    if len(old_in) >= 4 and tuple(target[-2:]) == tuple(old_in[-2:]):
        return np.array([*target[:-2], *new_in[-2:]], np.int64)
    raise DwsepError(f"light model: cannot follow a reshape to {target.tolist()} at "
                     f"{list(new_in)}")


def _globalize(node: onnx.NodeProto, old_in) -> None:
    """An average pool with one window over the whole (old) map, padding excluded from the
    count: a global pool at any resolution."""
    if old_in is None:
        return
    kernel = attribute(node, "kernel_shape")
    strides = attribute(node, "strides", [1] * len(kernel))
    pads = attribute(node, "pads", [0] * 2 * len(kernel))
    spatial = old_in[2:]
    one_window = all(k >= n and (n + pads[i] + pads[i + len(kernel)] - k) // s == 0
                     for i, (k, n, s) in enumerate(zip(kernel, spatial, strides)))
    if one_window and (not any(pads) or not attribute(node, "count_include_pad", 0)) \
            and attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
        node.op_type = "GlobalAveragePool"
        del node.attribute[:]
