"""Running an OpenCL build here, on PoCL (OpenCL on the CPU), kernel by kernel.

`run_on_pocl` replays ``main`` with pyopencl: one buffer per ``alloc_storage`` (TVM's memory plan,
aliasing included), the kernels built from the library's own OpenCL source, launched with the
launch sizes above; like TVM's OpenCL runtime, each kernel is built on its own from its
``// Function:`` section, with no build options. Host ops other than allocation, reshape (a view),
and the input checks raise `UnsupportedOnPocl`.

Libraries run through TVM's Relax VM with our OpenCL runtime (`opencl_runtime`); this replay is
kept as a debugging aid: it runs a `GpuProgram` (no executable needed), one kernel at a time,
which is how the GPU rule tests check a schedule point by point and how a wrong kernel is found.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tvm
from tvm import relax

from dwsep_compiler.compile import opencl
from dwsep_compiler.errors import DwsepError, first_line


class UnsupportedOnPocl(DwsepError):
    """The lowered program uses a host op the PoCL runner does not implement."""


class OpenCLUnavailable(DwsepError):
    """pyopencl or an OpenCL platform (the PoCL ICD) is missing."""


# ---------------------------------------------------------------------------------------------
# Running on PoCL


def _pyopencl():
    try:
        import pyopencl  # noqa: PLC0415
    except ImportError:
        raise OpenCLUnavailable("pyopencl is not installed (pip install pyopencl, or "
                                "pip install 'dwsep-compiler[opencl]')") from None
    return pyopencl


def pocl_context():
    """A context on the PoCL platform (``DWSEP_OPENCL_PLATFORM`` picks another by name)."""
    cl = _pyopencl()
    wanted = os.environ.get("DWSEP_OPENCL_PLATFORM", "Portable Computing Language")
    try:
        platforms = cl.get_platforms()
    except Exception as exc:
        raise OpenCLUnavailable(f"no OpenCL platform (apt-get install pocl-opencl-icd): "
                                f"{first_line(exc)}") from None
    for platform in platforms:
        if wanted.lower() in platform.name.lower():
            devices = platform.get_devices()
            if devices:
                return cl.Context(devices[:1])
    names = ", ".join(p.name for p in platforms) or "none"
    raise OpenCLUnavailable(f"no OpenCL platform named '{wanted}' (found: {names}); "
                            "apt-get install pocl-opencl-icd")


class _Tensor:
    __slots__ = ("buffer", "shape", "dtype")

    def __init__(self, buffer, shape, dtype):
        self.buffer, self.shape, self.dtype = buffer, tuple(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def run_on_pocl(program_or_executable, inputs: list[np.ndarray], context=None,
                target=None) -> list[np.ndarray]:
    """Run Relax ``main`` of a GPU build by launching its OpenCL kernels on PoCL.

    ``program_or_executable``: a `GpuProgram`, an executable from `build`, or a Relax module
    (then ``target`` is needed). Returns the outputs as numpy arrays.
    """
    cl = _pyopencl()
    program = opencl.program_of(program_or_executable, target)
    context = context or pocl_context()
    device = context.devices[0]
    queue = cl.CommandQueue(context)
    key = id(context)
    if key not in program.runner_cache:
        if "cl_khr_fp16" in program.source and "cl_khr_fp16" not in device.extensions:
            raise UnsupportedOnPocl(f"the kernels use fp16, which {device.name} lacks")
        kernels = {}
        for name, info in program.kernels.items():
            # One program per kernel, no build options: what TVM's OpenCL runtime does.
            try:
                built = cl.Program(context, info.source).build()
            except Exception as exc:
                raise DwsepError(f"OpenCL cannot build kernel {name}: {first_line(exc)}") from None
            kernels[name] = cl.Kernel(built, name)
        program.runner_cache = {key: (context, kernels, {})}  # one context at a time
    _, kernels, constants = program.runner_cache[key]

    main = program.relax_mod["main"]
    if len(inputs) != len(main.params):
        raise DwsepError(f"main takes {len(main.params)} inputs, got {len(inputs)}")
    env: dict = {}
    for param, value in zip(main.params, inputs):
        value = np.asarray(value, order="C")  # ascontiguousarray would make 0-d 1-d
        ty = param.ty
        want = tuple(int(s) for s in ty.shape.values)
        if value.shape != want or value.dtype != np.dtype(str(ty.dtype)):
            raise DwsepError(f"input {param.name}: expected {want} {ty.dtype}, "
                             f"got {value.shape} {value.dtype}")
        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
        env[param] = _Tensor(cl.Buffer(context, flags, hostbuf=value), value.shape, value.dtype)

    def arg(expr):
        if isinstance(expr, relax.Var):
            return env[expr]
        if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
            ckey = expr  # TVM objects hash and compare by identity
            if ckey not in constants:
                data = np.asarray(expr.value.numpy(), order="C")  # 0-d stays 0-d
                constants[ckey] = _Tensor(
                    cl.Buffer(context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                              hostbuf=data if data.nbytes else np.zeros(1, np.uint8)),
                    data.shape, data.dtype)
            return constants[ckey]
        raise UnsupportedOnPocl(f"unsupported argument in Relax main: {type(expr).__name__}")

    for binding in opencl.main_bindings(main):
        if not isinstance(binding, relax.VarBinding):
            raise UnsupportedOnPocl(f"unsupported binding in Relax main: {type(binding).__name__}")
        value = binding.value
        if isinstance(value, relax.Var):
            env[binding.var] = env[value]
            continue
        op = getattr(value, "op", None)
        if isinstance(op, tvm.ir.GlobalVar):
            name = op.name_hint
            if name not in program.launches:
                raise UnsupportedOnPocl(f"main calls {name}, which launches no OpenCL kernel")
            tensors = [arg(a) for a in value.args]
            for kernel_name in program.launches[name]:
                _launch(cl, queue, kernels[kernel_name], program.kernels[kernel_name], tensors)
            continue
        name = op.name if isinstance(op, tvm.ir.Op) else (
            op.global_symbol if isinstance(op, relax.ExternFunc) else str(type(op)))
        if name in ("relax.null_value", "relax.vm.kill_object", "vm.builtin.check_tensor_info",
                    "vm.builtin.match_shape"):
            continue  # input checks done above; buffers are freed when the run ends
        if name == "relax.vm.alloc_storage":
            size_expr, _, dtype, scope = value.args
            if str(scope.value) != "global":
                raise UnsupportedOnPocl(f"storage scope {scope.value} (textures) is not supported")
            nbytes = int(size_expr.values[0]) * np.dtype(str(dtype.value)).itemsize
            env[binding.var] = cl.Buffer(context, cl.mem_flags.READ_WRITE, max(nbytes, 1))
        elif name == "relax.vm.alloc_tensor":
            storage, offset, shape, dtype = value.args[:4]
            buffer, offset = env[storage], int(offset.value)
            tensor = _Tensor(buffer, [int(s) for s in shape.values], str(dtype.value))
            if offset:
                align = device.mem_base_addr_align // 8
                if offset % align:
                    raise UnsupportedOnPocl(f"tensor at byte offset {offset} of its storage "
                                            f"(OpenCL sub-buffers need {align}-byte alignment)")
                tensor.buffer = buffer.get_sub_region(offset, max(tensor.nbytes, 1))
            if offset + tensor.nbytes > buffer.size:
                raise DwsepError("internal: a tensor overruns its storage")
            env[binding.var] = tensor
        elif name == "vm.builtin.reshape":
            source, shape = arg(value.args[0]), [int(s) for s in value.args[1].values]
            if math.prod(shape) != math.prod(source.shape):
                raise DwsepError(f"internal: reshape {source.shape} -> {shape}")
            env[binding.var] = _Tensor(source.buffer, shape, source.dtype)
        else:
            raise UnsupportedOnPocl(f"host op {name} in Relax main is not supported by the PoCL "
                                    "runner")

    result = main.body.body
    outputs = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    arrays = []
    for out in outputs:
        tensor = arg(out)
        host = np.empty(tensor.shape, tensor.dtype)
        cl.enqueue_copy(queue, host, tensor.buffer)
        arrays.append(host)
    queue.finish()
    return arrays


_SCALAR_TYPES = {"int": np.int32, "uint": np.uint32, "long": np.int64, "ulong": np.uint64,
                 "float": np.float32, "double": np.float64, "short": np.int16, "char": np.int8,
                 "uchar": np.uint8, "ushort": np.uint16}


def _launch(cl, queue, kernel, info: opencl.KernelInfo, tensors: list[_Tensor]) -> None:
    if info.unsupported:
        raise UnsupportedOnPocl(f"kernel {info.name}: {info.unsupported}")
    args = []
    for param in info.params:
        if param.binds is None:
            ctype = param.ctype.split()[-1]
            if ctype not in _SCALAR_TYPES:
                raise UnsupportedOnPocl(f"kernel {info.name}: scalar argument of type {ctype}")
            args.append(_SCALAR_TYPES[ctype](param.value))
            continue
        tensor = tensors[param.binds]
        if tensor.shape != param.shape or tensor.dtype != np.dtype(param.dtype):
            raise DwsepError(f"internal: {info.name} argument {param.name} expects "
                             f"{param.shape} {param.dtype}, got {tensor.shape} {tensor.dtype}")
        args.append(tensor.buffer)
    kernel.set_args(*args)
    cl.enqueue_nd_range_kernel(queue, kernel, info.global_size, info.local_size)


# ---------------------------------------------------------------------------------------------
# python -m dwsep_compiler.compile.opencl model.onnx --target mali: kernels, limits, PoCL vs onnxruntime


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from dwsep_compiler.model import graph_inputs, load_model, parse_input_shapes, resolve_input_shapes
    from dwsep_compiler.targets import resolve_target

    parser = argparse.ArgumentParser(
        prog="python -m dwsep_compiler.device.pocl",
        description="Build an ONNX model for an OpenCL preset, list its kernels against the "
                    "device limits, run it on PoCL and compare with onnxruntime.")
    parser.add_argument("model")
    parser.add_argument("--target", default="mali")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    args = parser.parse_args(argv)
    try:
        import onnxruntime as ort

        from dwsep_compiler import compile as tvm_compile

        preset = resolve_target(args.target)
        if not preset.is_gpu:
            raise DwsepError(f"target '{preset.name}' is not an OpenCL target")
        model = load_model(args.model)
        shapes = resolve_input_shapes(model, parse_input_shapes(args.input_shape))
        mod = tvm_compile.import_onnx(model, shapes)
        executable, program = opencl.build(mod, preset)  # limits checked below, not raised
        kernels = list(program.kernels.values())
        print(opencl.format_kernels(kernels))
        limits = opencl.target_limits(preset)
        violations = opencl.check_limits(kernels, limits)
        for line in violations:
            print(f"LIMIT: {line}")
        names = [v.name for v in graph_inputs(model)]
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(shapes[n]).astype(np.float32) for n in names]
        actual = run_on_pocl(program, inputs)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        expected = session.run(None, dict(zip(names, inputs)))
        errors = [float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-30))
                  for a, e in zip(actual, expected)]
        print(f"PoCL vs onnxruntime: max relative error {max(errors):.2e}")
        return 1 if violations or max(errors) > 1e-4 else 0
    except DwsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
