"""The whole job as one Python call: model in -> pass -> initialization -> compile -> artifacts.

`compile_model` is what ``dwsep-compile`` runs; a pipeline can import it. The output directory
appears complete or not at all (built in a temporary sibling directory, then renamed), and the
input model is only ever read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from . import compile as tvm_compile
from .errors import DwsepError
from .initialization.ranks import RankPolicy
from .macs import model_macs
from .model import (graph_inputs, load_model, resolve_input_shapes, save_model, view_model)
from .passes.onnx_factorize import factorize_onnx
from .report import Report, format_table
from .targets import TargetPreset, resolve_target

REPORT_NAME = "report.json"
MODEL_NAME = "model.onnx"


class NoEligibleConvs(DwsepError):
    """The model has convolutions but none could be rewritten (the unchanged model was written)."""


@dataclass
class CompileResult:
    output_dir: str
    model_path: str
    report: Report
    library: tvm_compile.Library | None = None
    messages: list[str] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self.report)


def default_output_dir(model_path: str) -> str:
    stem = os.path.splitext(os.path.basename(model_path))[0]
    return os.path.join(os.getcwd(), f"{stem}.dwsep")


def compile_model(
    model_path: str,
    target: str | TargetPreset = "host",
    output_dir: str | None = None,
    rank: int | str | None = None,
    energy: float | None = None,
    force: bool = False,
    skip: tuple[str, ...] | list[str] = (),
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    compile: bool = True,
    cross_compiler: str | None = None,
    verify: bool = True,
    log: Callable[[str], None] | None = None,
) -> CompileResult:
    """Factorize ``model_path``'s standard convolutions and build the result for ``target``.

    Writes ``model.onnx``, ``report.json`` and (unless ``compile=False``) the library into
    ``output_dir`` (default ``./<model stem>.dwsep``). ``verify`` runs host builds once on a
    random input against onnxruntime and records the error in the report.
    Raises `DwsepError` (one-line message) for bad input, `NoEligibleConvs` after writing the
    unchanged model when nothing could be rewritten.
    """
    log = log or (lambda message: None)
    preset = target if isinstance(target, TargetPreset) else resolve_target(target)
    try:
        policy = RankPolicy(rank=rank, energy=energy, force=force)
    except ValueError as exc:
        raise DwsepError(str(exc)) from None
    output_dir = os.path.abspath(output_dir or default_output_dir(model_path))
    _check_output_dir(output_dir, model_path)

    model = load_model(model_path)
    shapes = resolve_input_shapes(model, input_shapes)
    result = factorize_onnx(model, shapes, policy, frozenset(skip))
    unknown = set(skip) - {layer.name for layer in result.layers}
    if unknown:
        raise DwsepError(f"--skip names no conv of the model: {', '.join(sorted(unknown))}")
    if not result.layers:
        raise DwsepError(f"the model has no Conv nodes: nothing to factorize ({model_path})")

    after_view = view_model(result.model, shapes)
    report = Report(
        model=os.path.abspath(model_path), target=preset.name, rank_policy=policy.describe(),
        layers=result.layers, model_macs_before=model_macs(result.view_before),
        model_macs_after=model_macs(after_view))
    if policy.rank is None and policy.energy is None:
        report.notes.append(
            "no calibration data: ranks come from data-free SVD (energy 0.95), which can cost "
            "accuracy on trained models; check the output error before deploying")
    nothing = not report.factorized_layers

    staging = tempfile.mkdtemp(prefix=".dwsep-", dir=os.path.dirname(output_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        model_out = os.path.join(staging, MODEL_NAME)
        save_model(result.model, model_out)
        _check_runs_in_onnxruntime(model_out)
        library = None
        if compile and not nothing:
            log(f"compiling for {preset.name} with TVM ...")
            mod = tvm_compile.import_onnx(result.model, shapes)
            executable = tvm_compile.build(mod, preset)
            library = tvm_compile.export_library(executable, preset, staging, cross_compiler)
            report.artifacts["library"] = os.path.join(output_dir, os.path.basename(library.path))
            if library.note:
                report.notes.append(library.note)
            if verify and preset.host_arch == "host":
                report.verification = _verify_host(executable, model_out, result.model, shapes)
        report.artifacts["model"] = os.path.join(output_dir, MODEL_NAME)
        report.artifacts["report"] = os.path.join(output_dir, REPORT_NAME)
        with open(os.path.join(staging, REPORT_NAME), "w") as handle:
            handle.write(report.to_json())
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    out = CompileResult(output_dir, os.path.join(output_dir, MODEL_NAME), report)
    if library is not None:
        out.library = tvm_compile.Library(
            os.path.join(output_dir, os.path.basename(library.path)), library.linked, library.note)
    if nothing:
        reasons = sorted({layer.reason for layer in report.layers})
        raise NoEligibleConvs(
            f"no eligible convolutions ({len(report.layers)} convs, skipped: "
            f"{', '.join(reasons)}); wrote the unchanged model to {out.model_path}")
    return out


def _check_output_dir(output_dir: str, model_path: str) -> None:
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise DwsepError(f"output path exists and is not a directory: {output_dir}")
        if os.listdir(output_dir) and not os.path.exists(os.path.join(output_dir, REPORT_NAME)):
            raise DwsepError(
                f"output directory {output_dir} exists and is not a dwsep-compile output: "
                "choose another -o")
    model_abs = os.path.abspath(model_path)
    if os.path.commonpath([model_abs, output_dir]) == output_dir:
        raise DwsepError(f"output directory {output_dir} contains the input model: choose another -o")
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        raise DwsepError(f"parent of the output directory does not exist: {parent}")


def _replace_dir(staging: str, output_dir: str) -> None:
    """Move the finished ``staging`` dir to ``output_dir``, replacing an earlier output."""
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(prefix=".dwsep-old-", dir=os.path.dirname(output_dir))
        os.rmdir(old)
        os.rename(output_dir, old)
        os.rename(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output_dir)


def _session(path_or_model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _check_runs_in_onnxruntime(path: str) -> None:
    try:
        _session(path)
    except Exception as exc:
        raise DwsepError(f"onnxruntime cannot load the rewritten model: "
                         f"{tvm_compile._first_line(exc)}") from None


def _verify_host(executable, model_path: str, model: onnx.ModelProto,
                 shapes: dict[str, tuple[int, ...]]) -> dict:
    """Run the library once on a random input and compare with onnxruntime on the same model."""
    rng = np.random.default_rng(0)
    names = [v.name for v in graph_inputs(model)]
    inputs = [rng.standard_normal(shapes[name]).astype(np.float32) for name in names]
    expected = _session(model_path).run(None, dict(zip(names, inputs)))
    actual = tvm_compile.run_executable(executable, inputs)
    errors = [float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-30))
              for a, e in zip(actual, expected)]
    return {"input": "standard normal, seed 0", "reference": "onnxruntime on model.onnx",
            "max_rel_error": max(errors) if errors else 0.0}
