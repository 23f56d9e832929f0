"""Calibration data in, layer-wise distilled depthwise + pointwise factors out.

This is the onnxruntime-driven half of distillation; the math is `distill`. Activations are read
from the real model with hooks, not a copy of the network: each pass adds the wanted intermediate
tensors as graph outputs, prunes what they do not need, and runs the result in onnxruntime.

**Sequential distillation** (`distill_layers`), layers in graph (topological) order. For layer i:

* student input: the input of conv i in the model whose convs before i are already rewritten
  with their distilled factors (re-run per layer), so layer i corrects the error of the layers
  before it;
* teacher target (``teacher="original"``, the default): the original model's output of conv i
  (after its BatchNorm when folded) on the original activations, i.e. what the network computed
  there before any rewrite; ``teacher="local"``: the original conv applied to the student's
  input (needs no teacher run; it only makes layer i mimic the original conv, it cannot undo
  the drift of earlier layers).
* Per batch, the patches and the teacher are folded into the layer's Gram matrices
  (`distill.LayerGram`), then `distill.fit_layer` solves pointwise + bias in closed form and
  refines the depthwise filters by alternating least squares.

Memory: the calibration *inputs* are held (they are re-fed once per layer); of the
activations, one layer's Gram matrices (``8 * ((K+1)^2 + (K+1)*N)`` bytes with
``K = M*kh*kw``), its post-activation pixel sample (`distill.PixelSample`, at most
``distill.POST_ACTIVATION_BYTES``), the teacher outputs of the next layers, computed several at
a time (`TeacherOutputs`, at most ``TEACHER_BUDGET_BYTES``), and the student's tensors upstream
of the convs still to rewrite, the layer's input among them (`Frontier`, at most
``FRONTIER_BUDGET_BYTES``; one layer's input for every sample where that is larger). `rank_curves` (used by the rank allocation) accumulates the Gram
matrices of several layers in one pass over the original model, in groups of at most
``GRAM_BUDGET_BYTES``.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.model import MAX_IR_VERSION, ModelView, attribute, graph_inputs, same_pads
from dwsep_compiler.passes.rewrite.conditions import ConvPlan
from dwsep_compiler.passes.rewrite.onnx_factorize import (ConvSite, apply_plans, has_subgraph,
                                                           remove_dead)
from dwsep_compiler.initialization import allocation, distill
from dwsep_compiler.initialization.activation import Activation

TEACHERS = ("original", "local")
DEFAULT_BATCH = 16  # samples per run when the model's batch axis is dynamic
GRAM_BUDGET_BYTES = 1 << 30
TEACHER_BUDGET_BYTES = 1 << 29  # teacher outputs held between layers (`TeacherOutputs`)
FRONTIER_BUDGET_BYTES = 1 << 29  # a changing model's kept tensors (`Frontier`)


# ------------------------------------------------------------------------------ the data

@dataclass
class CalibrationSet:
    """Validated calibration inputs: per model input, float32 samples stacked on axis 0."""

    inputs: dict[str, np.ndarray]
    source: str
    batch: int | None = None  # the model's fixed batch size, None when dynamic

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def used_samples(self) -> int:
        """Samples actually fed (a fixed batch size b drops a remainder of fewer than b)."""
        return self.samples - (self.samples % self.batch if self.batch else 0)

    def feeds(self, batch_size: int = DEFAULT_BATCH):
        """Feed dicts for onnxruntime, each with the model's batch size (or up to
        ``batch_size`` samples when it is dynamic)."""
        step = self.batch or batch_size
        for start in range(0, self.used_samples, step):
            yield {name: array[start:start + step] for name, array in self.inputs.items()}


def load_calibration(source, model: onnx.ModelProto,
                     input_shapes: dict[str, tuple[int, ...]]) -> CalibrationSet:
    """Validate calibration data for ``model`` (inputs fixed to ``input_shapes``).

    ``source``: a ``.npz`` file (one array per model input name, first axis = samples), a
    ``.npy`` file (single-input models: samples ``[S, ...]`` or one sample), a directory of such
    files (concatenated in name order), a `CalibrationSet`, one array or torch tensor of
    samples (single-input models), or an iterable of feeds: a torch
    DataLoader, an ``nncf.Dataset`` (its inference data, after its transform), a list or a
    generator. A feed is a dict input name -> array, a tuple or list whose first items are the
    inputs in graph order (what a DataLoader of ``(images, labels)`` yields: the labels are
    ignored) or whose first item is such a dict (Olive's ``(inputs, labels)`` batches), or one array for a single-input model; arrays may be numpy arrays or torch
    tensors, with a batch axis or as one sample. Every sample must have the model input's shape
    (batch axis excluded) and dtype float32. Raises a one-line `DwsepError` otherwise.
    """
    if isinstance(source, CalibrationSet):
        return source
    inputs = graph_inputs(model)
    names = [v.name for v in inputs]
    expected = {name: tuple(input_shapes[name][1:]) for name in names}
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        parts = _read_path(path, names)
        label = os.path.abspath(path)
    else:
        label, feeds = _feed_source(source)
        parts = [(f"feed {i}", _feed(f"feed {i}", item, names)) for i, item in enumerate(feeds)]
    if not parts:
        raise DwsepError(f"calibration data is empty: {label}")
    stacked: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for origin, arrays in parts:
        _check_names(origin, arrays, names)
        counts = set()
        for name in names:
            array = _check_array(origin, name, arrays[name], expected[name])
            stacked[name].append(array)
            counts.add(len(array))
        if len(counts) > 1:
            raise DwsepError(f"calibration {origin}: inputs have different sample counts "
                             f"{sorted(counts)}")
    result = {name: np.concatenate(stacked[name]) for name in names}
    total = len(result[names[0]])
    if total == 0:
        raise DwsepError(f"calibration data has no samples: {label}")
    batch = _fixed_batch(inputs)
    if batch and total < batch:
        raise DwsepError(f"calibration has {total} samples, fewer than the model's fixed batch "
                         f"size {batch}")
    return CalibrationSet(result, label, batch)


CALIBRATION_KINDS = ("a .npz/.npy path, a directory of them, or an iterable of feeds (a torch "
                     "DataLoader, an nncf.Dataset, a list of dicts input name -> array)")


def _feed_source(source) -> tuple[str, object]:
    """What to call the source in the report, and the iterable of its feeds. Duck-typed, so
    neither torch nor NNCF is a dependency."""
    if isinstance(source, Mapping):
        return "python dict of arrays", [source]
    if callable(getattr(source, "get_inference_data", None)):  # nncf.Dataset
        return f"{type(source).__module__.split('.')[0]}.{type(source).__name__}", \
            source.get_inference_data()
    if isinstance(source, np.ndarray) or callable(getattr(source, "detach", None)):
        return f"{type(source).__name__} of samples", [source]  # one feed: samples on axis 0
    if isinstance(source, (str, bytes)) or not hasattr(source, "__iter__"):
        raise DwsepError(f"calibration must be {CALIBRATION_KINDS}, not "
                         f"{type(source).__name__}")
    module = type(source).__module__.split(".")[0]
    kind = type(source).__name__ if module == "builtins" else f"{module} {type(source).__name__}"
    return f"python iterable of feeds ({kind})", source


def _as_array(value):
    """numpy as it is; a torch tensor (anything with ``detach``) or an array-like as numpy."""
    if isinstance(value, np.ndarray):
        return value
    if callable(getattr(value, "detach", None)):
        return value.detach().cpu().numpy()
    if hasattr(value, "__array__"):
        return np.asarray(value)
    return value  # `_check_array` names its type


def _feed(origin: str, item, names: list[str]) -> dict:
    if isinstance(item, Mapping):
        return {key: _as_array(value) for key, value in item.items()}
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Mapping):
        return _feed(origin, item[0], names)  # (inputs by name, labels), as Olive's loaders
    if isinstance(item, (tuple, list)):
        if len(item) < len(names):
            raise DwsepError(f"calibration {origin}: a {type(item).__name__} of {len(item)} "
                             f"item(s) for a model with {len(names)} inputs {names}")
        return {name: _as_array(value) for name, value in zip(names, item)}
    if len(names) != 1:
        raise DwsepError(f"calibration {origin}: one array for a model with {len(names)} "
                         f"inputs {names}: give dicts input name -> array")
    return {names[0]: _as_array(item)}


def _read_path(path: str, names: list[str]) -> list[tuple[str, dict]]:
    if not os.path.exists(path):
        raise DwsepError(f"calibration file not found: {path}")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npz")) + glob.glob(os.path.join(path, "*.npy")))
        if not files:
            raise DwsepError(f"calibration directory has no .npz or .npy files: {path}")
        return [part for file in files for part in _read_file(file, names)]
    return _read_file(path, names)


def _read_file(path: str, names: list[str]) -> list[tuple[str, dict]]:
    origin = os.path.basename(path)
    if os.path.getsize(path) == 0:
        raise DwsepError(f"calibration file is empty: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except PermissionError:
        raise DwsepError(f"calibration file is not readable: {path}") from None
    except Exception:
        raise DwsepError(f"not a numpy .npz/.npy calibration file (or a damaged one): "
                         f"{path}") from None
    if isinstance(loaded, np.ndarray):  # .npy: the only input's samples
        if len(names) != 1:
            raise DwsepError(f"calibration file {origin} is a .npy array, but the model has "
                             f"{len(names)} inputs {names}: use a .npz keyed by input name")
        return [(origin, {names[0]: loaded})]
    with loaded:
        try:
            arrays = {key: loaded[key] for key in loaded.files}
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise DwsepError(f"cannot read calibration file {path}: {first}") from None
    return [(origin, arrays)]


def _check_names(origin: str, arrays: dict, names: list[str]) -> None:
    missing = [n for n in names if n not in arrays]
    extra = sorted(str(k) for k in arrays if k not in names)
    if missing or extra:
        raise DwsepError(
            f"calibration {origin} has arrays {sorted(map(str, arrays))}, the model's inputs are "
            f"{names}" + (f" (missing {missing})" if missing else f" (unknown {extra})"))


def _check_array(origin: str, name: str, array, sample_shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise DwsepError(f"calibration {origin}: '{name}' is a {type(array).__name__}, "
                         "not a numpy array")
    if array.dtype != np.float32:
        raise DwsepError(f"calibration {origin}: '{name}' has dtype {array.dtype}, the model "
                         "input is float32 (convert with .astype(numpy.float32))")
    if array.ndim == len(sample_shape):  # one sample without the batch axis
        array = array[None]
    if tuple(array.shape[1:]) != sample_shape:
        raise DwsepError(
            f"calibration {origin}: '{name}' has shape {tuple(array.shape)}, expected "
            f"[samples, {', '.join(map(str, sample_shape))}] (the model input without its batch "
            "axis; fix dynamic axes with --input-shape)")
    finite = np.isfinite(array).all(axis=tuple(range(1, array.ndim)))
    if not finite.all():
        raise DwsepError(f"calibration {origin}: '{name}' sample {int(np.argmin(finite))} "
                         "contains NaN or infinite values")
    return array


def _fixed_batch(inputs: list[onnx.ValueInfoProto]) -> int | None:
    sizes = set()
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


# ------------------------------------------------------------------------------ hooks

def pruned(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the named tensors, without what they do not need."""
    hooked = onnx.ModelProto()
    hooked.CopyFrom(model)
    del hooked.graph.output[:]
    hooked.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    remove_dead(hooked, {v.name for v in graph_inputs(model)})
    if hooked.ir_version > MAX_IR_VERSION:
        hooked.ir_version = MAX_IR_VERSION
    return hooked


class Hooks:
    """``model`` pruned to compute only the named tensors, run in onnxruntime."""

    def __init__(self, model: onnx.ModelProto, names: list[str]):
        hooked = pruned(model, names)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle onnxruntime workers spin by default and steal the cores from the Gram GEMMs that
        # run between two calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(hooked.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.names = names

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.names, {k: v for k, v in feed.items() if k in self.inputs})


# ------------------------------------------------------------------------------ geometry

def conv_geometry(site: ConvSite, view: ModelView) -> distill.ConvGeometry:
    """Kernel, strides, explicit pads (auto_pad resolved) and dilations of a 2-D conv."""
    node = site.node
    kernel = tuple(site.spec.weight_shape[2:])
    strides = tuple(attribute(node, "strides", None) or (1, 1))
    dilations = tuple(attribute(node, "dilations", None) or (1, 1))
    pads = tuple(attribute(node, "pads", None) or (0, 0, 0, 0))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = tuple(same_pads(view.shapes[node.input[0]][2:], kernel, strides, dilations,
                               auto_pad))
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    top, left, bottom, right = pads
    return distill.ConvGeometry(kernel, strides, (top, left, bottom, right), dilations)


def layer_activation(site: ConvSite, view: ModelView) -> Activation | None:
    """The activation reading the layer's output (`ConvSite.activation`) as the
    post-activation fit takes it; None when there is none or its parameters are not constants
    of a supported form."""
    if site.activation is None:
        return None
    node = site.activation.node
    try:
        if site.activation.op in ("Sigmoid", "Tanh", "Silu"):
            return Activation.smooth(site.activation.op)
        if node.op_type == "Relu":
            return Activation.relu()
        if node.op_type == "LeakyRelu":
            return Activation.leaky_relu(attribute(node, "alpha", 0.01))
        if node.op_type == "PRelu":
            slope = view.constant(node.input[1])
            if slope is None or slope.size not in (1, site.spec.weight_shape[0]):
                return None
            if slope.size > 1 and slope.shape[0] != slope.size:  # per channel: [N] or [N,1,1]
                return None
            return Activation.leaky_relu(slope.reshape(-1) if slope.size > 1 else slope.item())
        if node.op_type == "Clip":
            low, high = attribute(node, "min", -np.inf), attribute(node, "max", np.inf)
            for index in (1, 2):  # opset 11+: bounds are optional inputs
                if len(node.input) > index and node.input[index]:
                    value = view.constant(node.input[index])
                    if value is None or value.size != 1:
                        return None
                    low, high = (value.item(), high) if index == 1 else (low, value.item())
            return Activation.clip(float(low), float(high))
    except ValueError:  # e.g. a negative leaky slope
        return None
    return None


# ------------------------------------------------------------------------------ rank curves

def rank_curves(model: onnx.ModelProto, view: ModelView, sites: list[ConvSite],
                calibration: CalibrationSet, iterations: int = distill.DEFAULT_ITERATIONS,
                ridge: float = distill.DEFAULT_RIDGE, probe=None,
                log: Callable[[str], None] | None = None) -> dict[str, allocation.RankCurve]:
    """Per layer, the relative output error after distillation at every MAC-saving rank, on the
    original model's activations (each layer alone: the input to rank allocation).

    With ``probe`` (a `sensitivity.OutputProbe`), each curve's errors are instead the model
    outputs' relative error with that layer alone at that rank (measured at a few ranks, see
    `sensitivity.OutputProbe.curve`); the layer's own errors stay in ``curve.layer_errors``."""
    log = log or (lambda message: None)
    curves: dict[str, allocation.RankCurve] = {}
    for group in _groups(sites):
        inputs = list(dict.fromkeys(site.node.input[0] for site in group))
        hooks = Hooks(model, inputs)
        grams = {site.name: _empty_gram(site) for site in group}
        pending = {site.name: _Pending(grams[site.name], conv_geometry(site, view))
                   for site in group}
        for feed in calibration.feeds():
            values = dict(zip(inputs, hooks.run(feed)))
            for site in group:
                pending[site.name].add(values[site.node.input[0]])
        for site in group:
            pending[site.name].flush()
            gram = grams.pop(site.name).with_local_teacher(site.weight, site.bias)
            n, m, *kernel = site.weight.shape
            spec = site.spec
            ranks = allocation.useful_ranks(n, tuple(kernel))
            probed = set(probe.ranks_to_probe(ranks)) if probe is not None else set()
            layer_errors, output_errors = {}, {}
            for rank in ranks:
                with _solver_threads():
                    fit = distill.fit_layer(
                        gram, distill.svd_factors(site.weight, site.bias, rank), iterations, ridge)
                layer_errors[rank] = fit.error
                if rank in probed:
                    output_errors[rank] = probe.error(site.name, fit.factors.kernel(),
                                                      fit.factors.bias)
            errors = (probe.curve(layer_errors, output_errors) if probe is not None
                      else layer_errors)
            points = [(rank, _factorized_macs(spec, rank), errors[rank]) for rank in ranks]
            curve = allocation.RankCurve.build(site.name, _conv_macs(spec), points)
            curve.layer_errors = layer_errors
            curve.measured = output_errors
            curves[site.name] = curve
            log(f"  {site.name}: error by rank " + ", ".join(
                f"{o.rank}:{o.error:.3f}" for o in curve.options if o.rank)
                + (" (model outputs)" if probe is not None else ""))
    return curves


def _solver_threads():
    """BLAS limited to one thread while fitting: the solver's matrices are small (per-channel
    blocks of ``r*taps``, systems of ``M*r+1``), where threads only add synchronization; on a
    busy 2-core machine they made the fits 3x slower. Uses ``threadpoolctl`` when installed,
    else changes nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class _Pending:
    """Batches of activations held until they make ``distill.CHUNK_ROWS`` output pixels, then
    folded into the Gram matrices (one large GEMM instead of many small ones per sample)."""

    def __init__(self, gram: distill.LayerGram, geometry: distill.ConvGeometry):
        self.gram, self.geometry = gram, geometry
        self.inputs, self.teachers, self.rows = [], [], 0

    def add(self, x: np.ndarray, teacher: np.ndarray | None = None) -> None:
        self.inputs.append(x)
        if teacher is not None:
            self.teachers.append(teacher)
        self.rows += x.shape[0] * int(np.prod(self.geometry.output_size(*x.shape[2:])))
        if self.rows >= distill.CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.inputs:
            x = np.concatenate(self.inputs)
            t = np.concatenate(self.teachers) if self.teachers else None
            self.gram.add_conv(x, self.geometry, t)
        self.inputs, self.teachers, self.rows = [], [], 0


def _groups(sites: list[ConvSite]):
    group, used = [], 0
    for site in sites:
        k = int(np.prod(site.weight.shape[1:]))
        size = 8 * (k + 1) ** 2
        if group and used + size > GRAM_BUDGET_BYTES:
            yield group
            group, used = [], 0
        group.append(site)
        used += size
    if group:
        yield group


def _empty_gram(site: ConvSite) -> distill.LayerGram:
    n, m = site.weight.shape[:2]
    return distill.LayerGram(m, int(np.prod(site.weight.shape[2:])), n)


def _conv_macs(spec) -> int:
    from dwsep_compiler import macs
    return macs.conv_macs(spec.batch, spec.weight_shape[0], spec.weight_shape[1],
                          tuple(spec.weight_shape[2:]), spec.out_spatial)


def _factorized_macs(spec, rank: int) -> int:
    from dwsep_compiler import macs
    return macs.factorized_macs(spec.batch, spec.weight_shape[0], spec.weight_shape[1],
                                tuple(spec.weight_shape[2:]), spec.out_spatial, rank=rank)


# ------------------------------------------------------------------------------ distillation

FITS = ("post-activation", "linear")


def _pixel_sample(site: ConvSite, geometry: distill.ConvGeometry,
                  calibration: CalibrationSet) -> distill.PixelSample:
    n, m = site.weight.shape[:2]
    pixels = int(np.prod(site.spec.out_spatial or (1,)))
    return distill.PixelSample(geometry, m, n, calibration.used_samples * pixels)


def _fit_post_activation(site: ConvSite, sample: distill.PixelSample, factors: distill.Factors,
                         activation: Activation, ridge: float) -> distill.LayerFit:
    patches, teacher = sample.arrays()
    if teacher is None:  # teacher="local": the original conv on the student's own input
        teacher = _conv_output(patches, site.weight, site.bias)
    return distill.fit_post_activation(patches, teacher, factors, activation, ridge=ridge)


def _conv_output(patches: np.ndarray, weight: np.ndarray, bias) -> np.ndarray:
    out = patches @ weight.reshape(weight.shape[0], -1).T
    return out + bias.astype(np.float32) if bias is not None else out


class TeacherOutputs:
    """The original model's outputs at the factorized convs (the ``"original"`` teacher), for
    every calibration feed, computed for several layers per run.

    Run per layer, the teacher re-ran the model up to that layer once per layer (a quarter of a
    detector's calibration time went to those prefixes). Instead, when a layer's output is first
    asked for, one pass over the calibration feeds computes it together with the next layers',
    as many as fit ``budget_bytes`` (float32, all samples), and each layer's outputs are
    dropped once taken. **Memory: at most ``budget_bytes``**; a layer whose outputs alone are
    larger is streamed, one feed at a time, by its own run as before."""

    def __init__(self, model: onnx.ModelProto, sites: list[ConvSite],
                 calibration: CalibrationSet, budget_bytes: int = TEACHER_BUDGET_BYTES):
        self.model, self.calibration, self.budget = model, calibration, budget_bytes
        self.order = [site.output for site in sites]
        self.bytes = {site.output: _output_bytes(site, calibration) for site in sites}
        self.held: dict[str, list[np.ndarray]] = {}

    def take(self, site: ConvSite) -> Iterable[np.ndarray]:
        """The teacher's output of ``site`` for each feed of `CalibrationSet.feeds`, in order."""
        if site.output not in self.held:
            if self.bytes[site.output] > self.budget:
                hooks = Hooks(self.model, [site.output])
                return (hooks.run(feed)[0] for feed in self.calibration.feeds())
            self._compute_from(self.order.index(site.output))
        return self.held.pop(site.output)

    def _compute_from(self, start: int) -> None:
        names, used = [], 0
        for name in self.order[start:]:
            if names and used + self.bytes[name] > self.budget:
                break
            names.append(name)
            used += self.bytes[name]
        hooks = Hooks(self.model, names)
        runs = [hooks.run(feed) for feed in self.calibration.feeds()]
        for index, name in enumerate(names):
            self.held[name] = [outputs[index] for outputs in runs]


class Frontier:
    """Run a model that changes layer after layer (the student: convs rewritten in graph
    order; the sensitivity probe: one conv's weights swapped at a time) without re-running
    what no longer changes.

    Before layer i, the convs ``>= i`` (``later``) are the only ones still to change. What the
    model computes upstream of every one of them (the *region*) is fixed from then on: later
    changes only touch those convs and what follows them. So the tensors of the region read
    from outside it (the *frontier*) are kept for every feed, and the next layer runs only the
    nodes its region adds (`take`), or everything outside the region (`rest`). **Memory: at
    most ``budget_bytes``** of frontier tensors for all feeds; where a frontier would be larger
    (estimated from the first feed), the wanted tensor is streamed, one feed at a time, and the
    next layer runs from the model's inputs (as does a model with control-flow subgraphs,
    whose implicit inputs the cut would miss)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]],
                 budget_bytes: int = FRONTIER_BUDGET_BYTES):
        self.feeds, self.budget = feeds, budget_bytes
        self.held: dict[str, list[np.ndarray]] = {}  # the frontier, per feed
        self.region: set[str] = set()  # tensors the region has produced

    def take(self, model: onnx.ModelProto, later: set[str],
             wanted: str) -> Iterable[np.ndarray]:
        """``wanted`` (upstream of the convs ``later``, given by their output names) per feed,
        computed by ``model``; moves the frontier to ``later``'s region. The layers' ``later``
        sets must shrink from call to call (graph order)."""
        inputs = {v.name for v in graph_inputs(model)}
        if wanted in inputs:
            return [feed[wanted] for feed in self.feeds]
        nodes = model.graph.node
        if any(has_subgraph(node) for node in nodes):
            self.held, self.region = {}, set()
            hooks = Hooks(model, [wanted])
            return [hooks.run(feed)[0] for feed in self.feeds]
        downstream: set[str] = set()  # tensors that depend on a later conv
        for node in nodes:
            if _outputs(node) & later or any(i in downstream for i in node.input):
                downstream.update(_outputs(node))
        region = [n for n in nodes if not _outputs(n) & downstream]
        produced = set().union(*map(_outputs, region))
        frontier = {i for n in nodes if _outputs(n) & downstream for i in n.input if i in produced}
        frontier.add(wanted)
        outputs = sorted(frontier - set(self.held))
        kept = sum(a.nbytes for name in frontier & set(self.held) for a in self.held[name])
        computed: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        if outputs:
            hooks = Hooks(self._part(model, region, outputs, inputs), outputs)
            fed = self._fed()
            first = dict(zip(outputs, hooks.run(fed[0])))
            if kept + len(fed) * sum(a.nbytes for a in first.values()) > self.budget:
                # Too large to keep: ``wanted`` one feed at a time (as a run per layer gives
                # it), and the next layer starts from the model's inputs.
                index = outputs.index(wanted) if wanted in first else None
                result = (self.held[wanted] if index is None else itertools.chain(
                    [first[wanted]], (hooks.run(feed)[index] for feed in fed[1:])))
                self.held, self.region = {}, set()
                return result
            computed = [first] + [dict(zip(outputs, hooks.run(feed))) for feed in fed[1:]]
        keep = {name: self.held[name] if name in self.held else [c[name] for c in computed]
                for name in frontier}
        if sum(a.nbytes for arrays in keep.values() for a in arrays) <= self.budget:
            self.held, self.region = keep, produced
        else:  # the next layer starts from the model's inputs
            self.held, self.region = {}, set()
        return keep[wanted]

    def rest(self, model: onnx.ModelProto, outputs: list[str]):
        """``(hooks, feeds)``: ``outputs`` computed from the frontier by what lies outside the
        region (hooks as `Hooks`), and the feeds to run it on (each with its frontier tensors;
        extra entries may be added to them)."""
        inputs = {v.name for v in graph_inputs(model)}
        return Hooks(self._part(model, model.graph.node, outputs, inputs), outputs), self._fed()

    def _fed(self) -> list[dict[str, np.ndarray]]:
        return [{**feed, **{k: v[index] for k, v in self.held.items()}}
                for index, feed in enumerate(self.feeds)]

    def _part(self, model: onnx.ModelProto, nodes, outputs: list[str],
              inputs: set[str]) -> onnx.ModelProto:
        """The model of ``nodes`` not yet run (in graph order) computing ``outputs``; its
        graph inputs are the model's and the held tensors it reads (typed, not shaped)."""
        part = onnx.ModelProto()
        part.CopyFrom(model)
        graph = part.graph
        kept = [n for n in nodes if not _outputs(n) <= self.region]
        del graph.node[:]
        graph.node.extend(kept)
        del graph.output[:]
        graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs)
        remove_dead(part, inputs)
        read = {i for n in graph.node for i in n.input}
        graph.input.extend(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(self.held[name][0].dtype), None)
            for name in sorted(set(self.held) & read))
        if part.ir_version > MAX_IR_VERSION:
            part.ir_version = MAX_IR_VERSION
        return part


def _outputs(node: onnx.NodeProto) -> set[str]:
    return {o for o in node.output if o}


def _output_bytes(site: ConvSite, calibration: CalibrationSet) -> int:
    spatial = int(np.prod(site.spec.out_spatial or (1,)))
    return 4 * calibration.used_samples * int(site.weight.shape[0]) * spatial


@dataclass
class DistillResult:
    """The distilled plans (weights replaced) and sites (bias replaced), and what it cost."""

    sites: list[ConvSite]
    plans: list[ConvPlan]
    info: dict = field(default_factory=dict)


def distill_layers(model: onnx.ModelProto, view: ModelView, sites: list[ConvSite],
                   plans: list[ConvPlan], calibration: CalibrationSet,
                   teacher: str = "original", iterations: int = distill.DEFAULT_ITERATIONS,
                   ridge: float = distill.DEFAULT_RIDGE, fit: str = "post-activation",
                   log: Callable[[str], None] | None = None) -> DistillResult:
    """Sequential layer-wise distillation of every factorized plan (see the module doc).

    ``fit="post-activation"`` (the default): a layer read only by a supported activation
    (`layer_activation`) is refit, after the linear fit, to match the teacher after that
    activation (`distill.fit_post_activation`, on a bounded pixel sample); ``"linear"``: every
    layer keeps the pre-activation least-squares fit.

    Fills each factorized layer's report ``output_rel_error`` (distilled, pre-activation) and
    ``svd_output_rel_error`` (the data-free factors on the same input and teacher), and where
    the post-activation fit ran, ``post_activation_rel_error`` and its linear-fit counterpart.
    """
    if teacher not in TEACHERS:
        raise DwsepError(f"teacher must be one of {TEACHERS}, not {teacher!r}")
    if fit not in FITS:
        raise DwsepError(f"fit must be one of {', '.join(FITS)}, not {fit!r}")
    log = log or (lambda message: None)
    start = time.perf_counter()
    out_sites, out_plans = list(sites), list(plans)
    # Only the part of the graph up to the last factorized conv is ever run: drop the rest once
    # (e.g. a large recurrent head) instead of copying it for every layer.
    needed = [name for site, plan in zip(sites, plans) if plan.report.factorized
              for name in (site.node.input[0], site.output)]
    model = pruned(model, list(dict.fromkeys(needed)))
    done_sites: list[ConvSite] = []
    done_plans: list[ConvPlan] = []
    students = Frontier(list(calibration.feeds()))
    teachers = TeacherOutputs(
        model, [site for site, plan in zip(sites, plans) if plan.report.factorized],
        calibration) if teacher == "original" else None
    for index, (site, plan) in enumerate(zip(sites, plans)):
        if not plan.report.factorized:
            continue
        student_model = apply_plans(model, done_sites, done_plans) if done_plans else model
        later = {s.node.output[0] for s, p in zip(sites[index:], plans[index:])
                 if p.report.factorized}
        inputs = iter(students.take(student_model, later, site.node.input[0]))
        targets = iter(teachers.take(site)) if teachers is not None else None
        gram = _empty_gram(site)
        geometry = conv_geometry(site, view)
        pending = _Pending(gram, geometry)
        activation = layer_activation(site, view) if fit == "post-activation" else None
        sample = _pixel_sample(site, geometry, calibration) if activation else None
        for feed in calibration.feeds():
            x = next(inputs)
            t = next(targets) if targets is not None else None
            pending.add(x, t)
            if sample is not None:
                sample.add_conv(x, t)
        pending.flush()
        if teacher == "local":
            gram = gram.with_local_teacher(site.weight, site.bias)
        rank = plan.report.rank
        report = plan.report
        with _solver_threads():
            layer_fit = distill.fit_layer(
                gram, distill.svd_factors(site.weight, site.bias, rank), iterations, ridge)
            factors = layer_fit.factors
            if sample is not None:
                post = _fit_post_activation(site, sample, factors, activation, ridge)
                factors = post.factors
                report.activation = activation.name
                report.linear_post_activation_rel_error = post.svd_error
                report.post_activation_rel_error = post.error
        depthwise, pointwise, bias = factors.onnx_weights(tuple(site.spec.weight_shape[2:]))
        report.output_rel_error = distill.factors_error(gram, factors)
        report.svd_output_rel_error = layer_fit.svd_error
        if site.bias is None:  # the fit adds a bias the original conv did not have
            report.params_after += int(bias.size)
        out_plans[index] = ConvPlan(report, depthwise, pointwise)
        out_sites[index] = replace(site, bias=bias)
        done_sites.append(out_sites[index])
        done_plans.append(out_plans[index])
        log(f"  {site.name}: rank {rank}, output error {layer_fit.svd_error:.4f} (SVD) -> "
            f"{layer_fit.error:.4f} (distilled)" + (
                f"; after {activation.name} {report.linear_post_activation_rel_error:.4f} -> "
                f"{report.post_activation_rel_error:.4f} (post-activation fit)"
                if sample is not None else ""))
    info = {
        "source": calibration.source,
        "samples": calibration.used_samples,
        "teacher": teacher,
        "method": "sequential layer-wise least squares: pointwise + bias closed form, "
                  f"depthwise by alternating least squares ({iterations} alternations)" + (
                      "; layers read by an activation refit after it (Zhang et al.'s "
                      f"relaxation, {len(distill.POST_ACTIVATION_PENALTIES)} rounds, at most "
                      f"{distill.POST_ACTIVATION_BYTES >> 20} MiB of sampled pixels per layer)"
                      if fit == "post-activation" else ""),
        "fit": fit,
        "ridge": ridge,
        "time_s": round(time.perf_counter() - start, 3),
    }
    return DistillResult(out_sites, out_plans, info)
