"""The depthwise-separable rewrite on an ONNX graph.

For each standard convolution (constant float32 weights, group 1, kernel larger than 1x1) the pass
folds a directly following inference BatchNormalization into it, then replaces it by

    Conv(group=M, M*r filters, same kernel/strides/dilations/pads/auto_pad)   # depthwise
    Conv(1x1, N x M*r, carrying the bias)                                    # pointwise

The pointwise conv writes the original output tensor, so the rest of the graph is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dwsep_compiler.initialization.ranks import RankPolicy
from dwsep_compiler.initialization import lowrank
from dwsep_compiler.model import ModelView, attribute, graph_inputs, view_model
from dwsep_compiler.report import LayerReport

from dwsep_compiler.passes.rewrite.conditions import ConvPlan, ConvSpec, plan_conv

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass
class ConvSite:
    """One Conv node of the graph, with what is needed to rewrite it."""

    node: onnx.NodeProto
    name: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    batch_norm: onnx.NodeProto | None  # an inference BN to fold, if any
    spec: ConvSpec
    # The elementwise activation that alone reads the layer's output (after the folded BN), if
    # any: the post-activation fit matches the teacher through it.
    activation: "FollowingActivation | None" = None

    @property
    def output(self) -> str:
        """The tensor the factorized pair writes: the conv's output, or its folded BN's."""
        return self.batch_norm.output[0] if self.batch_norm is not None else self.node.output[0]


def conv_sites(view: ModelView) -> list[ConvSite]:
    """Every Conv node, in graph order, with a unique report name."""
    sites, used = [], set()
    for index, node in enumerate(view.model.graph.node):
        if node.op_type != "Conv" or node.domain not in _ONNX_DOMAINS:
            continue
        name = node.name or f"Conv_{index}"
        while name in used:
            name = f"{name}_{index}"
        used.add(name)
        sites.append(_site(view, node, name))
    return sites


def _site(view: ModelView, node: onnx.NodeProto, name: str) -> ConvSite:
    weight = view.constant(node.input[1])
    weight_shape = view.shapes.get(node.input[1])
    bias_name = node.input[2] if len(node.input) > 2 else ""
    bias = view.constant(bias_name)
    batch_norm = _foldable_batch_norm(view, node)
    if weight is not None and batch_norm is not None and (not bias_name or bias is not None):
        scale, shift, mean, var = (view.constant(i) for i in batch_norm.input[1:5])
        eps = attribute(batch_norm, "epsilon", 1e-5)
        if weight.dtype == np.float32:
            weight, bias = lowrank.fold_batch_norm(weight, bias, scale, shift, mean, var, eps)
    else:
        batch_norm = None
    x_shape = view.shapes.get(node.input[0])
    y_shape = view.shapes.get(node.output[0])
    kernel = tuple(weight_shape[2:]) if weight_shape else ()
    spec = ConvSpec(
        name=name,
        weight=weight,
        weight_shape=tuple(weight.shape) if weight is not None else weight_shape,
        weight_dtype=str(weight.dtype) if weight is not None else None,
        groups=int(attribute(node, "group", 1)),
        strides=tuple(attribute(node, "strides", None) or [1] * len(kernel)),
        has_bias=bool(bias_name) or batch_norm is not None,
        bias_constant=not bias_name or bias is not None,
        bias_finite=bias is None or bool(np.all(np.isfinite(bias))),
        batch=x_shape[0] if x_shape else None,
        out_spatial=tuple(y_shape[2:]) if y_shape else None,
    )
    site = ConvSite(node, name, weight, bias, batch_norm, spec)
    site.activation = following_activation(view, site.output)
    return site


ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh")


@dataclass(frozen=True)
class FollowingActivation:
    """An elementwise activation applied to a tensor and nothing else reading it: ``op`` is an
    ONNX op type of `ACTIVATIONS` or ``"Silu"`` (``x * Sigmoid(x)``, two nodes); ``node`` holds
    the parameters (LeakyRelu's alpha, PRelu's slope, Clip's bounds); ``output`` is the
    activated tensor."""

    op: str
    node: onnx.NodeProto
    output: str


def following_activation(view: ModelView, tensor: str) -> FollowingActivation | None:
    """The activation that alone reads ``tensor`` (not a graph output), if any."""
    single = _only_reader(view, tensor, ACTIVATIONS)
    if single is not None:
        return FollowingActivation(single.op_type, single, single.output[0])
    readers = view.consumers.get(tensor, [])
    if len(readers) != 2 or tensor in view.graph_outputs:
        return None
    sigmoid = next((n for n in readers if n.op_type == "Sigmoid"), None)
    mul = next((n for n in readers if n.op_type == "Mul"), None)
    if sigmoid is None or mul is None or sigmoid.input[0] != tensor:
        return None
    if sorted(mul.input) != sorted([tensor, sigmoid.output[0]]):
        return None
    if view.consumers.get(sigmoid.output[0], []) != [mul] or sigmoid.output[0] in view.graph_outputs:
        return None
    return FollowingActivation("Silu", mul, mul.output[0])


def _only_reader(view: ModelView, tensor: str, op_types) -> onnx.NodeProto | None:
    """The node reading ``tensor`` when it is the only reader and one of ``op_types``."""
    readers = view.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in view.graph_outputs:
        return None
    reader = readers[0]
    if reader.op_type not in op_types or reader.domain not in _ONNX_DOMAINS:
        return None
    return reader if reader.input[0] == tensor else None


def _foldable_batch_norm(view: ModelView, conv: onnx.NodeProto) -> onnx.NodeProto | None:
    """The inference BatchNormalization that is the only reader of this conv's output, if any."""
    bn = _only_reader(view, conv.output[0], ("BatchNormalization",))
    if bn is None or len(bn.input) < 5:
        return None
    if attribute(bn, "training_mode", 0) or any(o for o in bn.output[1:]):
        return None
    if attribute(bn, "spatial", 1) != 1:  # opset < 9 per-activation BN
        return None
    params = [view.constant(i) for i in bn.input[1:5]]
    if any(p is None or p.dtype != np.float32 or p.ndim != 1 for p in params):
        return None
    return bn


@dataclass
class OnnxFactorization:
    model: onnx.ModelProto
    layers: list[LayerReport]
    view_before: ModelView


def factorize_onnx(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    policy: RankPolicy | None = None,
    skip: set[str] | frozenset = frozenset(),
    ranks: dict[str, int] | None = None,
    refine: Callable[[ModelView, list[ConvSite], list[ConvPlan]],
                     tuple[list[ConvSite], list[ConvPlan]]] | None = None,
) -> OnnxFactorization:
    """Rewrite every eligible conv of ``model`` (which is not modified); report every conv.

    ``ranks`` fixes the rank of named layers (per-layer allocation); other layers use ``policy``.
    ``refine(view, sites, plans) -> (sites, plans)`` may replace the factorized layers' weights
    (and, through ``site.bias``, their bias) before the rewrite: the calibration hook.
    """
    policy = policy or RankPolicy()
    view = view_model(model, input_shapes)
    sites = conv_sites(view)
    plans = [plan_conv(site.spec, policy, skip, (ranks or {}).get(site.name)) for site in sites]
    if refine is not None and any(plan.report.factorized for plan in plans):
        sites, plans = refine(view, sites, plans)
    if not any(plan.report.factorized for plan in plans):
        unchanged = onnx.ModelProto()
        unchanged.CopyFrom(model)
        return OnnxFactorization(unchanged, [p.report for p in plans], view)
    rewritten = apply_plans(model, sites, plans)
    return OnnxFactorization(rewritten, [p.report for p in plans], view)


def apply_plans(model: onnx.ModelProto, sites: list[ConvSite], plans: list[ConvPlan]):
    """A copy of ``model`` with each factorized site replaced by its DW + PW pair."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = _all_names(graph)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # conv output name -> new nodes
    folded_bn_outputs: set[str] = set()
    new_initializers = []
    for site, plan in zip(sites, plans):
        if not plan.report.factorized:
            continue
        node = site.node
        plan.report.bn_folded = site.batch_norm is not None
        final_output = site.output
        if site.batch_norm is not None:
            folded_bn_outputs.add(site.batch_norm.output[0])
        m = plan.report.in_channels
        dw_w = _unique(f"{site.name}_dw_weight", taken)
        pw_w = _unique(f"{site.name}_pw_weight", taken)
        mid = _unique(f"{site.name}_dw_output", taken)
        new_initializers += [numpy_helper.from_array(plan.depthwise, dw_w),
                             numpy_helper.from_array(plan.pointwise, pw_w)]
        pw_inputs = [mid, pw_w]
        if site.bias is not None:
            pw_b = _unique(f"{site.name}_pw_bias", taken)
            new_initializers.append(numpy_helper.from_array(site.bias.astype(np.float32), pw_b))
            pw_inputs.append(pw_b)
        dw_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dw_attrs["group"] = m
        dw_attrs["kernel_shape"] = list(plan.report.kernel)
        depthwise = helper.make_node("Conv", [node.input[0], dw_w], [mid],
                                     name=_unique(f"{site.name}_dw", taken), **dw_attrs)
        pointwise = helper.make_node("Conv", pw_inputs, [final_output],
                                     name=_unique(f"{site.name}_pw", taken),
                                     kernel_shape=[1, 1])
        replaced[node.output[0]] = [depthwise, pointwise]

    nodes = []
    for node in graph.node:
        if node.op_type == "Conv" and node.output[0] in replaced:
            nodes.extend(replaced[node.output[0]])
        elif node.op_type == "BatchNormalization" and node.output[0] in folded_bn_outputs:
            continue
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    remove_dead(out, {v.name for v in graph_inputs(model)})
    return out


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}_{i}"
        i += 1
    taken.add(candidate)
    return candidate


def remove_dead(model: onnx.ModelProto, real_inputs: set[str]) -> None:
    """Drop nodes and initializers nothing reads any more (the replaced weights and their
    producers), initializers listed as graph inputs, and stale value_info."""
    graph = model.graph
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output) or has_subgraph(node):
            kept.append(node)
            live.update(i for i in node.input if i)
            live.update(subgraph_inputs(node))
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    # Old IR versions list every weight as a graph input; a runtime then cannot treat weights as
    # constants (no prepacking). The real inputs stay exactly as they were.
    inputs = [v for v in graph.input if v.name in real_inputs]
    del graph.input[:]
    graph.input.extend(inputs)
    if model.ir_version < 4:
        model.ir_version = 4
    produced = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(inner.input)
                names.update(subgraph_inputs(inner))
    return names
