"""The factorization on a PyTorch module, in place, for users who fine-tune in their own loop:

    from dwsep_compiler.torch import factorize_
    report = factorize_(model, torch.randn(1, 3, 224, 224), macs_ratio=0.4, calibration=loader)
    ...train...; torch.onnx.export(model, ...); dwsep-compile model.onnx --no-factorize

Each eligible ``nn.Conv2d`` becomes ``nn.Sequential(depthwise, pointwise)`` with the factors the
ONNX pass computes: the module is exported to ONNX (TorchScript exporter, eval mode, no
constant folding, so each conv keeps its own weight initializer, named by its state-dict key,
and batch norms stay modules of their own; the batch axis dynamic, so calibration runs in
batches), `dwsep_compiler.factorize` runs on that export
with the same options, and each factorized conv's depthwise and pointwise weights are read
back into new modules. The factors and their MAC and error figures are therefore those of the
ONNX pass; only the module layout is torch's. Needs the ``finetune`` extra (PyTorch).
"""

from __future__ import annotations

import inspect
import io
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from dwsep_compiler.errors import DwsepError, first_line
from dwsep_compiler.passes.rewrite.conditions import DETAILS, SkipReason
from dwsep_compiler.initialization.stage import resolve_scope
from dwsep_compiler.pipeline import factorize
from dwsep_compiler.report import Report


def factorize_(module: nn.Module, example_inputs, *, rank: int | str | None = None,
               energy: float | None = None, macs_ratio: float | None = None,
               max_error: float | None = None, calibration=None, ignored_scope=(),
               **options) -> Report:
    """Replace ``module``'s eligible convs in place by depthwise + pointwise pairs; returns the
    report (each conv's rank, or why it was kept).

    ``example_inputs``: a tensor or a tuple of tensors for ``module``'s forward (the shapes the
    ranks are priced at). ``calibration``: as `dwsep_compiler.factorize` (a DataLoader of
    ``(images, labels)``, a list of tensors, ...); feed dicts are keyed by the forward's
    argument names. Other ``options`` (``teacher``, ``fit``, ``sensitivity``, ``force``) are
    `factorize`'s. The module is left in eval mode, as the factors were fit in."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)
    module.eval()
    exported = export_onnx(module, inputs)
    convs = _conv_modules(module, exported)
    paths = {name: path for name, (path, _) in convs.items()}
    foreign = [node.name for node in exported.graph.node
               if node.op_type == "Conv" and node.name not in convs]
    factorized, report = factorize(
        exported, rank=rank, energy=energy, macs_ratio=macs_ratio, max_error=max_error,
        calibration=calibration, ignored_scope=[*_scope(ignored_scope, paths), *foreign],
        **options)
    weights = {t.name: numpy_helper.to_array(t) for t in factorized.graph.initializer}
    nodes = {node.name: node for node in factorized.graph.node}
    for layer in report.factorized_layers:
        path, conv = convs[layer.name]
        depthwise, pointwise = nodes[f"{layer.name}_dw"], nodes[f"{layer.name}_pw"]
        bias = weights[pointwise.input[2]] if len(pointwise.input) > 2 else None
        pair = _pair(conv, weights[depthwise.input[1]], weights[pointwise.input[1]], bias)
        _replace(module, path, pair)
    for layer in report.layers:  # named as the user knows them
        if layer.name in foreign:
            layer.reason = SkipReason.NO_TORCH_MODULE.value
            layer.detail = DETAILS[SkipReason.NO_TORCH_MODULE]
        layer.name = paths.get(layer.name, layer.name)
    # a batch norm the ONNX pass folded into a factorized conv is in the pair now
    remaining = {node.name for node in factorized.graph.node}
    for node in exported.graph.node:
        if node.op_type == "BatchNormalization" and node.name not in remaining:
            _replace(module, node.input[1].removesuffix(".weight"), nn.Identity())
    return report


def export_onnx(module: nn.Module, inputs: tuple) -> onnx.ModelProto:
    """The ONNX graph `factorize_` works on: the TorchScript export in eval mode with a dynamic
    batch and no constant folding (so that each conv's weight keeps its state-dict name, which
    is how a factorized ONNX conv finds its module again)."""
    names = _input_names(module, len(inputs))
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module, inputs, buffer, dynamo=False, input_names=names,
                              dynamic_axes={name: {0: "batch"} for name in names},
                              do_constant_folding=False,
                              training=torch.onnx.TrainingMode.EVAL)
    except Exception as exc:
        raise DwsepError(f"cannot export the module to ONNX: {first_line(exc)}") from None
    return onnx.load_from_string(buffer.getvalue())


def _input_names(module: nn.Module, count: int) -> list[str]:
    parameters = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return parameters[:count] if len(parameters) >= count else \
        [f"input_{i}" for i in range(count)]


def _conv_modules(module: nn.Module, exported: onnx.ModelProto) -> dict:
    """ONNX conv node name -> (module path, nn.Conv2d), matched by the weight initializer's
    name (the parameter's state-dict key). Convs without such a module (a functional conv on
    a computed weight) are not in it: they stay as they are."""
    modules = dict(module.named_modules())
    found = {}
    for node in exported.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        path = node.input[1].removesuffix(".weight")
        conv = modules.get(path)
        if type(conv) is nn.Conv2d and conv.padding_mode == "zeros" \
                and node.input[1] == f"{path}.weight":
            found[node.name] = (path, conv)
    return found


def _scope(entries, paths: dict[str, str]) -> list[str]:
    """The ONNX conv names of the module paths that ``entries`` select (paths or regular
    expressions over whole paths: `resolve_scope`, as over conv names)."""
    chosen = resolve_scope((entries,) if isinstance(entries, str) else entries,
                           list(paths.values()))
    return [name for name, path in paths.items() if path in chosen]


def _pair(conv: nn.Conv2d, depthwise: np.ndarray, pointwise: np.ndarray,
          bias: np.ndarray | None) -> nn.Sequential:
    channels = conv.in_channels
    first = nn.Conv2d(channels, depthwise.shape[0], conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=channels,
                      bias=False)
    second = nn.Conv2d(depthwise.shape[0], conv.out_channels, 1, bias=bias is not None)
    device, dtype = conv.weight.device, conv.weight.dtype
    with torch.no_grad():
        first.weight.copy_(torch.tensor(depthwise))
        second.weight.copy_(torch.tensor(pointwise))
        if bias is not None:
            second.bias.copy_(torch.tensor(bias))
    return nn.Sequential(first, second).to(device=device, dtype=dtype).eval()


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)
