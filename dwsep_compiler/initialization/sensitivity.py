"""What one layer's approximation does to the model's outputs: the errors the allocation spends.

A layer's own output error is a poor price for its rank: an error early in the network, or just
before a narrow head (an OCR model's recurrent decoder), is amplified by what follows, while
another layer's is absorbed by the next ReLU. `OutputProbe` measures the model's graph outputs on
calibration inputs with *one* layer replaced by its approximation, everything else original.

The factorized layer computes exactly a standard conv with the effective kernel ``P D`` (and its
fitted bias), so no rewrite is needed to probe it: the probe model is the original with every
candidate conv's weight and bias turned into graph inputs (a folded BatchNormalization folded in
for good), one onnxruntime session, fed the original kernels except for the probed layer.

Cost: one run of the model on the probe's calibration inputs per probed (layer, rank), from
the layer on (what precedes it is kept, `calibration.Frontier`; on the detector below that
halved the probe's time), bounded by `probe_plan` to about ``PROBE_MACS`` multiply-accumulates
of whole-model runs (a deterministic budget, so
the allocation does not depend on the machine's speed): at most ``SAMPLES`` inputs and
``RANKS_PROBED`` ranks a layer, fewer on large models (a 31-conv 416x416 detector: 2 ranks on 7
inputs). `rank_curves` interpolates the *gain* (model-output error / layer error, a smooth
function of rank) between probed ranks: the layer error is known at every rank from its Gram
matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from dwsep_compiler.initialization import output_error
from dwsep_compiler.initialization.calibration import CalibrationSet, Frontier, Hooks
from dwsep_compiler.passes.rewrite.onnx_factorize import ConvSite

SAMPLES = 32  # calibration inputs per probe run, at most
RANKS_PROBED = 5  # ranks of one layer whose model-output error is measured, at most
MIN_SAMPLES, MIN_RANKS = 4, 2
PROBE_MACS = 1.5e12  # model MACs of all probe runs together (~30-60 s on 2 cores)


def probe_plan(model_macs: int, layers: int, calibration_samples: int) -> tuple[int, int]:
    """``(inputs per probe, ranks probed per layer)`` within ``PROBE_MACS``: ranks go first
    (down to ``MIN_RANKS``), then inputs (down to ``MIN_SAMPLES``)."""
    samples = min(SAMPLES, calibration_samples)
    per_run = max(1, model_macs) * max(1, layers)
    ranks = int(min(RANKS_PROBED, max(MIN_RANKS, PROBE_MACS // (per_run * samples))))
    samples = int(min(samples, max(MIN_SAMPLES, PROBE_MACS // (per_run * ranks))))
    return max(1, min(samples, calibration_samples)), ranks


@dataclass
class _Slot:
    weight: str  # the probe model's input names for this layer's kernel and bias
    bias: str
    input: str  # the conv's input and output tensors
    output: str
    kernel: np.ndarray  # the original (BN-folded) kernel and bias
    original_bias: np.ndarray


class OutputProbe:
    """The model's outputs on a few calibration inputs, with one conv's kernel swapped."""

    def __init__(self, model: onnx.ModelProto, sites: list[ConvSite],
                 calibration: CalibrationSet, samples: int = SAMPLES,
                 ranks: int = RANKS_PROBED):
        self.samples, self.ranks = samples, ranks
        self.model, self.slots = _probe_model(model, sites)
        self.order = [site.name for site in sites]
        self.outputs = [o.name for o in model.graph.output
                        if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE)]
        self.hooks = Hooks(self.model, self.outputs)
        self.feeds, taken = [], 0
        for feed in calibration.feeds():
            self.feeds.append(feed)
            taken += len(next(iter(feed.values())))
            if taken >= samples:
                break
        self.base_weights = {name: value for slot in self.slots.values()
                             for name, value in ((slot.weight, slot.kernel),
                                                 (slot.bias, slot.original_bias))}
        self.reference = [self.hooks.run({**feed, **self.base_weights}) for feed in self.feeds]
        # Probing layer i runs only what its swap can change (`calibration.Frontier`).
        self.frontier = Frontier([{**feed, **self.base_weights} for feed in self.feeds])
        self.probing: tuple[int, Hooks, list[dict]] | None = None

    def ranks_to_probe(self, ranks: list[int]) -> list[int]:
        return probed_ranks(ranks, self.ranks)

    def curve(self, layer_errors: dict[int, float], measured: dict[int, float]) -> dict[int, float]:
        return interpolated_gain(layer_errors, measured)

    def _run(self, layer: str, swapped: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        """The outputs with ``layer``'s weights swapped, run from the frontier of the convs
        from ``layer`` on (layers are probed in graph order; an earlier one starts over)."""
        index = self.order.index(layer)
        if self.probing is None or self.probing[0] != index:
            if self.probing is not None and index < self.probing[0]:
                self.frontier = Frontier(self.frontier.feeds, self.frontier.budget)
            slot = self.slots[layer]
            later = {self.slots[name].output for name in self.order[index:]}
            self.frontier.take(self.model, later, slot.input)
            self.probing = (index, *self.frontier.rest(self.model, self.outputs))
        _, hooks, feeds = self.probing
        return [hooks.run({**feed, **swapped}) for feed in feeds]

    def error(self, layer: str, kernel: np.ndarray, bias: np.ndarray) -> float:
        """The relative error of the model's outputs with ``layer``'s conv computing ``kernel``
        ``[N, M, kh, kw]`` + ``bias`` instead of its original weights: the square root of the mean
        over outputs of `output_error.mean_squared_relative` (per feature, all probe inputs
        together)."""
        slot = self.slots[layer]
        got = self._run(layer, {slot.weight: np.asarray(kernel, dtype=np.float32).reshape(
            slot.kernel.shape), slot.bias: np.asarray(bias, dtype=np.float32)})
        squared = []
        for index in range(len(self.outputs)):
            diff = sum(output_error.feature_energies((g[index] - r[index]).astype(np.float64))
                       for g, r in zip(got, self.reference))
            norm = sum(output_error.feature_energies(r[index].astype(np.float64))
                       for r in self.reference)
            squared.append(float(output_error.mean_squared_relative(diff, norm)))
        return float(np.sqrt(np.mean(squared))) if squared else 0.0


def _probe_model(model: onnx.ModelProto, sites: list[ConvSite]):
    """A copy of ``model`` whose convs at ``sites`` read their (BN-folded) weight and bias from
    new graph inputs, with the folded BatchNormalization nodes removed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    by_output = {site.node.output[0]: site for site in sites}
    folded = {site.batch_norm.output[0] for site in sites if site.batch_norm is not None}
    slots: dict[str, _Slot] = {}
    nodes = []
    for node in graph.node:
        if node.op_type == "BatchNormalization" and node.output[0] in folded:
            continue
        site = by_output.get(node.output[0]) if node.op_type == "Conv" else None
        if site is None:
            nodes.append(node)
            continue
        index = len(slots)
        weight, bias = f"__dwsep_probe_weight_{index}", f"__dwsep_probe_bias_{index}"
        n = site.weight.shape[0]
        original_bias = (np.zeros(n, dtype=np.float32) if site.bias is None
                         else np.asarray(site.bias, dtype=np.float32))
        slots[site.name] = _Slot(weight, bias, node.input[0], site.output,
                                 np.asarray(site.weight, dtype=np.float32), original_bias)
        graph.input.extend([
            helper.make_tensor_value_info(weight, TensorProto.FLOAT, list(site.weight.shape)),
            helper.make_tensor_value_info(bias, TensorProto.FLOAT, [n])])
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        del conv.input[:]
        conv.input.extend([node.input[0], weight, bias])
        del conv.output[:]
        conv.output.append(site.output)
        nodes.append(conv)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return probe, slots


def probed_ranks(ranks: list[int], most: int = RANKS_PROBED) -> list[int]:
    """At most ``most`` of ``ranks`` (sorted), spread geometrically, the first and last always."""
    if len(ranks) <= most:
        return list(ranks)
    picks = np.unique(np.round(np.geomspace(1, len(ranks), most)).astype(int) - 1)
    return [ranks[i] for i in picks]


def interpolated_gain(layer_errors: dict[int, float], measured: dict[int, float]) -> dict[int, float]:
    """Model-output error at every rank of ``layer_errors`` from those ``measured``: the gain
    ``measured / layer error`` interpolated linearly in rank between probed ranks (held flat
    beyond them), times the layer error."""
    probed = sorted(measured)
    gains = [measured[r] / layer_errors[r] if layer_errors[r] > 0 else np.nan for r in probed]
    known = [(r, g) for r, g in zip(probed, gains) if np.isfinite(g)]
    out = {}
    for rank, error in layer_errors.items():
        if rank in measured:
            out[rank] = measured[rank]
        elif known:
            gain = float(np.interp(rank, [r for r, _ in known], [g for _, g in known]))
            out[rank] = gain * error
        else:
            out[rank] = error
    return out
