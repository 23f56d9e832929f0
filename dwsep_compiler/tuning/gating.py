"""Latency gating: keep a layer's original conv where the device runs it faster than the
tuned depthwise + pointwise pair.

Layers are found in the compiled module by their weights: every kernel call whose arguments
include a layer's constant weight tensor (the original conv's; the depthwise or pointwise
factor's) is that layer's, and its latency is the best the tuning records hold for the call's
PrimFunc on this target. A fused DW+PW kernel counts once for its pair.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax, tirx

from .records import TuningRecords
from .tasks import legalized


def digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(repr(array.shape).encode() + array.tobytes()).hexdigest()


def kernel_calls(mod: tvm.IRModule, target) -> list[tuple[tirx.PrimFunc, set[str]]]:
    """Each kernel call of ``mod``'s main function: its PrimFunc and its 4-D weights' digests."""
    lowered = legalized(mod, target)
    calls = []
    for block in lowered["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not (isinstance(value, relax.Call) and getattr(value.op, "name", "")
                    == "relax.call_tir"):
                continue
            weights = {digest(arg.value.numpy()) for arg in value.args[1].fields
                       if isinstance(arg, tvm.ir.expr.Constant) and len(arg.value.shape) == 4}
            if weights:
                calls.append((lowered[value.args[0]], weights))
    return calls


def layer_latencies(mod: tvm.IRModule, target, records: TuningRecords,
                    layers: dict[str, list[str]]) -> dict[str, float | None]:
    """Seconds per layer: the sum over the distinct kernel calls that hold any of the layer's
    weights (``layers``: name -> weight digests). None when a kernel has no measurement."""
    calls = kernel_calls(mod, target)
    out: dict[str, float | None] = {}
    for name, weights in layers.items():
        total: float | None = 0.0
        found = [func for func, held in calls if held & set(weights)]
        for func in found:
            seconds = records.latency(func, target)
            total = None if seconds is None or total is None else total + seconds
        out[name] = total if found else None
    return out


def conv_weights(model: onnx.ModelProto, names: dict[str, list[str]]) -> dict[str, list[str]]:
    """``{layer: [digests]}`` of the initializers named in ``names`` (``{layer: [tensor]}``)."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    tensors[node.output[0]] = attribute.t
    return {layer: [digest(numpy_helper.to_array(tensors[t])) for t in tensor_names
                    if t in tensors]
            for layer, tensor_names in names.items()}
