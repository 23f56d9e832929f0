"""Run a compiled library on a device through TVM RPC (what ``tvmc run --rpc-tracker`` did), or
on this machine: ``dwsep-run`` is a thin shell over `run_library`.

    from dwsep_compiler.device.remote import run_library
    result = run_library("model.dwsep", tracker="10.0.0.5:9190", key="rk3399", repeat=20)
    print(result.summary())

The library is what ``dwsep-compile`` wrote (``model.so``; an output directory names it). Next to
it, ``model.onnx`` gives the input names, dtypes and output names; the shapes come from the
library itself (the checks its ``main`` function makes on its arguments), so an input size fixed
with ``--input-shape`` at compile time is honoured. Over RPC (`tracker`): connect to the tracker, wait (at
most ``session_timeout`` seconds) for a session with a server registered under ``key``, upload
the library, load it there, run ``main`` once through the Relax VM on the remote device, copy the
outputs back, then time ``repeat`` more runs with the VM's ``time_evaluator`` (median).

Every failure the user can act on is a `RemoteError` (a `DwsepError`, one line): unreachable
tracker, no server under the key within the timeout, a server that dies or drops the connection
mid-run, inputs with wrong names, shapes or dtypes, a library built for another CPU.
"""

from __future__ import annotations

import json
import os
import platform
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dwsep_compiler.device.tracker import (DEFAULT_SESSION_TIMEOUT_S, RemoteError, request_session)
from dwsep_compiler.errors import DwsepError, first_line

LIBRARY_NAME = "model.so"
MODEL_NAME = "model.onnx"
REPORT_NAME = "report.json"
DEFAULT_REPEAT = 10
DEVICES = ("cpu", "opencl")

#: ELF e_machine values -> the architecture names `platform.machine()` uses.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 3: "i686", 243: "riscv64"}


@dataclass
class InputSpec:
    """One input of the library's ``main``: a None dim is one nobody could tell."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str = "float32"

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d)
                                                         for d in self.shape)
        return f"{self.name} {self.dtype}[{dims}]"


@dataclass
class Artifact:
    """A compiled library and what its neighbours (model.onnx, report.json) tell about it."""

    library: str
    arch: str | None  # from the ELF header: x86_64, aarch64, ...
    inputs: list[InputSpec] | None = None  # from model.onnx (shapes possibly symbolic)
    output_names: list[str] | None = None
    target: str | None = None  # the report's target preset name
    precision: str = "fp32"  # the report's precision (fp16: --precision fp16)
    device: str | None = None  # the report's: "opencl" for a GPU build, "cpu"


@dataclass
class RunResult:
    library: str
    outputs: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    median_s: float | None
    repeat: int
    where: str  # "127.0.0.1:9091 (key k)" or "this machine"
    device: str
    random_inputs: bool
    timings_s: list[float] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"ran {self.library} on {self.where}, device {self.device}"]
        source = "random (standard normal)" if self.random_inputs else "from --inputs"
        for name, value in self.inputs.items():
            lines.append(f"input  {name}: {value.dtype}{list(value.shape)} {source}")
        for name, value in self.outputs.items():
            lines.append(f"output {name}: {_describe_array(value)}")
        if self.median_s is not None:
            lines.append(f"median latency: {self.median_s * 1e3:.3f} ms over {self.repeat} runs")
        return "\n".join(lines)


def _describe_array(value: np.ndarray) -> str:
    text = f"{value.dtype}{list(value.shape)}"
    if value.size and (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
        data = value.astype(np.float64)
        text += f"  min {data.min():.6g}  max {data.max():.6g}  mean {data.mean():.6g}"
    return text


# ---------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------


def elf_arch(path: str) -> str | None:
    """Architecture of an ELF shared library (`x86_64`, `aarch64`, ...), None if not ELF."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
    except OSError:
        return None
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    order = "<" if header[5] == 1 else ">"
    (machine,) = struct.unpack(order + "H", header[18:20])
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def find_artifact(path: str | os.PathLike[str]) -> Artifact:
    """The library at `path` (a ``dwsep-compile`` output directory or the library file) and the
    input/output description of the ``model.onnx`` next to it, when there is one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        library = os.path.join(path, LIBRARY_NAME)
        if not os.path.isfile(library):
            if os.path.isfile(os.path.join(path, "model.tar")):
                raise RemoteError(
                    f"{path} holds model.tar, not a linked {LIBRARY_NAME}: link it first (see "
                    f"the note in {REPORT_NAME}), or recompile with an aarch64 cross compiler")
            raise RemoteError(f"no {LIBRARY_NAME} in {path} (not a dwsep-compile output?)")
    elif os.path.isfile(path):
        library = path
    else:
        raise RemoteError(f"library or output directory not found: {path}")
    library = os.path.abspath(library)
    arch = elf_arch(library)
    if arch is None:
        raise RemoteError(f"not a shared library (no ELF header): {library}")
    artifact = Artifact(library=library, arch=arch)
    directory = os.path.dirname(library)
    report_path = os.path.join(directory, REPORT_NAME)
    if os.path.isfile(report_path):
        try:
            with open(report_path) as handle:
                report = json.load(handle)
            artifact.target = report.get("target")
            artifact.device = report.get("device")
            artifact.precision = (report.get("precision") or {}).get("precision", "fp32")
            shapes = report.get("input_shapes")  # written by newer dwsep-compile versions
        except (OSError, ValueError, AttributeError):
            shapes = None
    else:
        shapes = None
    model_path = os.path.join(directory, MODEL_NAME)
    if os.path.isfile(model_path):
        artifact.inputs, artifact.output_names = _model_io(model_path)
        if isinstance(shapes, dict):
            for spec in artifact.inputs:
                if isinstance(shapes.get(spec.name), list):
                    spec.shape = tuple(int(d) for d in shapes[spec.name])
    return artifact


def _model_io(path: str) -> tuple[list[InputSpec], list[str]]:
    import onnx

    from dwsep_compiler.model import graph_inputs

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:
        raise RemoteError(f"cannot read {path} (not an ONNX model?)") from None
    specs = []
    for value in graph_inputs(model):
        ttype = value.type.tensor_type
        dtype = "float32"
        if ttype.elem_type:
            dtype = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)))
        shape = None
        if ttype.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in ttype.shape.dim)
        specs.append(InputSpec(value.name, shape, dtype))
    return specs, [o.name for o in model.graph.output]


_MATCH_SHAPE = re.compile(r"call\s+vm\.builtin\.match_shape\s+in:\s*%(\d+),\s*[^,]+,\s*i(\d+),"
                          r"(.*?)\s+dst:")


def executable_shapes(text: str, function: str = "main") -> dict[int, tuple[int | None, ...]]:
    """Argument shapes that a Relax VM function checks, from the executable's ``as_text()``:
    {register (= parameter index): shape}, a None dim where the function takes any size.

    Each tensor parameter is checked by ``vm.builtin.match_shape in: %reg, %heap, i<ndim>,
    (i<code>, i<value>) * ndim, c[err]``, code 0 asserting that the dim equals the value."""
    body = re.search(rf"^@{re.escape(function)}:\n(.*?)(?:\n\s*\n|\Z)", text, re.S | re.M)
    shapes: dict[int, tuple[int | None, ...]] = {}
    if body is None:
        return shapes
    for match in _MATCH_SHAPE.finditer(body.group(1)):
        register, ndim = int(match.group(1)), int(match.group(2))
        if register in shapes:
            continue
        items = re.findall(r"i(-?\d+)", match.group(3))
        if len(items) < 2 * ndim:
            continue
        dims = []
        for axis in range(ndim):
            code, value = int(items[2 * axis]), int(items[2 * axis + 1])
            dims.append(value if code == 0 else None)
        shapes[register] = tuple(dims)
    return shapes


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def load_inputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of an .npz (keyed by input name), or a `RemoteError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RemoteError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a .npy, not an .npz")
            return {key: data[key] for key in data.files}
    except Exception as exc:
        raise RemoteError(f"cannot read inputs {path}: expected an .npz keyed by input name "
                          f"({first_line(exc, last=True)})") from None


def _check_inputs(arrays: Mapping[str, np.ndarray], specs: list[InputSpec]) -> None:
    names = [spec.name for spec in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise RemoteError(f"--inputs does not match the model's inputs ({'; '.join(parts)}); "
                          f"expected {', '.join(s.describe() for s in specs)}")
    for spec in specs:
        value = arrays[spec.name]
        if str(value.dtype) != spec.dtype:
            raise RemoteError(f"input '{spec.name}' is {value.dtype}{list(value.shape)}, "
                              f"expected {spec.describe()}")
        if spec.shape is not None and (
                len(value.shape) != len(spec.shape)
                or any(d is not None and d != v for d, v in zip(spec.shape, value.shape))):
            raise RemoteError(f"input '{spec.name}' has shape {list(value.shape)}, "
                              f"expected {spec.describe()}")


def random_inputs(specs: list[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal floats (small integers for integer inputs) of the specs' shapes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        if spec.shape is None or any(d is None for d in spec.shape):
            raise RemoteError(f"cannot tell the shape of input {spec.describe()}: pass --inputs "
                              "FILE.npz")
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, spec.shape).astype(bool)
        else:
            arrays[spec.name] = rng.integers(0, 10, spec.shape).astype(dtype)
    return arrays


def _merge_specs(artifact: Artifact, names: list[str],
                 exec_shapes: dict[int, tuple[int | None, ...]]) -> list[InputSpec]:
    """The inputs of ``main`` in call order: names and dtypes from model.onnx (else the VM's
    parameter names, float32), shapes from the executable, filled in from model.onnx."""
    onnx_specs = {spec.name: spec for spec in artifact.inputs or []}
    if artifact.inputs is not None and len(artifact.inputs) != len(names):
        raise RemoteError(f"the library's main takes {len(names)} inputs but {MODEL_NAME} next "
                          f"to it has {len(artifact.inputs)}: not the same model")
    if artifact.inputs is not None and sorted(names) != sorted(onnx_specs):
        names = [spec.name for spec in artifact.inputs]  # the importer renamed: ONNX order holds
    specs = []
    for index, name in enumerate(names):
        base = onnx_specs.get(name, InputSpec(name, None))
        shape = exec_shapes.get(index)
        if shape is not None and base.shape is not None and len(shape) == len(base.shape):
            shape = tuple(e if e is not None else b for e, b in zip(shape, base.shape))
        elif shape is None:
            shape = base.shape
            if shape is not None and shape and shape[0] is None:  # symbolic batch: 1, as compiled
                shape = (1, *shape[1:])
        specs.append(InputSpec(name, shape, base.dtype))
    return specs


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


#: How TVM words a lost session: the server process died ("code=kShutdown": the client saw the
#: socket close mid-call), the connection broke, or the server's session timeout fired.
_CONNECTION_LOST = re.compile(r"kShutdown|socket|connection|closed|broken pipe|reset|"
                              r"RPCSessionTimeoutError|peer", re.I)


class _Stage:
    """Names the step in progress, so that a TVM error becomes one line saying where."""

    def __init__(self, where: str, remote: bool) -> None:
        self.where = where
        self.remote = remote
        self.step = "starting"

    def __call__(self, step: str) -> _Stage:
        self.step = step
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (DwsepError, KeyboardInterrupt, SystemExit)):
            return False
        detail = first_line(exc, last=True)
        if "kShutdown" in detail:  # "Check failed: (code == RPCCode::kReturn) ...": say it plainly
            detail = "the connection closed in the middle of a call"
        if self.remote and _CONNECTION_LOST.search(detail):
            raise RemoteError(f"the RPC server at {self.where} dropped the connection while "
                              f"{self.step} (did it die?): {detail}") from None
        raise RemoteError(f"{self.step} failed on {self.where}: {detail}") from None


def run_library(
    path: str | os.PathLike[str],
    tracker: str | tuple[str, int] | None = None,
    key: str | None = None,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    repeat: int = DEFAULT_REPEAT,
    device: str | None = None,
    session_timeout: float = DEFAULT_SESSION_TIMEOUT_S,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the library at `path` (an output directory or the .so) on the RPC server the
    `tracker` grants for `key`; with `tracker=None`, on this machine (host libraries only).

    `inputs`: arrays keyed by input name, an .npz path, or None for random inputs of the
    library's shapes (`seed`). `device`: "cpu" or "opencl" (default: opencl for GPU builds,
    else cpu; here, OpenCL runs through `opencl_runtime`, on a server through the runtime it
    loaded: ``rpc_server.py --load-library libdwsep_opencl.so``). `repeat`: timed runs after the first (0: none). Returns the outputs (keyed
    by the ONNX output names when model.onnx is next to the library) and the median latency."""
    log = log or (lambda message: None)
    if repeat < 0:
        raise RemoteError(f"repeat must be >= 0, not {repeat}")
    artifact = find_artifact(path)
    device = device or artifact.device or (
        "opencl" if artifact.target in ("mali", "adreno") else "cpu")
    if device not in DEVICES:
        raise RemoteError(f"unknown device '{device}' (one of {', '.join(DEVICES)})")
    arrays = load_inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else (
        None if inputs is None else {k: np.asarray(v) for k, v in inputs.items()})
    if arrays is not None and artifact.inputs is not None:
        _check_inputs(arrays, artifact.inputs)  # names, dtypes, static dims: before connecting
    remote = tracker is not None
    if remote:
        if not key:
            raise RemoteError("an RPC run needs a key (--rpc-key)")
        log(f"requesting a session for key '{key}' ...")
        session, where = request_session(tracker, key, session_timeout)
    else:
        machine = _normalize_arch(platform.machine())
        if artifact.arch != machine:
            raise RemoteError(f"{artifact.library} is an {artifact.arch} library and this machine "
                              f"is {machine}: run it on a device (--rpc-tracker, --rpc-key)")
        session, where = None, "this machine"
    stage = _Stage(where, remote)
    import tvm
    import tvm.runtime.vm

    with stage(f"uploading {os.path.basename(artifact.library)}"):
        if remote:
            log(f"uploading {artifact.library} to {where} ...")
            session.upload(artifact.library, LIBRARY_NAME)
    if device == "opencl" and not remote:
        from dwsep_compiler.device import opencl_runtime

        opencl_runtime.load_runtime()  # TVM's wheel has no OpenCL runtime: ours
    with stage(f"loading {LIBRARY_NAME}"):
        try:
            lib = (session.load_module(LIBRARY_NAME) if remote
                   else tvm.runtime.load_module(artifact.library))
        except Exception as exc:
            if remote and not _CONNECTION_LOST.search(first_line(exc, last=True)):
                raise RemoteError(f"the RPC server at {where} cannot load {LIBRARY_NAME} (an "
                                  f"{artifact.arch} library: does the server run on "
                                  f"{artifact.arch}?): {first_line(exc, last=True)}") from None
            raise
    with stage(f"opening the {device} device"):
        dev = (session.cpu() if device == "cpu" else session.cl()) if remote else (
            tvm.cpu() if device == "cpu" else tvm.opencl())
        if not dev.exist:
            raise RemoteError(f"{where} has no {device} device (its TVM runtime lacks "
                              f"{'OpenCL' if device == 'opencl' else device} or a driver)")
    with stage("starting the Relax VM"):
        vm = tvm.runtime.vm.VirtualMachine(lib, dev)
        arity = int(vm.module["get_function_arity"]("main"))
        names = [str(vm.module["get_function_param_name"]("main", i)) for i in range(arity)]
        try:
            exec_shapes = executable_shapes(str(lib["as_text"]()))
        except Exception:  # an older runtime without as_text: model.onnx shapes only
            exec_shapes = {}
    specs = _merge_specs(artifact, names, exec_shapes)
    if arrays is None:
        arrays = random_inputs(specs, seed)
        random = True
    else:
        _check_inputs(arrays, specs)
        random = False
    with stage("copying the inputs"):
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(arrays[spec.name]), dev)
                   for spec in specs]
        vm.set_input("main", *tensors)
    with stage("running main"):
        log(f"running main on {where} ...")
        vm.invoke_stateful("main")
        outputs = _flatten(vm.get_outputs("main"))
    median, timings = None, []
    if repeat:
        with stage(f"timing {repeat} runs"):
            log(f"timing {repeat} runs ...")
            timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat)
            result = timer("main")
            median, timings = float(result.median), [float(t) for t in result.results]
    names_out = artifact.output_names if (
        artifact.output_names and len(artifact.output_names) == len(outputs)) else None
    named = {(names_out[i] if names_out else f"output_{i}"): out for i, out in enumerate(outputs)}
    return RunResult(library=artifact.library, outputs=named,
                     inputs={s.name: arrays[s.name] for s in specs}, median_s=median,
                     repeat=repeat, where=where, device=device, random_inputs=random,
                     timings_s=timings)


def _normalize_arch(machine: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


def _flatten(value: Any) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or type(value).__name__ in ("Array", "List", "Tuple"):
        flat: list[np.ndarray] = []
        for item in value:
            flat.extend(_flatten(item))
        return flat
    return [np.asarray(value)]


def save_outputs(result: RunResult, path: str | os.PathLike[str]) -> None:
    """Write the outputs to an .npz keyed by output name (exactly `path`, no suffix added)."""
    try:
        with open(path, "wb") as handle:
            np.savez(handle, **result.outputs)
    except OSError as exc:
        raise RemoteError(f"cannot write {os.fspath(path)}: {exc.strerror or exc}") from None
