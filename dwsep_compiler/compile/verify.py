"""Verification: the built library against onnxruntime on the same inputs, wherever it can run.

A library that computes something else than the model it was built from must not ship, so a
mismatch fails the build (`VerificationFailed`, exit 1) instead of being printed and forgotten.
Where it runs: host builds in this process; aarch64 CPU builds under qemu-user on the preset's
core when the emulation root exists (``python -m dwsep_compiler.device.emulate --prepare``; it is never
built implicitly); OpenCL builds in the Relax VM on the local OpenCL device (PoCL here) through
our OpenCL runtime (`device.opencl_runtime`) when there is one. The report's ``verification`` says what ran, on which inputs, or why nothing
could run.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from dwsep_compiler.errors import DwsepError, first_line
from dwsep_compiler.model import graph_inputs
from dwsep_compiler.targets import TargetPreset

# fp32: the largest absolute difference over the output's largest magnitude. Reordered sums
# (vectorized, tiled, folded batch norms) stay near 1e-6; a wrong channel or tap is O(1).
TOLERANCE = 1e-4
# A QDQ model: float rounding differences move a value across a quantization boundary now and
# then, and one step of an 8-bit quantizer is ~1/256 of its range (9e-4 seen on the Fashion
# example quantized by NNCF; 1e-4 would fail such builds at random).
QUANTIZED_TOLERANCE = 1e-2
RANDOM_INPUTS = 3
CALIBRATION_INPUTS = 8


class VerificationFailed(DwsepError):
    """The library's outputs differ from onnxruntime's beyond the tolerance (exit code 1)."""

    exit_code = 1


def verification_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                        calibration=None) -> list[tuple[str, list[np.ndarray]]]:
    """``(label, inputs in graph order)``: `RANDOM_INPUTS` standard normal samples (seeds 0, 1,
    ...), then up to `CALIBRATION_INPUTS` batches of the calibration set."""
    values = graph_inputs(model)
    samples = []
    for seed in range(RANDOM_INPUTS):
        rng = np.random.default_rng(seed)
        arrays = []
        for value in values:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            shape = shapes[value.name]
            arrays.append(rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                          else np.zeros(shape, dtype))
        samples.append((f"standard normal, seed {seed}", arrays))
    if calibration is not None:
        batch = shapes[values[0].name][0] if values else 1
        for k, feed in enumerate(calibration.feeds(batch)):
            if len(samples) >= RANDOM_INPUTS + CALIBRATION_INPUTS:
                break
            if all(feed[v.name].shape == tuple(shapes[v.name]) for v in values):
                samples.append((f"calibration batch {k}", [feed[v.name] for v in values]))
    return samples


def verify(executable, library_path: str | None, preset: TargetPreset,
           reference: ort.InferenceSession, model: onnx.ModelProto,
           shapes: dict[str, tuple[int, ...]], calibration=None,
           tolerance: float = TOLERANCE) -> dict:
    """Run the library where it can run and compare every output with onnxruntime's on
    ``model``. Returns the report's ``verification``; raises `VerificationFailed` above
    ``tolerance``."""
    samples = verification_inputs(model, shapes, calibration)
    runner, where = _runner(executable, library_path, preset)
    info = {"reference": "onnxruntime on model.onnx", "tolerance": tolerance}
    if runner is None:
        return {**info, "ran": None, "skipped": where}
    names = [v.name for v in graph_inputs(model)]
    outputs = [o.name for o in model.graph.output]
    expected = [reference.run(None, dict(zip(names, inputs))) for _, inputs in samples]
    try:
        actual = runner([inputs for _, inputs in samples])
    except DwsepError:
        raise
    except Exception as exc:  # TVM's runtime: a kernel that does not build or launch there
        raise VerificationFailed(f"verification failed on {where}: the library did not run: "
                                 f"{first_line(exc)}") from None
    worst = (0.0, outputs[0] if outputs else "", samples[0][0])
    for (label, _), got, want in zip(samples, actual, expected):
        if len(got) != len(want):
            raise VerificationFailed(f"verification failed on {where}: the library returns "
                                     f"{len(got)} outputs, onnxruntime {len(want)}")
        for name, a, e in zip(outputs, got, want):
            error = relative_error(a, e)
            if not error <= worst[0]:  # NaN counts as the worst
                worst = (error, name, label)
    info.update({"ran": where, "inputs": [label for label, _ in samples],
                 "max_rel_error": worst[0], "worst_output": worst[1]})
    on_data = [(got, want) for (label, _), got, want in zip(samples, actual, expected)
               if label.startswith("calibration")]
    if on_data:
        info["calibration"] = calibration_agreement(on_data, outputs)
    if not worst[0] <= tolerance:
        raise VerificationFailed(
            f"verification failed on {where}: output '{worst[1]}' differs from onnxruntime by "
            f"{worst[0]:.2e} (relative, tolerance {tolerance:.0e}) on the {worst[2]} input; "
            "nothing was written (--no-verify skips this check)")
    return info


def calibration_agreement(pairs, outputs: list[str]) -> dict:
    """The library against onnxruntime on real inputs: the largest relative error, and for each
    output holding class scores (2-D, one row per sample) how often the arg-max agrees (what
    a lower precision costs a classifier)."""
    stats = {"batches": len(pairs), "max_rel_error": max(
        (relative_error(a, e) for got, want in pairs for a, e in zip(got, want)), default=0.0)}
    agreement = {}
    for index, name in enumerate(outputs):
        rows = [(np.asarray(got[index]), np.asarray(want[index])) for got, want in pairs]
        if all(e.ndim == 2 and e.shape[1] > 1 and a.shape == e.shape for a, e in rows):
            same = sum(int(np.sum(a.argmax(1) == e.argmax(1))) for a, e in rows)
            agreement[name] = same / sum(e.shape[0] for _, e in rows)
    if agreement:
        stats["argmax_agreement"] = agreement
    return stats


def relative_error(actual, expected) -> float:
    """Largest absolute difference over the expected tensor's largest magnitude."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if actual.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def _runner(executable, library_path, preset: TargetPreset):
    """``(run(samples) -> outputs per sample, where)``, or ``(None, why not)``."""
    if preset.is_gpu:
        return _opencl_runner(executable, library_path, preset)
    if preset.host_arch == "host":
        from dwsep_compiler.compile import run_executable

        return (lambda samples: [run_executable(executable, inputs) for inputs in samples]), \
            "this machine's CPU"
    from dwsep_compiler.device import aarch64_root, emulate, qemu

    if library_path is None or not library_path.endswith(".so"):
        return None, "the aarch64 library is not linked here (no cross compiler)"
    runtime = aarch64_root.find_aarch64_runtime()
    if runtime is None:
        return None, ("no aarch64 emulation root (python -m dwsep_compiler.device.emulate --prepare "
                      "sets one up)")
    qemu_cpu = preset.qemu_cpu or qemu.DEFAULT_QEMU_CPU
    try:
        qemu.find_qemu()
    except DwsepError as exc:
        return None, first_line(exc)

    def on_qemu(samples):
        return emulate.run_aarch64_samples(library_path, samples, qemu_cpu, runtime)

    return on_qemu, f"qemu-aarch64 ({qemu_cpu})"


def _opencl_runner(executable, library_path, preset: TargetPreset):
    """The library in the Relax VM on the local OpenCL device, through our OpenCL runtime.

    A library whose host code is this machine's runs as written (``model.so``); one whose host is
    a phone's CPU runs its OpenCL kernels with host code built for this machine
    (`opencl.build_for_this_host`: the device source is checked to be byte-identical)."""
    import tempfile

    import tvm

    from dwsep_compiler.compile import opencl, run_executable
    from dwsep_compiler.device import opencl_runtime

    try:
        device = opencl_runtime.opencl_device()
    except DwsepError as exc:
        return None, f"no local OpenCL device ({first_line(exc)})"
    name = device.device_name.strip()

    def run(path, samples):  # loaded once: the driver builds the kernels once, not per sample
        module = tvm.runtime.load_module(path)
        return [run_executable(module, inputs, device) for inputs in samples]

    if preset.host_arch == "host" and library_path and library_path.endswith(".so"):
        return (lambda samples: run(library_path, samples)), f"OpenCL device {name}"

    def on_twin(samples):
        with tempfile.TemporaryDirectory(prefix="dwsep-opencl-") as tmp:
            path = os.path.join(tmp, "model.so")
            opencl.build_for_this_host(executable).export_library(path)
            return run(path, samples)

    return on_twin, f"OpenCL device {name} (the library's kernels, host code for this machine)"
