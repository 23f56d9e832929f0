"""End-to-end distillation of the whole factorized network (student) from the original (teacher).

Optional stage after sequential layer-wise distillation (`calibration.distill_layers`); needs
PyTorch (CPU is enough): ``pip install 'dwsep-compiler[finetune]'``. The ONNX graphs are executed
by `OnnxModule`, a ``torch.nn.Module`` that runs the graph node by node with the operators of
`torch_ops` (CNN bodies, recurrent and detection heads), so no exporter or model source code is
needed.

Models with operators outside that table (a plain RNN, a custom op) are trained on their
`runnable_prefix`: the largest part the executor can run, cut where the factorized layers'
influence leaves it. The output loss is then taken on the cut tensors (e.g. the conv backbone's
output features, which the head reads), the teacher computes the same tensors on the original
model, and the trained weights are written back into the full model.

Hooks a user's own training loop can call:

* `student_module(factorized_model, layers)`: the factorized model as a module whose only
  parameters are the depthwise/pointwise weights and biases of the factorized layers;
* `layer_pairs(layers, factorized_model)`: ``(student_tensor, teacher_tensor)`` names to match
  (the pointwise conv's output, or its activation's, has the same name in both graphs);
* `distillation_loss(student_out, teacher_out, pairs, feature_weight)`: the outputs' squared
  relative error per feature (`output_error`) plus the mean normalized feature MSE;
* `runnable_prefix(factorized_model, layers)`: the part to train and the tensors to match when
  the executor cannot run the whole model (its ``model`` and ``layers`` go to the hooks above);
* `write_back(factorized_model, module)`: the model with the module's trained weights;
* `finetune(...)`: all of the above with Adam on the calibration set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.model import graph_inputs, view_model
from dwsep_compiler.passes.rewrite.onnx_factorize import subgraph_inputs, following_activation
from dwsep_compiler.initialization import output_error
from dwsep_compiler.initialization.calibration import DEFAULT_BATCH, CalibrationSet, pruned
from dwsep_compiler.initialization.torch_ops import SHAPE_ONLY, model_opset, node_attributes, run_node, supported

DEFAULT_LR = 1e-4  # 1e-3 measured worse on the Fashion example (89.9% vs 90.1-90.3%)
DEFAULT_FEATURE_WEIGHT = 1.0
TEACHER_CACHE_BYTES = 1 << 30  # the teacher's tensors kept across steps up to this (`TeacherTargets`)


# ------------------------------------------------------------------------------ the executor

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
        unsupported = sorted({n.op_type for n in graph.node if not supported(n)})
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
        self.nodes = [(n.op_type, list(n.input), list(n.output), node_attributes(n))
                      for n in graph.node]
        self.input_names = [v.name for v in graph_inputs(model)]
        self.output_names = [o.name for o in graph.output]
        self.opset = model_opset(model)

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
            for name, value in zip(outputs, run_node(op, args, attrs, self.opset)):
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
    the original conv's (or folded BN's) output name, so the same name in both graphs; or, when
    that output is read only by a ReLU-like activation, the activation's output, as the
    post-activation fit matched it (a pre-activation loss would pull those layers back toward
    the pixels the activation discards)."""
    view = view_model(factorized_model, {}, infer=False)
    pairs = []
    for _, _, pw in _factorized_nodes(factorized_model, layers):
        activation = following_activation(view, pw.output[0])
        name = activation.output if activation is not None else pw.output[0]
        pairs.append((name, name))
    return pairs


def _normalized_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)``: comparable across tensors of any scale."""
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)


def distillation_loss(student_out: dict, teacher_out: dict, pairs: list[tuple[str, str]],
                      feature_weight: float = DEFAULT_FEATURE_WEIGHT,
                      outputs: Iterable[str] | None = None):
    """Sum over the graph ``outputs`` (default: the names the two dicts share that are not in
    ``pairs``; integer ones carry no gradient) of the squared relative error per output feature
    (`output_error.squared_relative_error`: a detector's objectness counts as much as its box
    sizes, and cut tensors, inner features, weigh by their channels, not their scale) +
    ``feature_weight`` x mean over ``pairs`` of the normalized feature MSE
    ``mean((s - t)^2) / mean(t^2)``."""
    paired = {s for s, _ in pairs} | {t for _, t in pairs}
    if outputs is None:
        outputs = [name for name in teacher_out if name in student_out and name not in paired]
    loss = sum(output_error.squared_relative_error(student_out[name], teacher_out[name])
               for name in outputs if student_out[name].is_floating_point())
    if pairs and feature_weight:
        features = [_normalized_mse(student_out[s], teacher_out[t]) for s, t in pairs]
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


# ------------------------------------------------------------------------------ the runnable part

@dataclass
class Prefix:
    """The part of the factorized model that `finetune` trains, and the tensors its output loss
    matches.

    When `OnnxModule` runs every node, that is the whole model and its outputs. Otherwise (an
    LSTM head, a custom op, ...) it is the largest prefix the executor can run, cut where the
    factorized layers' influence leaves it: ``outputs`` are then the *cut tensors* (for a conv
    backbone under a recurrent head, the backbone's output features), which the teacher also
    computes, so the student learns to reproduce what the unsupported part reads.
    """

    model: onnx.ModelProto       # the nodes ``outputs`` need; graph outputs = ``outputs``
    outputs: list[str]
    layers: list[str]            # factorized layers inside
    unreached: list[str] = field(default_factory=list)  # beyond the cut: layer-wise weights kept
    unsupported: onnx.NodeProto | None = None  # first node the executor cannot run

    def describe(self) -> dict:
        """Which outputs the loss used (for the report)."""
        node = self.unsupported
        return {"kind": "cut tensors" if node is not None else "model outputs",
                "names": list(self.outputs),
                "first_unsupported_op": node.op_type if node is not None else None,
                "first_unsupported_node": node.name if node is not None else None,
                "layers_not_reached": list(self.unreached)}


def _runnable(graph: onnx.GraphProto) -> list[bool]:
    """Per node (graph order is topological): supported, and every input available from the
    graph inputs, the initializers or earlier runnable nodes."""
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    flags = []
    for node in graph.node:
        ok = supported(node) and all(name in available for name in node.input)
        if ok:
            available.update(node.output)
        flags.append(ok)
    return flags


def _cut_tensors(graph: onnx.GraphProto, runnable: list[bool], sources: set[str]) -> list[str]:
    """Outputs of runnable nodes that depend on the values of ``sources`` (Shape passes on no
    values, hence no gradient) and leave the runnable part: read by a node the executor cannot
    run (its subgraphs included) or a graph output."""
    tainted = set(sources)
    for node, ok in zip(graph.node, runnable):
        if ok and node.op_type not in SHAPE_ONLY and tainted.intersection(node.input):
            tainted.update(node.output)
    leaving = {o.name for o in graph.output}
    for node, ok in zip(graph.node, runnable):
        if not ok:
            leaving.update(node.input)
            leaving.update(subgraph_inputs(node))
    return list(dict.fromkeys(name for node, ok in zip(graph.node, runnable) if ok
                              for name in node.output if name in tainted and name in leaving))


def _runnable_part(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only the named tensors from its runnable nodes (dead
    unsupported nodes, subgraph holders included, dropped first so that none survives)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [node for node, ok in zip(model.graph.node, _runnable(model.graph)) if ok]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return pruned(out, names)


def runnable_prefix(factorized_model: onnx.ModelProto, layers) -> Prefix:
    """The `Prefix` of ``factorized_model`` to train for its factorized ``layers``: the whole
    model when the executor runs every node; else the runnable nodes the cut tensors need.
    Raises `DwsepError` naming the first unsupported operator when no factorized layer lies in
    the runnable prefix."""
    graph = factorized_model.graph
    factorized = _factorized_nodes(factorized_model, layers)
    names = [layer for layer, _, _ in factorized]
    first = next((node for node in graph.node if not supported(node)), None)
    if first is None:
        return Prefix(factorized_model, [o.name for o in graph.output], names)
    runnable = _runnable(graph)
    sources = {name for _, dw, pw in factorized for name in (*dw.output, *pw.output)}
    cut = _cut_tensors(graph, runnable, sources)
    prefix = _runnable_part(factorized_model, cut)
    produced = {name for node in prefix.graph.node for name in node.output}
    reached = [layer for layer, _, pw in factorized if pw.output[0] in produced]
    if not reached:
        raise DwsepError(f"end-to-end fine-tuning: no factorized layer runs before operator "
                         f"{first.op_type} (node {first.name or '?'}), which the torch "
                         "executor does not support")
    return Prefix(prefix, cut, reached, [n for n in names if n not in reached], first)


# ------------------------------------------------------------------------------ training

def _teacher_module(original_model: onnx.ModelProto, names: list[str]) -> OnnxModule:
    """The original model, frozen, computing only the named tensors (a prefix of it when the
    rest holds operators the executor cannot run)."""
    teacher = OnnxModule(_runnable_part(original_model, names)).eval()
    for buffer in teacher.buffers():
        buffer.requires_grad_(False)
    return teacher


class TeacherTargets:
    """The frozen teacher's tensors (the loss's outputs and the layers' features) per calibration
    sample, for `finetune`.

    The calibration set is the same on every step, and so is what the teacher computes on it: it
    is computed once and indexed per minibatch when it fits ``budget`` bytes, which saves the
    teacher's forward pass, about a quarter of each step (the student's forward and backward are
    the rest). Kept per sample: a one-sample feed's tensors as they come; with larger feeds only
    when every tensor is sample-major (axis 0 = the samples, checked against a one-sample run, so
    that a time-major ``[T, N, C]`` head is never sliced on T). Otherwise, or over the budget
    (its estimate from the first feed), every call runs the teacher: `cached` says which.
    """

    def __init__(self, teacher: OnnxModule, capture: list[str], calibration: CalibrationSet,
                 chunk: int, budget: int = TEACHER_CACHE_BYTES):
        self.teacher, self.capture = teacher, capture
        self._samples = self._compute(calibration, chunk, budget)

    @property
    def cached(self) -> bool:
        return self._samples is not None

    def _run(self, feed) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.teacher(capture=self.capture, **feed)

    def _compute(self, calibration: CalibrationSet, chunk: int, budget: int):
        if calibration.batch not in (None, 1):
            return None  # a fixed batch > 1: no one-sample run to check the sample axis against
        samples, total = calibration.used_samples, 0
        kept: list[dict[str, torch.Tensor]] = []
        for start in range(0, samples, chunk):
            count = min(chunk, samples - start)
            out = self._run({name: array[start:start + count]
                             for name, array in calibration.inputs.items()})
            if count > 1:
                if start == 0 and not self._sample_major(calibration, out, count):
                    return None
                kept.extend({name: t[i:i + 1] for name, t in out.items()} for i in range(count))
            else:
                kept.append(out)
            total += sum(t.nelement() * t.element_size() for t in out.values())
            if total * samples > budget * (start + count):  # projected over all samples
                return None
        return kept

    def _sample_major(self, calibration, out, count) -> bool:
        one = self._run({name: array[:1] for name, array in calibration.inputs.items()})
        return all(t.ndim >= 1 and t.shape[0] == count and one[name].shape == (1, *t.shape[1:])
                   for name, t in out.items())

    def __call__(self, indices, feed) -> dict[str, torch.Tensor]:
        """The teacher's tensors for the calibration samples ``indices``, which ``feed`` holds."""
        if self._samples is None:
            return self._run(feed)
        if len(indices) == 1:
            return self._samples[int(indices[0])]
        parts = [self._samples[int(i)] for i in indices]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _forward_loss(student, teacher: TeacherTargets, indices, feed, pairs, prefix: Prefix,
                  feature_weight):
    """``(loss, student_out, teacher_out)`` of one chunk of samples (``indices``)."""
    t_out = teacher(indices, feed)
    s_out = student(capture=[s for s, _ in pairs], **feed)
    loss = distillation_loss(s_out, t_out, pairs, feature_weight, prefix.outputs)
    return loss, s_out, t_out


def _evaluate(student, teacher, calibration, pairs, prefix, feature_weight, batch):
    """Calibration loss (sample-weighted mean over batches) and per-pair relative errors
    ||s - t|| / ||t|| over the whole set."""
    total, count = 0.0, 0
    err = {s: [0.0, 0.0] for s, _ in pairs}
    step = calibration.batch or batch
    with torch.no_grad():
        for start in range(0, calibration.used_samples, step):
            indices = np.arange(start, min(start + step, calibration.used_samples))
            feed = {name: array[indices] for name, array in calibration.inputs.items()}
            n = len(indices)
            loss, s_out, t_out = _forward_loss(student, teacher, indices, feed, pairs, prefix,
                                               feature_weight)
            total += float(loss) * n
            count += n
            for s, t in pairs:
                err[s][0] += float((s_out[s] - t_out[t]).pow(2).sum())
                err[s][1] += float(t_out[t].pow(2).sum())
    return total / max(count, 1), {s: math.sqrt(a / max(b, 1e-30)) for s, (a, b) in err.items()}


def _minibatches(samples: int, batch: int, steps: int, rng):
    """``steps`` minibatches of ``batch`` sample indices: epochs of shuffled samples."""
    order = np.array([], dtype=np.int64)
    for _ in range(steps):
        while len(order) < batch:
            order = np.concatenate([order, rng.permutation(samples)])
        take, order = order[:batch], order[batch:]
        yield take


def finetune(original_model: onnx.ModelProto, factorized_model: onnx.ModelProto, layers,
             calibration: CalibrationSet, steps: int, lr: float = DEFAULT_LR,
             batch_size: int = DEFAULT_BATCH, feature_weight: float = DEFAULT_FEATURE_WEIGHT,
             log: Callable[[str], None] | None = None, seed: int = 0
             ) -> tuple[onnx.ModelProto, dict]:
    """Train the factorized layers' DW/PW weights end to end (Adam, ``steps`` minibatches of
    ``batch_size`` calibration samples) against the frozen original model: `distillation_loss`
    on the graph outputs and every factorized layer's output.

    With operators the executor cannot run, the `runnable_prefix` is trained instead, its
    output loss taken on the cut tensors (normalized); the info dict's ``outputs`` says which.
    A model with a fixed batch size is fed in chunks of that size, their gradients accumulated
    into one step. Returns the full factorized model with the trained weights and an info dict.
    If training ends with a higher (or a NaN) calibration loss than it started with, the
    starting weights are kept (``info["kept"] == "initial"``)."""
    log = log or (lambda message: None)
    started = time.perf_counter()
    torch.manual_seed(seed)
    prefix = runnable_prefix(factorized_model, layers)
    if prefix.unsupported is not None:
        log(f"fine-tuning the prefix before {prefix.unsupported.op_type} (not supported by the "
            f"torch executor): loss on {', '.join(prefix.outputs)}"
            + (f"; not reached: {', '.join(prefix.unreached)}" if prefix.unreached else ""))
    student = student_module(prefix.model, prefix.layers)
    pairs = layer_pairs(prefix.layers, prefix.model)
    chunk = calibration.batch or batch_size
    teacher = TeacherTargets(_teacher_module(original_model, list(dict.fromkeys(
        [*prefix.outputs, *(t for _, t in pairs)]))), [t for _, t in pairs], calibration, chunk,
        TEACHER_CACHE_BYTES)
    batch = max(1, batch_size // chunk) * chunk
    names = {s: layer for (s, _), (layer, _, _) in
             zip(pairs, _factorized_nodes(prefix.model, prefix.layers))}  # same order
    initial = {k: v.detach().clone() for k, v in student.onnx_parameters().items()}
    start_loss, start_errors = _evaluate(student, teacher, calibration, pairs, prefix,
                                         feature_weight, batch_size)
    log(f"fine-tuning {len(pairs)} layers end to end: {steps} steps, lr {lr}, "
        f"calibration loss {start_loss:.5f}")
    optimizer = torch.optim.Adam(list(student.onnx_parameters().values()), lr=lr)
    samples = calibration.used_samples
    for step, take in enumerate(_minibatches(samples, batch, steps, np.random.default_rng(seed))):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for part in np.split(take, batch // chunk):
            feed = {name: array[part] for name, array in calibration.inputs.items()}
            loss = _forward_loss(student, teacher, part, feed, pairs, prefix, feature_weight)[0]
            (loss * (chunk / batch)).backward()
            step_loss += float(loss.detach()) * chunk / batch
        optimizer.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}: minibatch loss {step_loss:.5f}")
    end_loss, end_errors = _evaluate(student, teacher, calibration, pairs, prefix,
                                     feature_weight, batch_size)
    kept = "trained"
    if not end_loss <= start_loss:  # higher, or NaN (a diverged run)
        with torch.no_grad():
            for name, param in student.onnx_parameters().items():
                param.copy_(initial[name])
        kept, end_errors = "initial", start_errors
    log(f"fine-tuned: calibration loss {start_loss:.5f} -> {end_loss:.5f}"
        + (" (worse: kept the layer-wise weights)" if kept == "initial" else ""))
    info = {
        "method": "end-to-end distillation (Adam): squared relative error per output feature + "
                  "feature_weight x mean normalized feature MSE of every factorized layer, "
                  "teacher = the original model",
        "outputs": prefix.describe(),
        "steps": steps, "lr": lr, "batch_size": batch, "feature_weight": feature_weight,
        "samples": samples, "loss_start": round(start_loss, 6), "loss_end": round(end_loss, 6),
        "kept": kept, "teacher_cached": teacher.cached,
        "layer_output_rel_error": {names[s]: {"before": round(start_errors[s], 6),
                                              "after": round(end_errors[s], 6)}
                                   for s, _ in pairs},
        "time_s": round(time.perf_counter() - started, 3),
    }
    return write_back(factorized_model, student), info
