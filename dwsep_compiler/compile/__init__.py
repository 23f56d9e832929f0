"""Compile: import an ONNX model into TVM Relax, build it for a target, export the library.

The exported library is what a device runs with the TVM runtime alone (no compiler):
``tvm.runtime.load_module(path)`` then ``tvm.runtime.vm.VirtualMachine(lib, dev)["main"]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend import onnx as rx_onnx

from dwsep_compiler.compile import cpu as cpu_build
from dwsep_compiler.compile.precision import to_precision
from dwsep_compiler.errors import DwsepError, first_line
from dwsep_compiler.targets import TargetPreset, find_cross_compiler


def import_onnx(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                dtype: str = "float32") -> tvm.IRModule:
    """The Relax module of ``model`` with concrete input shapes (weights as constants),
    computing in ``dtype`` inside (float16: `precision.to_precision`)."""
    try:
        mod = rx_onnx.from_onnx(model, shape_dict={k: list(v) for k, v in input_shapes.items()},
                                keep_params_in_input=False)
    except Exception as exc:
        raise DwsepError(f"TVM cannot import the model: {first_line(exc)}") from None
    return to_precision(mod, dtype)


def build(mod: tvm.IRModule, preset: TargetPreset, schedule: bool = True,
          fuse: bool | str = True, records=None) -> relax.Executable:
    """``tvm.compile`` for the preset's target; CPU targets get our schedule rules
    (``schedule=False``: TVM's default pipeline, which leaves CPU loops unscheduled) and fused
    depthwise+pointwise kernels where they pay (``fuse="always"``: every pair; False: none).
    ``records`` (`dwsep_compiler.tuning.TuningRecords`): tuned schedules to apply where the
    records hold one for this target."""
    if preset.is_gpu:
        return _build_gpu(mod, preset, records)
    target = preset.tvm_target()
    try:
        if schedule and target.kind.name == "llvm":
            with tvm.transform.PassContext(opt_level=3, config=cpu_build.PASS_CONFIG):
                return tvm.compile(mod, target=target,
                                   relax_pipeline=cpu_build.relax_pipeline(target, fuse, records),
                                   tir_pipeline=cpu_build.TIR_PIPELINE)
        return tvm.compile(mod, target=target)
    except Exception as exc:
        raise DwsepError(f"TVM failed to build for target '{preset.name}': {first_line(exc)}") from None


# --- GPU (OpenCL) path: owned by dwsep_compiler/compile/opencl.py --------------------------------------
def _build_gpu(mod: tvm.IRModule, preset: TargetPreset, records=None) -> relax.Executable:
    """Build with TVM's default GPU pipeline (dlight schedules), then check every kernel's
    work-group size and local memory against the preset's ``gpu_limits`` (a phone's, not the
    build machine's): `opencl.GpuLimitError` (a one-line `DwsepError`) when one does not fit.
    ``opencl.gpu_kernels(executable)`` lists the kernels afterwards."""
    from dwsep_compiler.compile import opencl

    try:
        executable, _ = opencl.build(mod, preset, opencl.target_limits(preset), preset.name,
                                     records)
    except DwsepError:
        raise
    except Exception as exc:
        raise DwsepError(f"TVM failed to build for target '{preset.name}': {first_line(exc)}") from None
    return executable


@dataclass
class Library:
    path: str  # model.so, or model.tar when it could not be linked here
    linked: bool
    note: str | None = None  # what the user must do with it, when not linked


def export_library(executable: relax.Executable, preset: TargetPreset, directory: str,
                   cross_compiler: str | None = None) -> Library:
    """Write the deployable library into ``directory``.

    Host targets link ``model.so`` with the system compiler. aarch64-hosted targets link with the
    cross compiler when one is found (``cross_compiler`` or ``aarch64-linux-gnu-g++``); otherwise
    the object files go into ``model.tar`` to be linked on the device.
    """
    if not preset.cross_compiled:
        path = os.path.join(directory, "model.so")
        executable.export_library(path)
        return Library(path, linked=True)
    from tvm.support import cc

    command = find_cross_compiler(cross_compiler)
    if command is None and cross_compiler:
        raise DwsepError(f"cross compiler not found: {cross_compiler}")
    if command is not None:
        path = os.path.join(directory, "model.so")
        program, *options = command.split()
        try:
            executable.export_library(path, fcompile=cc.cross_compiler(program, options=options))
        except Exception as exc:
            raise DwsepError(f"linking with {command} failed: {first_line(exc)}") from None
        return Library(path, linked=True)
    path = os.path.join(directory, "model.tar")
    executable.export_library(path)
    note = ("no aarch64 cross compiler here (apt-get install g++-aarch64-linux-gnu, or pass "
            "--cross-compiler): link on the device with "
            "`mkdir m && tar -xf model.tar -C m && g++ -shared -fPIC -o model.so m/*.o`")
    return Library(path, linked=False, note=note)


def run_executable(executable_or_path, inputs: list[np.ndarray], device=None) -> list[np.ndarray]:
    """Run a host-built library (or executable) here; outputs as numpy. ``device``: where the
    Relax VM runs it (default this machine's CPU; ``device.opencl_runtime.opencl_device()``
    for an OpenCL library, loaded from its file: an in-memory OpenCL executable cannot launch)."""
    device = device if device is not None else tvm.cpu()
    module = (tvm.runtime.load_module(os.fspath(executable_or_path))
              if isinstance(executable_or_path, (str, os.PathLike)) else executable_or_path)
    vm = relax.VirtualMachine(module, device)
    result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x), device) for x in inputs])
    return _flatten(result)


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out
