"""End-to-end distillation of the whole factorized network (student) from the original (teacher).

Optional stage after sequential layer-wise distillation (`calibration.distill_layers`); needs
PyTorch (CPU is enough): ``pip install 'dwsep-compiler[finetune]'``. The ONNX graphs are executed
by `OnnxModule`, a ``torch.nn.Module`` that runs the graph node by node with torch functional
ops (the CNN subset below), so no exporter or model source code is needed.

Hooks a user's own training loop can call:

* `student_module(factorized_model, layers)`: the factorized model as a module whose only
  parameters are the depthwise/pointwise weights and biases of the factorized layers;
* `layer_pairs(layers, factorized_model)`: ``(student_tensor, teacher_tensor)`` names to match
  (the pointwise conv writes the original conv's, or folded BN's, output name, so both are the
  same name);
* `distillation_loss(student_out, teacher_out, pairs, feature_weight)`: output MSE plus the mean
  normalized feature MSE;
* `write_back(factorized_model, module)`: the model with the module's trained weights;
* `finetune(...)`: all of the above with Adam on the calibration set.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..errors import DwsepError
from ..model import graph_inputs, same_pads
from .calibration import DEFAULT_BATCH, CalibrationSet

DEFAULT_LR = 1e-4  # 1e-3 measured worse on the Fashion example (89.9% vs 90.1-90.3%)
DEFAULT_FEATURE_WEIGHT = 1.0


# ------------------------------------------------------------------------------ the executor

def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 13


def _resolve_pads(a: dict, x, kernel, strides, dilations) -> list[int]:
    rank = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(x.shape[2:], kernel, strides, dilations, mode)
    if mode == "VALID":
        return [0] * (2 * rank)
    return list(a.get("pads", [0] * (2 * rank)))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b0, b1, e0, e1] -> F.pad's (last dim first) [b1, e1, b0, e0]."""
    rank = len(pads) // 2
    out = []
    for i in reversed(range(rank)):
        out += [pads[i], pads[i + rank]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _conv(x, w, b, a):
    rank = w.dim() - 2
    if rank not in _CONV:
        raise DwsepError(f"Conv with {rank} spatial dims is not supported by the torch executor")
    kernel = list(w.shape[2:])
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    pads = _resolve_pads(a, x, kernel, strides, dilations)
    if pads[:rank] == pads[rank:]:
        padding = pads[:rank]
    else:
        x = F.pad(x, _torch_pad(pads))
        padding = [0] * rank
    return _CONV[rank](x, w, b, strides, padding, dilations, a.get("group", 1))


def _pool(x, a, kind):
    kernel = list(a["kernel_shape"])
    rank = len(kernel)
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    pads = _resolve_pads(a, x, kernel, strides, dilations)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        if any(pads):
            x = F.pad(x, _torch_pad(pads), value=float("-inf"))
        return _MAXPOOL[rank](x, kernel, strides, 0, dilations, ceil_mode=ceil)
    if any(d != 1 for d in dilations):
        raise DwsepError("AveragePool with dilations is not supported by the torch executor")
    if not any(pads):
        return _AVGPOOL[rank](x, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    padded = F.pad(x, _torch_pad(pads))
    total = _AVGPOOL[rank](padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if a.get("count_include_pad", 0):
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    share = _AVGPOOL[rank](ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return total / share


def _softmax(x, a, opset):
    if opset >= 13:
        return torch.softmax(x, dim=a.get("axis", -1))
    axis = a.get("axis", 1) % x.dim()
    shape = x.shape
    flat = x.reshape(int(np.prod(shape[:axis])), -1)
    return torch.softmax(flat, dim=1).reshape(shape)


def _reshape(x, shape, a):
    dims = [int(d) for d in shape.tolist()]
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _gemm(a_, b_, c, a):
    if a.get("transA", 0):
        a_ = a_.transpose(0, 1)
    if a.get("transB", 0):
        b_ = b_.transpose(0, 1)
    y = a.get("alpha", 1.0) * (a_ @ b_)
    if c is not None:
        y = y + a.get("beta", 1.0) * c
    return y


def _clip(x, inputs, a):
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else a.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else a.get("max")
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return x


def _div(x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _constant(a):
    if "value" in a:
        return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise DwsepError("Constant without a numeric value is not supported by the torch executor")


def _run_node(op: str, i: list, a: dict, opset: int):
    """Outputs (a list) of one ONNX node on torch tensors ``i`` (None for absent inputs)."""
    if op == "Conv":
        return [_conv(i[0], i[1], i[2] if len(i) > 2 else None, a)]
    if op == "Relu":
        return [torch.relu(i[0])]
    if op == "Clip":
        return [_clip(i[0], i, a)]
    if op == "LeakyRelu":
        return [F.leaky_relu(i[0], a.get("alpha", 0.01))]
    if op == "Sigmoid":
        return [torch.sigmoid(i[0])]
    if op == "Add":
        return [i[0] + i[1]]
    if op == "Sub":
        return [i[0] - i[1]]
    if op == "Mul":
        return [i[0] * i[1]]
    if op == "Div":
        return [_div(i[0], i[1])]
    if op == "MaxPool":
        return [_pool(i[0], a, "max")]
    if op == "AveragePool":
        return [_pool(i[0], a, "avg")]
    if op == "GlobalAveragePool":
        return [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)]
    if op == "Flatten":
        axis = a.get("axis", 1)
        axis = axis + i[0].dim() if axis < 0 else axis
        return [i[0].reshape(int(np.prod(i[0].shape[:axis])), -1)]
    if op == "Reshape":
        return [_reshape(i[0], i[1], a)]
    if op == "Gemm":
        return [_gemm(i[0], i[1], i[2] if len(i) > 2 else None, a)]
    if op == "MatMul":
        return [torch.matmul(i[0], i[1])]
    if op == "Concat":
        return [torch.cat(i, dim=a["axis"])]
    if op == "BatchNormalization":
        return [F.batch_norm(i[0], i[3], i[4], i[1], i[2], training=False,
                             eps=a.get("epsilon", 1e-5))]
    if op == "Softmax":
        return [_softmax(i[0], a, opset)]
    if op == "Transpose":
        perm = a.get("perm", list(reversed(range(i[0].dim()))))
        return [i[0].permute(*perm)]
    if op == "Identity":
        return [i[0]]
    if op == "Dropout":  # inference: identity, mask all true
        return [i[0], torch.ones_like(i[0], dtype=torch.bool)]
    if op == "Constant":
        return [_constant(a)]
    raise DwsepError(f"operator {op} is not supported by the torch executor (finetune)")


SUPPORTED_OPS = frozenset((
    "Conv", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Add", "Sub", "Mul", "Div", "MaxPool",
    "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul", "Concat",
    "BatchNormalization", "Softmax", "Transpose", "Identity", "Dropout", "Constant"))


class OnnxModule(torch.nn.Module):
    """An ONNX graph executed node by node with torch ops.

    Initializers become buffers, except those named in ``trainable``, which become
    ``nn.Parameter``s (`onnx_parameters` maps their ONNX names to them). ``forward(capture=...,
    **feeds)`` returns ``{name: tensor}`` for the graph outputs plus the named intermediate
    tensors in ``capture``. Raises `DwsepError` naming the first unsupported operator.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] = ()):
        super().__init__()
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node
                              if n.domain not in ("", "ai.onnx")
                              or n.op_type not in SUPPORTED_OPS})
        if unsupported:
            raise DwsepError(f"operator {', '.join(unsupported)} is not supported by the torch "
                             "executor (finetune)")
        trainable = set(trainable)
        initializers = {t.name for t in graph.initializer}
        missing = trainable - initializers
        if missing:
            raise DwsepError(f"trainable names are not initializers: {', '.join(sorted(missing))}")
        self._slots: dict[str, str] = {}  # ONNX initializer name -> attribute name
        for index, tensor in enumerate(graph.initializer):
            value = torch.from_numpy(numpy_helper.to_array(tensor).copy())
            if tensor.name in trainable:
                slot = f"p{index}"
                self.register_parameter(slot, torch.nn.Parameter(value))
            else:
                slot = f"b{index}"
                self.register_buffer(slot, value)
            self._slots[tensor.name] = slot
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        self.input_names = [v.name for v in graph_inputs(model)]
        self.output_names = [o.name for o in graph.output]
        self.opset = _opset(model)

    def onnx_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: getattr(self, slot) for name, slot in self._slots.items()
                if slot.startswith("p")}

    def forward(self, capture: Iterable[str] = (), **feeds) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {name: getattr(self, slot)
                                        for name, slot in self._slots.items()}
        for name in self.input_names:
            if name not in feeds:
                raise DwsepError(f"missing input {name!r}")
            value = feeds[name]
            env[name] = value if isinstance(value, torch.Tensor) else torch.from_numpy(
                np.asarray(value))
        wanted = list(dict.fromkeys([*self.output_names, *capture]))
        for op, inputs, outputs, attrs in self.nodes:
            args = [env[name] if name else None for name in inputs]
            for name, value in zip(outputs, _run_node(op, args, attrs, self.opset)):
                if name:
                    env[name] = value
        missing = [name for name in wanted if name not in env]
        if missing:
            raise DwsepError(f"the graph computes no tensor named {missing[0]!r}")
        return {name: env[name] for name in wanted}


# ------------------------------------------------------------------------------ the hooks

def _factorized_nodes(factorized_model: onnx.ModelProto, layers) -> list[tuple]:
    """(layer name, DW node, PW node) of every factorized layer (report `LayerReport`s or
    names)."""
    by_name = {node.name: node for node in factorized_model.graph.node}
    out = []
    for layer in layers:
        if not isinstance(layer, str):
            if not layer.factorized:
                continue
            layer = layer.name
        dw, pw = by_name.get(f"{layer}_dw"), by_name.get(f"{layer}_pw")
        if dw is None or pw is None:
            raise DwsepError(f"layer {layer!r} has no {layer}_dw/{layer}_pw pair in the model")
        out.append((layer, dw, pw))
    return out


def trainable_names(factorized_model: onnx.ModelProto, layers) -> set[str]:
    """Initializer names of the DW/PW weights and biases of the factorized layers."""
    initializers = {t.name for t in factorized_model.graph.initializer}
    return {name for _, dw, pw in _factorized_nodes(factorized_model, layers)
            for name in (*dw.input[1:], *pw.input[1:]) if name in initializers}


def student_module(factorized_model: onnx.ModelProto, layers) -> OnnxModule:
    """The factorized model as an `OnnxModule` whose parameters are the DW/PW weights and biases
    of its factorized ``layers`` (report layers or names); everything else is frozen."""
    return OnnxModule(factorized_model, trainable_names(factorized_model, layers))


def layer_pairs(layers, factorized_model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(student_tensor, teacher_tensor)`` per factorized layer: the PW conv's output, which is
    the original conv's (or folded BN's) output name, so the same name in both graphs."""
    return [(pw.output[0], pw.output[0]) for _, _, pw in _factorized_nodes(factorized_model, layers)]


def distillation_loss(student_out: dict, teacher_out: dict, pairs: list[tuple[str, str]],
                      feature_weight: float = DEFAULT_FEATURE_WEIGHT,
                      outputs: Iterable[str] | None = None):
    """Output MSE summed over the graph ``outputs`` (default: the names the two dicts share that
    are not in ``pairs``) + ``feature_weight`` x mean over ``pairs`` of the normalized feature MSE
    ``mean((s - t)^2) / mean(t^2)``."""
    paired = {s for s, _ in pairs} | {t for _, t in pairs}
    if outputs is None:
        outputs = [name for name in teacher_out if name in student_out and name not in paired]
    loss = sum(F.mse_loss(student_out[name], teacher_out[name]) for name in outputs)
    if pairs and feature_weight:
        features = [F.mse_loss(student_out[s], teacher_out[t])
                    / teacher_out[t].pow(2).mean().clamp_min(1e-12) for s, t in pairs]
        loss = loss + feature_weight * sum(features) / len(features)
    return loss if isinstance(loss, torch.Tensor) else torch.zeros(())


def write_back(factorized_model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of ``factorized_model`` with the module's parameters as its initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(factorized_model)
    params = module.onnx_parameters()
    for tensor in out.graph.initializer:
        if tensor.name in params:
            tensor.CopyFrom(numpy_helper.from_array(
                params[tensor.name].detach().cpu().numpy().astype(np.float32), tensor.name))
    return out


def _evaluate(student, teacher, calibration, pairs, outputs, feature_weight, batch):
    """Calibration loss (sample-weighted mean over batches) and per-pair relative errors
    ||s - t|| / ||t|| over the whole set."""
    total, count = 0.0, 0
    err = {s: [0.0, 0.0] for s, _ in pairs}
    capture = [s for s, _ in pairs]
    with torch.no_grad():
        for feed in calibration.feeds(batch):
            n = len(next(iter(feed.values())))
            s_out = student(capture=capture, **feed)
            t_out = teacher(capture=[t for _, t in pairs], **feed)
            total += float(distillation_loss(s_out, t_out, pairs, feature_weight, outputs)) * n
            count += n
            for s, t in pairs:
                err[s][0] += float((s_out[s] - t_out[t]).pow(2).sum())
                err[s][1] += float(t_out[t].pow(2).sum())
    return total / max(count, 1), {s: math.sqrt(a / max(b, 1e-30)) for s, (a, b) in err.items()}


def finetune(original_model: onnx.ModelProto, factorized_model: onnx.ModelProto, layers,
             calibration: CalibrationSet, steps: int, lr: float = DEFAULT_LR,
             batch_size: int = DEFAULT_BATCH, feature_weight: float = DEFAULT_FEATURE_WEIGHT,
             log: Callable[[str], None] | None = None, seed: int = 0
             ) -> tuple[onnx.ModelProto, dict]:
    """Train the factorized layers' DW/PW weights end to end (Adam, ``steps`` minibatches of the
    calibration set) against the frozen original model: `distillation_loss` on the graph outputs
    and every factorized layer's output. Returns the factorized model with the trained weights
    and an info dict. If training ends with a higher calibration loss than it started with, the
    starting weights are kept (``info["kept"] == "initial"``)."""
    log = log or (lambda message: None)
    started = time.perf_counter()
    torch.manual_seed(seed)
    student = student_module(factorized_model, layers)
    teacher = OnnxModule(original_model).eval()
    for buffer in teacher.buffers():
        buffer.requires_grad_(False)
    pairs = layer_pairs(layers, factorized_model)
    outputs = [name for name in student.output_names if name in teacher.output_names]
    batch = calibration.batch or batch_size
    names = {pw.output[0]: layer for layer, _, pw in _factorized_nodes(factorized_model, layers)}
    initial = {k: v.detach().clone() for k, v in student.onnx_parameters().items()}
    start_loss, start_errors = _evaluate(student, teacher, calibration, pairs, outputs,
                                         feature_weight, batch)
    log(f"fine-tuning {len(pairs)} layers end to end: {steps} steps, lr {lr}, "
        f"calibration loss {start_loss:.5f}")
    optimizer = torch.optim.Adam(list(student.onnx_parameters().values()), lr=lr)
    rng = np.random.default_rng(seed)
    samples = calibration.used_samples
    order = np.array([], dtype=np.int64)
    capture_s, capture_t = [s for s, _ in pairs], [t for _, t in pairs]
    for step in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(samples)])
        take, order = order[:batch], order[batch:]
        feed = {name: array[take] for name, array in calibration.inputs.items()}
        with torch.no_grad():
            t_out = teacher(capture=capture_t, **feed)
        s_out = student(capture=capture_s, **feed)
        loss = distillation_loss(s_out, t_out, pairs, feature_weight, outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}: minibatch loss {float(loss.detach()):.5f}")
    end_loss, end_errors = _evaluate(student, teacher, calibration, pairs, outputs,
                                     feature_weight, batch)
    kept = "trained"
    if end_loss > start_loss:
        with torch.no_grad():
            for name, param in student.onnx_parameters().items():
                param.copy_(initial[name])
        kept, end_errors = "initial", start_errors
    log(f"fine-tuned: calibration loss {start_loss:.5f} -> {end_loss:.5f}"
        + (" (worse: kept the layer-wise weights)" if kept == "initial" else ""))
    info = {
        "method": "end-to-end distillation (Adam): output MSE + feature_weight x mean normalized "
                  "feature MSE of every factorized layer, teacher = the original model",
        "steps": steps, "lr": lr, "batch_size": batch, "feature_weight": feature_weight,
        "samples": samples, "loss_start": round(start_loss, 6), "loss_end": round(end_loss, 6),
        "kept": kept,
        "layer_output_rel_error": {names[s]: {"before": round(start_errors[s], 6),
                                              "after": round(end_errors[s], 6)}
                                   for s, _ in pairs},
        "time_s": round(time.perf_counter() - started, 3),
    }
    return write_back(factorized_model, student), info
