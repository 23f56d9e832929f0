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

import onnx
import onnxruntime as ort

from dwsep_compiler import compile as tvm_compile
from dwsep_compiler import interrupt
from dwsep_compiler.compile import verify as verification
from dwsep_compiler.errors import DwsepError, first_line
from dwsep_compiler.initialization.calibration import load_calibration
from dwsep_compiler.compile.precision import FP16_TOLERANCE, PRECISIONS, check_precision
from dwsep_compiler.initialization.stage import KEEP_ORIGINAL, FactorizeOptions, Initializer
from dwsep_compiler.macs import model_macs
from dwsep_compiler.model import model_from, resolve_input_shapes, save_model, view_model
from dwsep_compiler.report import Report, format_table
from dwsep_compiler.targets import TargetPreset, resolve_target

# Quantize/dequantize pairs of a QDQ model (NNCF, onnxruntime.quantization).
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
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


@dataclass(frozen=True)
class BuildOptions:
    """What `compile_model` does after the factorization: build (``compile``), link
    (``cross_compiler``), verify, tune or apply tuning records."""

    compile: bool = True
    cross_compiler: str | None = None
    verify: bool = True
    tune: object = None  # tuning.TuneOptions
    tuning_records: str | None = None
    precision: str = "fp32"  # "fp16": float16 inside the library (ARMv8.2 cores)

    @property
    def dtype(self) -> str:
        """The element type inside the library (``precision`` is checked by `compile_model`)."""
        return PRECISIONS[self.precision]

    @property
    def tuned(self) -> bool:
        return self.compile and (self.tune is not None or bool(self.tuning_records))


def default_output_dir(model_path: str) -> str:
    stem = os.path.splitext(os.path.basename(model_path))[0]
    return os.path.join(os.getcwd(), f"{stem}.dwsep")


@dataclass
class _Stage:
    """The factorization of one model: what `compile_model` needs beyond the rewritten model
    (the initializer, to rewrite again with the layers the device gating keeps)."""

    model: onnx.ModelProto  # our copy of the input
    path: str | None  # the input's path; None for a model given in memory
    shapes: dict
    calib: object
    init: Initializer
    result: object  # OnnxFactorization

    @property
    def label(self) -> str:
        return self.path or "<model in memory>"

    def report(self, target: str | None) -> Report:
        """The report of ``result`` (the layers, MACs, notes; no artifacts)."""
        result, calib = self.result, self.calib
        report = Report(
            model=self.label, target=target, rank_policy=self.init.policy_text,
            layers=result.layers, model_macs_before=model_macs(result.view_before),
            model_macs_after=model_macs(view_model(result.model, self.shapes)),
            input_shapes={name: [int(d) for d in shape] for name, shape in self.shapes.items()})
        report.rank_allocation = self.init.allocation_info
        if self.init.options.rank == "full":
            report.notes.append(
                "rank=full: the exact rewrite (every eligible conv at full rank); it does not "
                "cut MACs, it adds them: use it to check the rewrite, not to speed a model up")
        if self.init.policy.off:
            report.notes.append("--no-factorize: the model is compiled as given")
        elif calib is None:
            if self.init.options.rank != "full":  # exact at full rank: nothing for calibration to recover
                report.notes.append(
                    "WARNING: no calibration data: the factors are the data-free SVD of each "
                    "kernel, which can destroy a trained model's accuracy at ranks that save "
                    "MACs; pass --calibration FILE.npz (a few dozen real inputs) to distill "
                    "every layer")
        else:
            report.calibration = self.init.calibration_report()
            if calib.used_samples < calib.samples:
                report.notes.append(
                    f"calibration: the model's batch size is fixed to {calib.batch}: used "
                    f"{calib.used_samples} of {calib.samples} samples")
        quantized = _quantized_ops(result.model)
        if quantized:
            report.notes.append(
                f"the model is quantized ({'/'.join(quantized)} nodes): TVM 0.27 imports them "
                "as float operations, so the library computes in float32 what the QDQ graph "
                "simulates, not with int8 kernels (verified against onnxruntime running the "
                "graph unfused, to a tolerance of one quantization step)")
        return report


def _quantized_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({node.op_type for node in model.graph.node if node.op_type in QDQ_OPS})


def _factorize_stage(model, options: FactorizeOptions, log) -> _Stage:
    """Read ``model`` (copied), its shapes and calibration data; choose the ranks, rewrite and
    initialize."""
    options.policy()  # bad options fail before the model is read
    proto, path = model_from(model)
    shapes = resolve_input_shapes(proto, options.input_shapes)
    calib = (load_calibration(options.calibration, proto, shapes)
             if options.calibration is not None else None)
    init = Initializer(proto, shapes, options, calib, source=path or "the model given", log=log)
    return _Stage(proto, path, shapes, calib, init, init.factorize(init.initial_ranks()))


def factorize(model, *, rank: int | str | None = None, energy: float | None = None,
              macs_ratio: float | None = None, max_error: float | None = None,
              calibration=None, ignored_scope=(), force: bool = False,
              input_shapes: dict[str, tuple[int, ...]] | None = None,
              teacher: str = "original", fit: str = "post-activation",
              sensitivity: str = "model-output", finetune_steps: int = 0,
              finetune_lr: float = 1e-4, log: Callable[[str], None] | None = None,
              ) -> tuple[onnx.ModelProto, Report]:
    """The rewrite and its initialization in memory, for a pipeline's next step: returns the
    factorized model and its report, writes nothing, and never changes ``model``.

    ``model``: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``. ``calibration``: a path
    or an iterable of feeds: a torch DataLoader, an ``nncf.Dataset``, a list of dicts or arrays
    (see `load_calibration`). ``ignored_scope``: convs to keep, by report name or by a regular
    expression matched against whole names. The rank options, ``teacher``, ``fit``,
    ``sensitivity`` and the fine-tuning are those of `compile_model`. A model where nothing
    could be rewritten comes back unchanged, each conv's reason in the report."""
    options = FactorizeOptions(rank=rank, energy=energy, macs_ratio=macs_ratio,
                               max_error=max_error, calibration=calibration,
                               ignored_scope=ignored_scope, force=force, input_shapes=input_shapes,
                               teacher=teacher, fit=fit, sensitivity=sensitivity,
                               finetune_steps=finetune_steps, finetune_lr=finetune_lr)
    stage = _factorize_stage(model, options, log or (lambda message: None))
    return stage.result.model, stage.report(target=None)


def compile_model(
    model,
    target: str | TargetPreset = "host",
    output_dir: str | None = None,
    rank: int | str | None = None,
    energy: float | None = None,
    force: bool = False,
    ignored_scope: tuple[str, ...] | list[str] = (),
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    compile: bool = True,
    cross_compiler: str | None = None,
    verify: bool = True,
    log: Callable[[str], None] | None = None,
    calibration=None,
    macs_ratio: float | None = None,
    max_error: float | None = None,
    teacher: str = "original",
    fit: str = "post-activation",
    sensitivity: str = "model-output",
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    tune=None,
    tuning_records: str | None = None,
    factorize_convs: bool = True,
    precision: str = "fp32",
) -> CompileResult:
    """Factorize ``model``'s standard convolutions and build the result for ``target``.

    ``model``: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (only read). Writes
    ``model.onnx``, ``report.json`` and (unless ``compile=False``) the library into
    ``output_dir`` (default ``./<model stem>.dwsep``, ``./model.dwsep`` for a model in
    memory). ``ignored_scope``: convs to keep (names or regular expressions, as `factorize`). ``verify``: run the library on random and
    calibration inputs against onnxruntime where it can run (here, under qemu, on the local
    OpenCL device; see `dwsep_compiler.compile.verify`); above the tolerance `VerificationFailed` and
    nothing is written. The report's ``verification`` says what ran.

    Ranks: at most one of ``rank`` (every layer), ``energy`` (per layer, from the singular
    values), ``macs_ratio`` (conv MACs <= ratio x original, ranks allocated across layers with
    the least error) and ``max_error`` (per layer, the smallest rank whose relative error is at
    most this). With none of them: ``energy=0.95``.

    ``calibration``: real inputs (a ``.npz``/``.npy`` path, a directory of them, or an iterable
    of feeds: a torch DataLoader, an ``nncf.Dataset``, a list; see `load_calibration`). With it every factorized layer is distilled
    sequentially against the original model (``teacher``: see `distill_layers`) and the errors
    that drive ``macs_ratio``/``max_error`` are output errors on that data; without it the
    factors are the data-free SVD and those errors are weight errors. ``fit``:
    ``"post-activation"`` (default) refits a layer read by a ReLU-like activation to match the
    teacher after it, ``"linear"`` keeps the pre-activation fit. ``sensitivity``:
    ``"model-output"`` (default) prices a layer's rank by the model outputs' error with that
    layer alone approximated, ``"layer"`` by the layer's own output error.

    ``finetune_steps`` (needs ``calibration`` and PyTorch, the ``finetune`` extra): after the
    layer-wise distillation, train the factorized layers end to end against the original model
    for that many Adam steps (``finetune_lr``) on the calibration set; see
    `initialization.finetune`. The report's ``calibration.finetune`` says what it did.

    ``tune`` (`tuning.TuneOptions`): autotune the factorized and the original model's kernels for
    the target (locally, or on devices behind an RPC tracker) into ``tune.records``, then keep
    the original conv of every layer whose tuned DW+PW pair is not faster on the device
    (``slower_than_original_on_device``). ``tuning_records``: apply (and gate with) records of
    an earlier tuning run without tuning. The report's ``tuning`` and per-layer latencies say
    what was measured.

    ``precision="fp16"`` (``--precision fp16``; ARMv8.2 targets only, refused elsewhere): the
    library computes in float16 inside, float32 at its interface (`compile.precision`); it is
    verified against the float32 model within `compile.precision.FP16_TOLERANCE`, and the
    report's ``precision`` has its error and arg-max agreement on the calibration data.

    ``factorize_convs=False`` (``--no-factorize``): compile the model as given (one factorized
    earlier, a hand-written MobileNet) with our schedules, tuning and verification; no rank
    option may be given, ``calibration`` only adds verification inputs, and every conv is in
    the report as ``factorization_off`` (or its structural reason).

    Raises `DwsepError` (one-line message) for bad input, `verify.VerificationFailed` (exit 1)
    for a library that computes something else, `NoEligibleConvs` after writing the unchanged
    model when nothing could be rewritten.
    """
    log = log or (lambda message: None)
    preset = target if isinstance(target, TargetPreset) else resolve_target(target)
    options = FactorizeOptions(rank=rank, energy=energy, macs_ratio=macs_ratio,
                               max_error=max_error, calibration=calibration,
                               ignored_scope=ignored_scope, force=force, input_shapes=input_shapes,
                               teacher=teacher, fit=fit, sensitivity=sensitivity,
                               finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                               factorize=factorize_convs)
    build = BuildOptions(compile=compile, cross_compiler=cross_compiler, verify=verify,
                         tune=tune, tuning_records=tuning_records, precision=precision)
    options.policy()
    dtype = check_precision(precision, preset)
    if build.tuned:
        from dwsep_compiler import tuning as tuning_stage

        tuning_stage.check(tune, tuning_records, preset)
    path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    output_dir = os.path.abspath(output_dir or default_output_dir(path or "model"))
    _check_output_dir(output_dir, path)
    for stale in interrupt.remove_stale(os.path.dirname(output_dir)):
        log(f"removed {stale}: left by an earlier run that was killed")

    stage = _factorize_stage(model, options, log)
    records = tuning = mod = None
    if build.tuned and (any(layer.factorized for layer in stage.result.layers)
                        or not factorize_convs):
        records, tuning, mod = _tune_and_gate(stage, preset, build, log)
    report = stage.report(preset.name)
    report.device = "opencl" if preset.is_gpu else "cpu"
    if tuning is not None:
        report.tuning = tuning
    if dtype != "float32":
        report.precision = {"precision": precision, "dtype": dtype}
    nothing = factorize_convs and not report.factorized_layers
    library = _write_outputs(stage, report, preset, build, output_dir, records, mod,
                             compiled=build.compile and not nothing, log=log)
    out = CompileResult(output_dir, os.path.join(output_dir, MODEL_NAME), report, library)
    if nothing:
        reasons = sorted({layer.reason for layer in report.layers})
        raise NoEligibleConvs(
            f"no eligible convolutions ({len(report.layers)} convs, skipped: "
            f"{', '.join(reasons)}); wrote the unchanged model to {out.model_path}")
    return out


def _write_outputs(stage: _Stage, report: Report, preset: TargetPreset, build: BuildOptions,
                   output_dir: str, records, mod, compiled: bool, log) -> tvm_compile.Library | None:
    """Save the model, build, export and verify the library (``compiled``), write the report:
    all in a staging directory that replaces ``output_dir`` only once complete. Returns the
    library as it is in ``output_dir``."""
    result = stage.result
    staging = tempfile.mkdtemp(prefix=".dwsep-", dir=os.path.dirname(output_dir))
    interrupt.mark_temporary(staging)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        model_out = os.path.join(staging, MODEL_NAME)
        save_model(result.model, model_out)
        quantized = bool(_quantized_ops(result.model))
        reference = _load_in_onnxruntime(model_out, quantized=quantized)
        library = None
        if compiled:
            log(f"compiling for {preset.name} with TVM ...")
            if mod is None:
                mod = tvm_compile.import_onnx(result.model, stage.shapes, build.dtype)
            executable = tvm_compile.build(mod, preset, records=records)
            library = tvm_compile.export_library(executable, preset, staging,
                                                 build.cross_compiler)
            report.artifacts["library"] = os.path.join(output_dir, os.path.basename(library.path))
            if library.note:
                report.notes.append(library.note)
            if build.verify:
                log("verifying the library against onnxruntime ...")
                report.verification = verification.verify(
                    executable, library.path if library.linked else None, preset, reference,
                    result.model, stage.shapes, stage.calib,
                    tolerance=_tolerance(quantized, build.precision))
                if report.precision is not None:
                    report.precision.update(_precision_cost(report.verification))
        report.artifacts["model"] = os.path.join(output_dir, MODEL_NAME)
        report.artifacts["report"] = os.path.join(output_dir, REPORT_NAME)
        with open(os.path.join(staging, REPORT_NAME), "w") as handle:
            handle.write(report.to_json())
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        interrupt.release(staging)
        raise
    if library is None:
        return None
    return tvm_compile.Library(os.path.join(output_dir, os.path.basename(library.path)),
                               library.linked, library.note)


def _tune_and_gate(stage: _Stage, preset: TargetPreset, build: BuildOptions, log):
    """Tune (``build.tune``) or read records (``build.tuning_records``), then measure each
    factorized layer against its original conv and keep the original where DW+PW is not faster
    (with the factorization off: only the model as given is tuned, nothing is gated).

    Returns ``(records, report info, the Relax module to build or None)``; sets each layer's
    latencies; ``stage.result`` is the rewrite with the gated layers kept."""
    from dwsep_compiler import tuning as tuning_stage

    # OpenCL: the original convs are dlight's, untuned (no rule of ours to tune them), so
    # there is no fair latency to gate against: only the factorized model is tuned
    gate = stage.init.options.factorize and not preset.is_gpu
    result, shapes = stage.result, stage.shapes
    factorized = tvm_compile.import_onnx(result.model, shapes, build.dtype)
    original = tvm_compile.import_onnx(stage.model, shapes, build.dtype) if gate else None
    info: dict = {}
    if build.tune is not None:
        summary = tuning_stage.tune_module([factorized, original] if gate else [factorized],
                                           preset, build.tune, log=log)
        info = summary.as_dict()
        records = tuning_stage.TuningRecords(build.tune.records)
    else:
        records = tuning_stage.TuningRecords(build.tuning_records, create=False)
    info["records"] = os.path.abspath(records.directory)
    if preset.is_gpu and stage.init.options.factorize:
        info["gating"] = ("not gated: on OpenCL the original convs are scheduled by TVM's "
                          "dlight rules, which tuning does not search")
    slower = (tuning_stage.gating.gate(original, factorized, result, shapes,
                                       preset.tvm_target(), records) if gate else set())
    info["gated_layers"] = sorted(slower)
    if not slower:
        return records, info, factorized
    log(f"keeping the original conv of {len(slower)} layer(s) the device runs faster "
        f"than DW+PW: {', '.join(sorted(slower))}")
    kept = {layer.name: (layer.rank if layer.factorized and layer.name not in slower
                         else KEEP_ORIGINAL) for layer in result.layers}
    latencies = {layer.name: (layer.latency_ms, layer.original_latency_ms)
                 for layer in result.layers}
    stage.result = stage.init.factorize(kept)
    tuning_stage.gating.mark_kept(stage.result.layers, slower, latencies)
    return records, info, None


def _tolerance(quantized: bool, precision: str) -> float:
    """How far the library may be from onnxruntime's float32 run of the same model."""
    tolerances = [verification.TOLERANCE]
    if quantized:
        tolerances.append(verification.QUANTIZED_TOLERANCE)
    if precision == "fp16":
        tolerances.append(FP16_TOLERANCE)
    return max(tolerances)


def _precision_cost(verified: dict) -> dict:
    """What --precision fp16 costs, from the verification's run against the float32 model:
    the largest relative error on the calibration inputs, and how often the arg-max of each
    class-score output agrees."""
    if not verified.get("ran"):
        return {"calibration": None, "note": "not measured: the library was not run here ("
                                              f"{verified.get('skipped')})"}
    return {"calibration": verified.get("calibration")}


def _check_output_dir(output_dir: str, model_path: str | None) -> None:
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise DwsepError(f"output path exists and is not a directory: {output_dir}")
        if os.listdir(output_dir) and not os.path.exists(os.path.join(output_dir, REPORT_NAME)):
            raise DwsepError(
                f"output directory {output_dir} exists and is not a dwsep-compile output: "
                "choose another -o")
    if model_path is not None and os.path.commonpath([os.path.abspath(model_path),
                                                      output_dir]) == output_dir:
        raise DwsepError(f"output directory {output_dir} contains the input model: choose another -o")
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        raise DwsepError(f"parent of the output directory does not exist: {parent}")


def _replace_dir(staging: str, output_dir: str) -> None:
    """Move the finished ``staging`` dir to ``output_dir``, replacing an earlier output. The
    staging marker goes first (an interrupt meanwhile still removes ``staging``); the earlier
    output, moved aside, is marked so a run killed here leaves nothing a later run keeps."""
    os.remove(os.path.join(staging, interrupt.MARKER))
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(prefix=".dwsep-old-", dir=os.path.dirname(output_dir))
        os.rmdir(old)
        os.rename(output_dir, old)
        interrupt.mark_temporary(old)
        os.rename(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
        interrupt.release(old)
    else:
        os.rename(staging, output_dir)
    interrupt.release(staging)


def _session(path_or_model, unfused: bool = False) -> ort.InferenceSession:
    """``unfused``: no graph optimizations, so that a QDQ model runs as its graph says (float
    ops between quantize/dequantize, as TVM imports it) instead of onnxruntime's int8 kernels,
    which round differently (25% apart from the QDQ graph on an NNCF-quantized example)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if unfused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _load_in_onnxruntime(path: str, quantized: bool = False) -> ort.InferenceSession:
    """The written model's onnxruntime session (proves it loads; the verification reuses it,
    so a ``quantized`` model runs unfused: see `_session`)."""
    try:
        return _session(path, unfused=quantized)
    except Exception as exc:
        raise DwsepError(f"onnxruntime cannot load the rewritten model: "
                         f"{first_line(exc)}") from None
