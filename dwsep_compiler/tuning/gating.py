"""Latency gating: keep a layer's original conv where the device runs it faster than the
tuned depthwise + pointwise pair.

Layers are found in the compiled module by their weights: every kernel call whose arguments
include a layer's constant weight tensor (the original conv's; the depthwise or pointwise
factor's) is that layer's, and its latency is the best the tuning records hold for the call's
PrimFunc on this target. A fused DW+PW kernel counts once for its pair. `gate` measures every
factorized layer both ways and names the slower pairs; `mark_kept` labels them in the report
after the rewrite that keeps their original convs.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from dwsep_compiler.model import view_model
from dwsep_compiler.passes.rewrite.onnx_factorize import conv_sites
from dwsep_compiler.passes.lowering.call_rewriter import digest
from dwsep_compiler.tuning.records import TuningRecords
from dwsep_compiler.tuning.tasks import legalized

SLOWER_ON_DEVICE = "slower_than_original_on_device"  # the skip reason of a gated layer




def kernel_calls(mod: tvm.IRModule, target) -> list[tuple[tirx.PrimFunc, set[str]]]:
    """Each kernel call of ``mod``'s main function: its PrimFunc and the digests of the ONNX
    weights behind its constant arguments (through the passes that fold or pack them)."""
    origins: dict[str, str] = {}
    lowered = legalized(mod, target, origins=origins)

    def original(key: str) -> str:  # through every rewrite (folded, then packed, say)
        seen = set()
        while key in origins and key not in seen:
            seen.add(key)
            key = origins[key]
        return key

    calls = []
    for block in lowered["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not (isinstance(value, relax.Call) and getattr(value.op, "name", "")
                    == "relax.call_tir"):
                continue
            weights = {original(digest(arg.value.numpy())) for arg in value.args[1].fields
                       if isinstance(arg, tvm.ir.expr.Constant) and len(arg.value.shape) >= 3}
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


def gate(original: tvm.IRModule, factorized: tvm.IRModule, result, shapes, target,
         records: TuningRecords) -> dict[str, tuple[float, float]]:
    """Set each factorized layer's tuned latency and its original conv's (``result``: the
    `OnnxFactorization` that ``factorized`` was imported from, ``original`` the input model's
    module); return ``{layer: (dwpw_ms, original_ms)}`` of the layers whose DW+PW is not
    faster on the device."""
    sites = {site.name: site for site in conv_sites(result.view_before)}
    after = view_model(result.model, shapes)
    by_name = {node.name: node for node in result.model.graph.node}
    pairs, originals = {}, {}
    for layer in result.layers:
        if not layer.factorized:
            continue
        originals[layer.name] = [digest(result.view_before.constant(
            sites[layer.name].node.input[1]))]
        pairs[layer.name] = [digest(after.constant(by_name[n].input[1]))
                             for n in (f"{layer.name}_dw", f"{layer.name}_pw") if n in by_name]
    new = layer_latencies(factorized, target, records, pairs)
    old = layer_latencies(original, target, records, originals)
    slower = {}
    for layer in result.layers:
        if layer.name not in pairs:
            continue
        layer.latency_ms = None if new[layer.name] is None else new[layer.name] * 1e3
        layer.original_latency_ms = None if old[layer.name] is None else old[layer.name] * 1e3
        if (layer.latency_ms is not None and layer.original_latency_ms is not None
                and layer.latency_ms >= layer.original_latency_ms):
            slower[layer.name] = (layer.latency_ms, layer.original_latency_ms)
    return slower


def mark_kept(layers, slower: dict[str, tuple[float, float]],
              latencies: dict[str, tuple[float | None, float | None]]) -> None:
    """After the rewrite without the ``slower`` layers: carry the measured latencies over and
    give each kept layer its reason (the kept conv runs at its original latency)."""
    for layer in layers:
        if layer.name not in latencies:
            continue
        layer.latency_ms, layer.original_latency_ms = latencies[layer.name]
        if layer.name in slower:
            layer.reason = SLOWER_ON_DEVICE
            layer.detail = (f"kept: tuned DW+PW {slower[layer.name][0]:.4g} ms >= "
                            f"original {slower[layer.name][1]:.4g} ms on the device")
            layer.latency_ms = layer.original_latency_ms
