"""Model in: load and validate an ONNX model, resolve constant tensors, fix and infer shapes.

Everything downstream (the ONNX pass, MAC counting, compilation) reads the model through a
`ModelView`, so that "is this tensor a constant?" and "what shape is it?" are answered once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from dwsep_compiler.errors import DwsepError, first_line

# onnxruntime 1.31 refuses IR version 11+ (onnx 1.23 writes 14 by default).
MAX_IR_VERSION = 10


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model (with its external data), or raise a one-line `DwsepError`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DwsepError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise DwsepError(f"model path is a directory, not an ONNX file: {path}")
    if os.path.getsize(path) == 0:
        raise DwsepError(f"model file is empty: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except PermissionError:
        raise DwsepError(f"model file is not readable: {path}") from None
    except Exception as exc:  # protobuf DecodeError and friends: not worth a traceback
        raise DwsepError(
            f"not a valid ONNX model (truncated or not ONNX): {path} ({first_line(exc)})"
        ) from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise DwsepError(f"not a valid ONNX model (no graph nodes): {path}")
    base = os.path.dirname(os.path.abspath(path))
    for tensor in _external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not os.path.exists(os.path.join(base, location)):
            raise DwsepError(
                f"external data file missing for tensor '{tensor.name}': "
                f"{os.path.join(base, location)}"
            )
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as exc:
        raise DwsepError(f"cannot read the model's external data: {first_line(exc)}") from None
    return model


# What `model_from` accepts, for its error message.
MODEL_KINDS = "a path to an .onnx file, an onnx.ModelProto or an onnx_ir.Model"


def model_from(source) -> tuple[onnx.ModelProto, str | None]:
    """A ModelProto of our own for ``source`` (a path, an `onnx.ModelProto` or an
    `onnx_ir.Model`) and its absolute path (None for a model in memory).

    A copy, so that no later step can reach the caller's object. onnx_ir is recognized by its
    module, so it need not be installed for the other kinds."""
    if isinstance(source, (str, os.PathLike)):
        return load_model(source), os.path.abspath(os.fspath(source))
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        what = "onnx.ModelProto"
    elif type(source).__module__.split(".")[0] == "onnx_ir" and hasattr(source, "graph"):
        import onnx_ir

        try:
            model = onnx_ir.serde.serialize_model(source)  # a new proto, tensors copied
        except Exception as exc:
            raise DwsepError(f"cannot convert the onnx_ir.Model to ONNX: {first_line(exc)}") \
                from None
        what = "onnx_ir.Model"
    else:
        raise DwsepError(f"model must be {MODEL_KINDS}, not {type(source).__name__}")
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise DwsepError(f"not a valid ONNX model (no graph nodes): the {what} given")
    external = next(_external_tensors(model), None)
    if external is not None:
        raise DwsepError(f"the {what} refers to external data (tensor '{external.name}') that "
                         "is not loaded: pass the model's path, or load it with onnx.load(path)")
    return model, None


def _external_tensors(model: onnx.ModelProto):
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that no initializer or node provides (old IR versions list
    every weight as a graph input, even weights that a node computes)."""
    provided = {t.name for t in model.graph.initializer}
    provided.update(o for node in model.graph.node for o in node.output)
    return [v for v in model.graph.input if v.name not in provided]


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["name=1,3,224,224", ...]`` -> ``{"name": (1, 3, 224, 224)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise DwsepError(
                f"bad --input-shape '{spec}': expected NAME=D0,D1,... with positive integers"
            ) from None
        shapes[name] = shape
    return shapes


def resolve_input_shapes(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every model input.

    A symbolic batch dimension (axis 0) defaults to 1; any other symbolic dimension needs
    ``--input-shape``. Overrides must name real inputs and keep the rank.
    """
    overrides = dict(overrides or {})
    inputs = graph_inputs(model)
    names = [v.name for v in inputs]
    for name in overrides:
        if name not in names:
            raise DwsepError(f"--input-shape names '{name}', which is not a model input {names}")
    shapes = {}
    for value in inputs:
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise DwsepError(f"input '{value.name}' is not a tensor (unsupported input type)")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type) if ttype.elem_type else None
        if dtype is None or dtype != np.float32:
            raise DwsepError(
                f"input '{value.name}' has dtype {dtype}; only float32 models are supported"
            )
        dims = list(ttype.shape.dim) if ttype.HasField("shape") else None
        if value.name in overrides:
            shape = overrides[value.name]
            if dims is not None and len(dims) != len(shape):
                raise DwsepError(
                    f"--input-shape for '{value.name}' has rank {len(shape)}, "
                    f"the model says rank {len(dims)}"
                )
            for axis, (dim, given) in enumerate(zip(dims or [], shape)):
                if dim.HasField("dim_value") and dim.dim_value != given:
                    raise DwsepError(
                        f"--input-shape for '{value.name}' sets axis {axis} to {given}, "
                        f"but the model fixes it to {dim.dim_value}"
                    )
            shapes[value.name] = tuple(shape)
            continue
        if dims is None:
            raise DwsepError(
                f"input '{value.name}' has no shape: pass --input-shape {value.name}=D0,D1,..."
            )
        shape = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif axis == 0:
                shape.append(1)
            else:
                label = dim.dim_param or "?"
                raise DwsepError(
                    f"input '{value.name}' has a dynamic dimension '{label}' on axis {axis}: "
                    f"pass --input-shape {value.name}=D0,D1,... to fix it"
                )
        shapes[value.name] = tuple(shape)
    return shapes


@dataclass
class ModelView:
    """Read-only facts about a model: constant tensors, producers, consumers and shapes."""

    model: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def graph_outputs(self) -> set[str]:
        return {o.name for o in self.model.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None


def view_model(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], infer: bool = True
) -> ModelView:
    """Build the `ModelView` of ``model`` with the given concrete input shapes (``infer=False``:
    only producers and consumers, no constants or shapes)."""
    graph = model.graph
    view = ModelView(model=model, input_shapes=dict(input_shapes))
    for node in graph.node:
        for out in node.output:
            if out:
                view.producers[out] = node
        for inp in node.input:
            if inp:
                view.consumers.setdefault(inp, []).append(node)
    if not infer:
        return view
    view.constants = _fold_constants(model)
    view.shapes = infer_shapes(model, input_shapes)
    for name, value in view.constants.items():
        view.shapes.setdefault(name, tuple(value.shape))
    return view


def _fold_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of initializers, ``Constant`` and ``ConstantOfShape``-of-a-constant outputs."""
    constants: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        constants[tensor.name] = numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.type == onnx.AttributeProto.TENSOR:
                constants[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "ConstantOfShape" and node.input[0] in constants:
            shape = constants[node.input[0]].astype(np.int64)
            attr = next((a for a in node.attribute if a.name == "value"), None)
            fill = numpy_helper.to_array(attr.t) if attr is not None else np.zeros(1, np.float32)
            constants[node.output[0]] = np.full(tuple(shape), fill.reshape(-1)[0], fill.dtype)
    return constants


def with_fixed_inputs(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have the given concrete shapes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[value.name]:
                dims.add().dim_value = int(d)
    return fixed


def infer_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every tensor ONNX shape inference can reach."""
    fixed = with_fixed_inputs(model, input_shapes)
    del fixed.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise DwsepError(f"ONNX shape inference failed: {first_line(exc)}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        ttype = value.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        dims = ttype.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def same_pads(size, kernel, strides, dilations, mode: str) -> list[int]:
    """ONNX pads ``[b0, b1, ..., e0, e1, ...]`` that auto_pad SAME_UPPER/SAME_LOWER means."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Save, keeping the file loadable by onnxruntime (IR version <= 10)."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    if model.ByteSize() > 1_900_000_000:
        onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    else:
        onnx.save(model, path)
