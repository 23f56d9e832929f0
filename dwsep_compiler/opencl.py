"""OpenCL (mobile GPU) builds: the kernels TVM generates, their launch sizes, the device limits,
and running the whole model on an OpenCL implementation here (PoCL on the CPU).

How a GPU build is taken apart (TVM 0.27, measured):

* `lower` runs the Relax pipeline ``tvm.compile`` picks for a GPU target
  (``relax.get_default_pipeline(target)``: ``gpu_generic``, or ``adreno``'s own) with our rules
  (`dwsep_compiler.schedules.gpu`) applied to the legalized PrimFuncs right before dlight's
  (`relax_pipeline`; dlight schedules what they leave), and keeps the result: the Relax module
  right before VM codegen. Its ``main`` is a flat sequence of
  ``R.vm.alloc_storage`` / ``R.vm.alloc_tensor`` / calls of PrimFuncs in destination-passing
  style / ``vm.builtin.reshape`` / ``R.vm.kill_object``.
* The PrimFuncs then go through the TIR pipeline ``tvm.compile`` uses (``tir_pipeline="default"``)
  and ``split_host_device_mods``. Each host function launches its kernels with
  ``T.call_ffi_kernel("<name>_kernel", <buffer>.data, ..., <extents>, launch_params=[tags])``:
  that call is where launch sizes come from (global = blockIdx x threadIdx, local = threadIdx,
  per dimension, work_dim = highest dimension used + 1, as TVM's OpenCL runtime launches them).
  Local memory is the sum of the kernel's ``shared`` allocations.
* The device functions go through OpenCL codegen (``target.build.opencl``). The executable is then
  built from the same lowered Relax module (``tvm.compile(..., relax_pipeline=None)``) and its
  OpenCL source must be identical to ours, so the launch data describe exactly the kernels in the
  library.

`run_on_pocl` replays ``main`` with pyopencl: one buffer per ``alloc_storage`` (TVM's memory plan,
aliasing included), the kernels built from the library's own OpenCL source, launched with the
launch sizes above; like TVM's OpenCL runtime, each kernel is built on its own from its
``// Function:`` section, with no build options. Host ops other than allocation, reshape (a view),
and the input checks raise `UnsupportedOnPocl`.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from dwsep_compiler.errors import DwsepError, first_line

_DIMS = {"x": 0, "y": 1, "z": 2}
_SHARED_SCOPES = ("shared", "shared.dyn")


class GpuLimitError(DwsepError):
    """A kernel needs more threads per work-group or local memory than the device has."""


class UnsupportedOnPocl(DwsepError):
    """The lowered program uses a host op the PoCL runner does not implement."""


class OpenCLUnavailable(DwsepError):
    """pyopencl or an OpenCL platform (the PoCL ICD) is missing."""


@dataclass(frozen=True)
class KernelParam:
    name: str  # the kernel argument in the OpenCL source, e.g. "B_ptr"
    ctype: str  # its C type in the source, e.g. "__global float* restrict"
    dtype: str  # element type of the buffer (or the scalar's type)
    shape: tuple[int, ...] | None  # shape of the PrimFunc buffer bound to it (None: scalar)
    binds: int | None  # index of the PrimFunc parameter passed here (None: not a parameter)
    value: int | float | None = None  # the constant passed, for scalar arguments


@dataclass
class KernelInfo:
    name: str  # OpenCL kernel name, e.g. "conv2d2_kernel"
    primfunc: str  # the PrimFunc whose host code launches it
    params: list[KernelParam]
    grid: tuple[int | None, int | None, int | None]  # blockIdx extents (x, y, z)
    block: tuple[int | None, int | None, int | None]  # threadIdx extents (x, y, z)
    work_dim: int
    local_memory_bytes: int  # __local (TIR "shared") memory per work-group
    local_buffers: dict[str, int]  # name -> bytes
    source: str  # this kernel's program: its section of the OpenCL source
    launched: bool = True  # whether Relax main calls its PrimFunc (dead PrimFuncs still ship)
    dynamic_shared_memory: int = 0
    unsupported: str | None = None  # why run_on_pocl cannot launch it (None: it can)

    @property
    def local_size(self) -> tuple[int | None, ...]:
        return self.block[:self.work_dim]

    @property
    def global_size(self) -> tuple[int | None, ...]:
        return tuple(None if g is None or b is None else g * b
                     for g, b in zip(self.grid[:self.work_dim], self.block[:self.work_dim]))

    @property
    def launch(self) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
        """(global, local) work sizes as passed to clEnqueueNDRangeKernel."""
        return self.global_size, self.local_size

    @property
    def threads_per_group(self) -> int | None:
        if any(b is None for b in self.block):
            return None
        return math.prod(self.block)


@dataclass
class GpuProgram:
    """A lowered GPU build: everything `gpu_kernels` and `run_on_pocl` need."""

    target: tvm.target.Target
    relax_mod: tvm.IRModule  # after the Relax pipeline, right before VM codegen
    host_mod: tvm.IRModule  # lowered host functions (they launch the kernels)
    device_mod: tvm.IRModule  # lowered kernels
    source: str  # OpenCL C of all kernels
    kernels: dict[str, KernelInfo]  # by kernel name
    launches: dict[str, list[str]]  # PrimFunc name -> kernel names it launches, in order
    # PrimFunc name -> the rule class that scheduled it ("dlight": dlight's default GPU rules)
    schedules: dict[str, str] = field(default_factory=dict)
    executable: relax.Executable | None = None
    _pocl_cache: dict = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------------------------
# Lowering


def _as_target(target) -> tvm.target.Target:
    if hasattr(target, "tvm_target"):  # a TargetPreset
        target = target.tvm_target()
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    if not isinstance(target, tvm.target.Target):
        raise DwsepError(f"not a TVM target: {target!r}")
    if target.kind.name != "opencl":
        raise DwsepError(f"not an OpenCL target: {target.kind.name}")
    return target


def _with_host(target: tvm.target.Target) -> tvm.target.Target:
    host = target.host if target.host is not None else tvm.target.Target({"kind": "llvm"})
    return target.with_host(host)


def relax_pipeline(target, rules=None, fuse: bool = True):
    """The Relax pipeline ``relax.get_default_pipeline(target)`` is for an OpenCL target, with
    ``rules`` (default: `dwsep_compiler.schedules.gpu.rules`) applied to the legalized PrimFuncs
    right before dlight's first ``ApplyDefaultSchedule``, so dlight schedules only what our rules
    leave. Same backend as TVM picks: ``adreno`` (its own legalization and dlight.adreno rules)
    when "adreno" is in the target's keys, else ``gpu_generic``. Every depthwise -> pointwise
    conv pair is fused first (`FuseDepthwisePointwise(0)`, scheduled by our fused rule), after
    inference dropouts are removed (`DropDropout`), batch norms are folded into the convs
    before them (`FoldBatchNormIntoConv2D`) and ONNX
    ``Sum`` nodes become additions (`SumToAdd`) and strided 1x1 convs (ResNet's projections) a
    strided slice and a pointwise conv (`StridedPointwiseToSlice`). ``fuse=False`` keeps each pair as two kernels:
    for a ``rules`` list without `FusedDepthwisePointwise`, whose fused PrimFuncs dlight would
    otherwise schedule.

    Returns ``(pass, schedule)``; after the pass ran, ``schedule.applied`` maps each PrimFunc our
    rules scheduled to the rule's class name."""
    from dwsep_compiler.schedules import gpu
    from dwsep_compiler.passes.relax_drop_dropout import DropDropout
    from dwsep_compiler.passes.relax_fold_bn import FoldBatchNormIntoConv2D
    from dwsep_compiler.passes.relax_fuse_dwpw import FuseDepthwisePointwise
    from dwsep_compiler.passes.relax_strided_pointwise import StridedPointwiseToSlice
    from dwsep_compiler.passes.relax_sum_to_add import SumToAdd
    from dwsep_compiler.schedules.apply import ApplyScheduleRules
    from tvm.s_tir import dlight

    target = _as_target(target)
    backend = relax.backend.adreno if "adreno" in target.keys else relax.backend.gpu_generic
    schedule = ApplyScheduleRules(gpu.rules(target) if rules is None else rules)

    @tvm.transform.module_pass(opt_level=0, name="DwsepGPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:  # adreno's legalize_passes reads Target.current()
            legalize = list(backend.legalize_passes(target))
            at = next((i for i, p in enumerate(legalize)
                       if isinstance(p, dlight.ApplyDefaultSchedule)), None)
            if at is None:
                raise DwsepError(f"internal: TVM's {backend.__name__} pipeline has no dlight "
                                 "ApplyDefaultSchedule to put our schedule rules before")
            # every depthwise -> pointwise pair as one kernel (schedules/gpu/fused_dwpw.py)
            passes = (backend.library_dispatch_passes(target)
                      + [DropDropout(), FoldBatchNormIntoConv2D(decompose_rest=True), SumToAdd(),
                         StridedPointwiseToSlice()]
                      + ([FuseDepthwisePointwise(0)] if fuse else [])
                      + legalize[:at] + [schedule]
                      + legalize[at:] + backend.dataflow_lower_passes(target)
                      + backend.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline, schedule


def lower(mod: tvm.IRModule, target, rules=None, fuse: bool = True) -> GpuProgram:
    """Run the Relax pipeline (`relax_pipeline`: TVM's for ``target``, with our schedule rules
    first; ``rules`` and ``fuse`` as there) and the TIR pipeline ``tvm.compile`` uses on
    ``mod`` (a Relax module as imported), for ``target`` (an OpenCL target, preset, or dict),
    and describe every kernel."""
    target = _with_host(_as_target(target))
    pipeline, schedule = relax_pipeline(target, rules, fuse)
    with target:
        relax_mod = pipeline(mod)
    program = _lower_tir(relax_mod, target)
    program.schedules = {gv.name_hint: schedule.applied.get(gv.name_hint, "dlight")
                         for gv, func in relax_mod.functions.items()
                         if isinstance(func, tvm.tirx.PrimFunc)}
    return program


def _lower_tir(relax_mod: tvm.IRModule, target: tvm.target.Target) -> GpuProgram:
    build_mod = importlib.import_module("tvm.tirx.build")
    prim = {gv: f for gv, f in relax_mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    tir_mod = tvm.IRModule(prim, attrs=relax_mod.attrs)
    # tirx.build(tir_mod, target, pipeline="default"), as relax.build calls it, up to codegen.
    tir_mod = tvm.tirx.transform.BindTarget(target)(tir_mod)
    pipeline, _, finalize_device = tvm.tirx.get_tir_pipeline("default")
    tir_mod = pipeline(tir_mod)
    host_mod, device_mods = build_mod.split_host_device_mods(tir_mod)
    device_mods = {t: finalize_device()(m) for t, m in device_mods.items()}
    opencl = [(t, m) for t, m in device_mods.items()
              if t.kind.name == "opencl" and len(m.functions)]
    if len(opencl) != 1:
        raise DwsepError(f"expected one OpenCL device module, found {len(opencl)}")
    device_target, device_mod = opencl[0]
    source = build_mod.codegen_build(device_mod, device_target).inspect_source()

    called = _called_primfuncs(relax_mod)
    kernels: dict[str, KernelInfo] = {}
    launches: dict[str, list[str]] = {}
    signatures = _kernel_signatures(source)
    sections = _source_sections(source)
    for gv, host_func in host_mod.functions.items():
        name = gv.name_hint
        if name not in {g.name_hint for g in prim}:
            continue
        prim_func = relax_mod[name]
        for call in _kernel_calls(host_func):
            info = _kernel_info(call, name, prim_func, device_mod, signatures, sections)
            info.launched = name in called
            if info.name in kernels and kernels[info.name].launch != info.launch:
                raise DwsepError(f"kernel {info.name} is launched with two different sizes")
            kernels[info.name] = info
            launches.setdefault(name, []).append(info.name)
    missing = set(signatures) - set(kernels)
    if missing:
        raise DwsepError(f"kernels with no launch in the host code: {', '.join(sorted(missing))}")
    return GpuProgram(target, relax_mod, host_mod, device_mod, source, kernels, launches)


def _called_primfuncs(relax_mod: tvm.IRModule) -> set[str]:
    names: set[str] = set()
    for gv, func in relax_mod.functions.items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            for binding in _bindings(func):
                op = getattr(binding.value, "op", None)
                if isinstance(op, tvm.ir.GlobalVar):
                    names.add(op.name_hint)
    return names


def _bindings(func: relax.Function):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise UnsupportedOnPocl("Relax main is not a sequence of bindings")
    for block in body.blocks:
        yield from block.bindings


def _kernel_calls(host_func) -> list:
    calls = []

    def visit(call):
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "tirx.call_ffi_kernel":
            calls.append(call)

    tvm_ffi.structural_walk(host_func.body, [(tvm.ir.Call, visit)], order="pre")
    return calls


_SIGNATURE = re.compile(r"__kernel\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{")
_SECTION = re.compile(r"^// Function: (\w+)\s*$", re.M)


def _kernel_signatures(source: str) -> dict[str, list[tuple[str, str]]]:
    """Kernel name -> [(C type, argument name)], from the definitions (not the prototypes)."""
    out = {}
    for match in _SIGNATURE.finditer(source):
        args = []
        for arg in (a.strip() for a in match.group(2).split(",") if a.strip()):
            ctype, name = arg.rsplit(None, 1)
            args.append((ctype.strip(), name.strip("*")))
        out[match.group(1)] = args
    return out


def _source_sections(source: str) -> dict[str, str]:
    """Kernel name -> its program text, split as TVM's OpenCL runtime does (SplitKernels: the
    text after ``// Function: <name>`` up to the next delimiter; each is built on its own)."""
    marks = list(_SECTION.finditer(source))
    sections = {}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(source)
        sections[mark.group(1)] = source[mark.end() + 1:end]
    return sections


def _int(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tvm.tirx.IntImm) else None


def _kernel_info(call, prim_name, prim_func, device_mod, signatures, sections) -> KernelInfo:
    kernel = str(call.args[0].value)
    tags = [str(t) for t in call.attrs.launch_params]
    device_func = device_mod[kernel]
    n_params = len(device_func.params)
    operands, values = list(call.args[1:1 + n_params]), list(call.args[1 + n_params:])
    if kernel not in signatures:
        raise DwsepError(f"kernel {kernel} is not in the OpenCL source")
    signature = signatures[kernel]
    names = [p.name for p in device_func.params]
    if [name for _, name in signature] != [f"{n}" for n in names] and \
            [name for _, name in signature] != [f"{n}_ptr" for n in names]:
        raise DwsepError(f"kernel {kernel}: source arguments {signature} do not match the TIR "
                         f"parameters {names}")

    # Which PrimFunc parameter each kernel operand is: the host passes `<buffer>.data`, and the
    # buffer vars keep the parameter names through lowering (checked unique).
    param_names = [p.name for p in prim_func.params]
    if len(set(param_names)) != len(param_names):
        raise DwsepError(f"PrimFunc {prim_name} has duplicate parameter names {param_names}")
    # Problems that only stop run_on_pocl (not the build, nor the limit check) are recorded.
    unsupported = []
    params = []
    for (ctype, arg_name), operand in zip(signature, operands):
        if isinstance(operand, tvm.ir.Call) and operand.op.name == "tirx.buffer_data":
            buf = operand.args[0].name
            if buf not in param_names:
                unsupported.append(f"argument {arg_name} is buffer {buf}, not a parameter of "
                                   f"{prim_name} (a workspace the host code allocates)")
                params.append(KernelParam(arg_name, ctype, "", None, None))
                continue
            index = param_names.index(buf)
            ty = prim_func.params[index].ty
            shape = tuple(_int(s) for s in ty.shape)
            params.append(KernelParam(arg_name, ctype, str(ty.dtype), shape, index))
        elif isinstance(operand, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            params.append(KernelParam(arg_name, ctype, str(operand.dtype), None, None,
                                      operand.value))
        else:
            unsupported.append(f"argument {arg_name} is {operand}, not a buffer or a constant")
            params.append(KernelParam(arg_name, ctype, "", None, None))

    grid: list[int | None] = [1, 1, 1]
    block: list[int | None] = [1, 1, 1]
    work_dim = 1
    dynamic_shared = 0
    values_iter = iter(values)
    for tag in tags:
        if tag.startswith(("blockIdx.", "threadIdx.")):
            scope, dim = tag.split(".")
            (grid if scope == "blockIdx" else block)[_DIMS[dim]] = _int(next(values_iter))
            work_dim = max(work_dim, _DIMS[dim] + 1)
        elif tag == "tirx.use_dyn_shared_memory":
            dynamic_shared = _int(values[-1]) or 0
            unsupported.append("dynamic shared memory")
        else:
            unsupported.append(f"launch parameter {tag}")
    if any(v is None for v in grid + block):
        unsupported.append("launch size not static")

    local_buffers: dict[str, int] = {}

    def visit(alloc):
        buf = alloc.buffer
        if buf.scope() in _SHARED_SCOPES:
            elems = math.prod(int(s) for s in buf.shape)
            local_buffers[buf.name] = local_buffers.get(buf.name, 0) + elems * _itemsize(buf.dtype)

    tvm_ffi.structural_walk(device_func.body, [(tvm.tirx.AllocBuffer, visit)])
    return KernelInfo(kernel, prim_name, params, tuple(grid), tuple(block), work_dim,
                      sum(local_buffers.values()) + dynamic_shared, local_buffers,
                      sections.get(kernel, ""), dynamic_shared_memory=dynamic_shared,
                      unsupported="; ".join(unsupported) or None)


def _itemsize(dtype) -> int:
    dtype = tvm_ffi.dtype(str(dtype)) if not hasattr(dtype, "bits") else dtype
    return max(1, dtype.bits * dtype.lanes // 8)


# ---------------------------------------------------------------------------------------------
# Build, kernels, limits


def build(mod: tvm.IRModule, target, limits: dict | None = None,
          name: str | None = None) -> tuple[relax.Executable, GpuProgram]:
    """Build ``mod`` for an OpenCL target; raise `GpuLimitError` if a kernel breaks ``limits``.

    The executable is ``tvm.compile`` of the lowered module (the Relax pipeline runs once); its
    OpenCL source is checked to be the one the launch data were taken from.
    """
    program = lower(mod, target)
    executable = tvm.compile(program.relax_mod, target=program.target, relax_pipeline=None)
    shipped = opencl_source(executable)
    if shipped != program.source:
        raise DwsepError("internal: the library's OpenCL source differs from the lowered kernels")
    program.executable = executable
    try:
        executable._dwsep_gpu_program = program  # so gpu_kernels(executable) works
    except AttributeError:
        pass
    if limits:
        violations = check_limits(list(program.kernels.values()), limits)
        if violations:
            label = f"target '{name}'" if name else "the target"
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise GpuLimitError(f"a kernel exceeds the device limits of {label}: "
                                f"{violations[0]}{more}")
    return executable, program


def target_limits(target) -> dict:
    """The limits a target dict/preset declares (``gpu_limits``, else the target's attributes)."""
    if getattr(target, "gpu_limits", None):
        return dict(target.gpu_limits)
    target = _as_target(target)
    limits = {}
    for key in ("max_threads_per_block", "max_shared_memory_per_block"):
        value = target.attrs.get(key)
        if value is not None:
            limits[key] = int(value)
    return limits


def opencl_source(executable) -> str:
    """The OpenCL C source inside a built executable."""
    module = _find_opencl_module(executable.mod if hasattr(executable, "mod") else executable)
    if module is None:
        raise DwsepError("the executable has no OpenCL module (not a GPU build)")
    return module.inspect_source()


def _find_opencl_module(module):
    if module.kind == "opencl":
        return module
    for sub in module.imports:
        found = _find_opencl_module(sub)
        if found is not None:
            return found
    return None


def gpu_kernels(mod_or_executable, target=None) -> list[KernelInfo]:
    """Every OpenCL kernel of a GPU build, with parameters, launch sizes and local memory.

    Accepts a Relax IRModule (lowered here for ``target``), a `GpuProgram`, or an executable made
    by `build` / ``dwsep_compiler.compile.build`` (which keeps its lowering).
    """
    program = _program(mod_or_executable, target)
    return list(program.kernels.values())


def _program(obj, target=None) -> GpuProgram:
    if isinstance(obj, GpuProgram):
        return obj
    if isinstance(obj, tvm.IRModule):
        if target is None:
            raise DwsepError("gpu_kernels(IRModule) needs the target")
        return lower(obj, target)
    program = getattr(obj, "_dwsep_gpu_program", None)
    if program is None:
        raise DwsepError("launch sizes are not recoverable from a plain executable: pass the "
                         "Relax module and target, or build with dwsep_compiler.opencl.build")
    return program


def check_limits(kernels: list[KernelInfo], limits: dict) -> list[str]:
    """One line per violation of ``limits`` (``max_threads_per_block``,
    ``max_shared_memory_per_block`` in bytes, optional ``max_work_item_sizes`` (x, y, z))."""
    out = []
    max_threads = limits.get("max_threads_per_block")
    max_local = limits.get("max_shared_memory_per_block")
    max_sizes = limits.get("max_work_item_sizes")
    for k in kernels:
        threads = k.threads_per_group
        shape = "x".join(str(b) for b in k.block[:k.work_dim])
        if threads is None:
            out.append(f"{k.name}: work-group size is not static ({shape})")
        elif max_threads is not None and threads > max_threads:
            out.append(f"{k.name}: {threads} threads per work-group ({shape}) > {max_threads}")
        if max_sizes is not None and threads is not None:
            for dim, (b, m) in enumerate(zip(k.block, max_sizes)):
                if b > m:
                    out.append(f"{k.name}: work-group size {b} in dimension {dim} > {m}")
        if max_local is not None and k.local_memory_bytes > max_local:
            out.append(f"{k.name}: {k.local_memory_bytes} bytes of local memory > {max_local}")
    return out


def format_kernels(kernels: list[KernelInfo]) -> str:
    """A table: kernel, global and local size, threads per group, local memory."""
    rows = [("kernel", "global", "local", "threads", "local mem")]
    for k in kernels:
        rows.append((k.name + ("" if k.launched else " (unused)"),
                     "x".join(map(str, k.global_size)), "x".join(map(str, k.local_size)),
                     str(k.threads_per_group), f"{k.local_memory_bytes} B"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
    program = _program(program_or_executable, target)
    context = context or pocl_context()
    device = context.devices[0]
    queue = cl.CommandQueue(context)
    key = id(context)
    if key not in program._pocl_cache:
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
        program._pocl_cache = {key: (context, kernels, {})}  # one context at a time
    _, kernels, constants = program._pocl_cache[key]

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

    for binding in _bindings(main):
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


def _launch(cl, queue, kernel, info: KernelInfo, tensors: list[_Tensor]) -> None:
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
# python -m dwsep_compiler.opencl model.onnx --target mali: kernels, limits, PoCL vs onnxruntime


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from dwsep_compiler.model import graph_inputs, load_model, parse_input_shapes, resolve_input_shapes
    from dwsep_compiler.targets import resolve_target

    parser = argparse.ArgumentParser(
        prog="python -m dwsep_compiler.opencl",
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
        executable, program = build(mod, preset)  # limits checked below, not raised
        kernels = list(program.kernels.values())
        print(format_kernels(kernels))
        limits = target_limits(preset)
        violations = check_limits(kernels, limits)
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
