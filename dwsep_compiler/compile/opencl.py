"""OpenCL (mobile GPU) builds: the kernels TVM generates, their launch sizes, the device limits,
checked against a device's limits. Running a build here is `dwsep_compiler.device.pocl`.

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

"""

from __future__ import annotations

import importlib
import math
import re
import weakref
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import relax

from dwsep_compiler.errors import DwsepError

# Executables made by `build` -> their lowering (weak: an executable's program goes with it).
_LOWERED: "weakref.WeakKeyDictionary[relax.Executable, GpuProgram]" = weakref.WeakKeyDictionary()
_DIMS = {"x": 0, "y": 1, "z": 2}
_SHARED_SCOPES = ("shared", "shared.dyn")


class GpuLimitError(DwsepError):
    """A kernel needs more threads per work-group or local memory than the device has."""


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
    # What a runner built from this program for a device (the PoCL replay's compiled kernels,
    # keyed by context), kept with the program so that a second run does not rebuild them.
    runner_cache: dict = field(default_factory=dict, repr=False)


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


def full_target(target) -> tvm.target.Target:
    """An OpenCL target (preset, dict or Target) with its host, as `lower` builds for it and
    tuning records are keyed (an x86 host when it names none)."""
    return _with_host(_as_target(target))


def _with_host(target: tvm.target.Target) -> tvm.target.Target:
    host = target.host if target.host is not None else tvm.target.Target({"kind": "llvm"})
    return target.with_host(host)


def relax_pipeline(target, rules=None, fuse: bool = True, records=None):
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
    otherwise schedule. ``records`` (`dwsep_compiler.tuning.TuningRecords`): a PrimFunc
    measured on this target gets its best recorded schedule instead of the rule's default.
    ``main``'s parameters are renamed to C identifiers first (`c_identifier_inputs`).

    Returns ``(pass, schedule)``; after the pass ran, ``schedule.applied`` maps each PrimFunc our
    rules scheduled to the rule's class name ("tuned": from the records)."""
    from dwsep_compiler.schedules import gpu
    from dwsep_compiler.schedules.apply import ApplyScheduleRules

    target = _as_target(target)
    schedule = ApplyScheduleRules(gpu.rules(target) if rules is None else rules, records)

    @tvm.transform.module_pass(opt_level=0, name="DwsepGPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:  # adreno's legalize_passes reads Target.current()
            front, back = _stages(target, fuse)
            return tvm.transform.Sequential(front + [schedule] + back)(c_identifier_inputs(mod))

    return _pipeline, schedule


def legalized(mod: tvm.IRModule, target, fuse: bool = True) -> tvm.IRModule:
    """``mod`` after the OpenCL pipeline's passes up to scheduling: its PrimFuncs are what our
    GPU rules schedule and what tuning measures (``target``: with its host, as `lower` uses)."""
    target = _with_host(_as_target(target))
    with target:
        front, _ = _stages(target, fuse)
        return tvm.transform.Sequential(front)(c_identifier_inputs(mod))


def _stages(target: tvm.target.Target, fuse: bool) -> tuple[list, list]:
    """The passes before our schedule rules, and those after (under ``with target``)."""
    from dwsep_compiler.passes.lowering.drop_dropout import DropDropout
    from dwsep_compiler.passes.lowering.fold_bn import FoldBatchNormIntoConv2D
    from dwsep_compiler.passes.lowering.fuse_dwpw import FuseDepthwisePointwise
    from dwsep_compiler.passes.lowering.strided_pointwise import StridedPointwiseToSlice
    from dwsep_compiler.passes.lowering.sum_to_add import SumToAdd
    from tvm.s_tir import dlight

    backend = relax.backend.adreno if "adreno" in target.keys else relax.backend.gpu_generic
    legalize = list(backend.legalize_passes(target))
    at = next((i for i, p in enumerate(legalize) if isinstance(p, dlight.ApplyDefaultSchedule)),
              None)
    if at is None:
        raise DwsepError(f"internal: TVM's {backend.__name__} pipeline has no dlight "
                         "ApplyDefaultSchedule to put our schedule rules before")
    # every depthwise -> pointwise pair as one kernel (schedules/gpu/fused_dwpw.py)
    front = (backend.library_dispatch_passes(target)
             + [DropDropout(), FoldBatchNormIntoConv2D(decompose_rest=True), SumToAdd(),
                StridedPointwiseToSlice()]
             + ([FuseDepthwisePointwise(0)] if fuse else [])
             + legalize[:at])
    back = legalize[at:] + backend.dataflow_lower_passes(target) + backend.finalize_passes(target)
    return front, back


def c_identifier_inputs(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every ``main`` parameter named a C identifier.

    TVM names an OpenCL kernel's arguments after the Relax variables that reach it, and for a
    graph input that is the ONNX name verbatim: ``gpu_0/data_0`` or ``input.1`` made
    ``__global float* gpu_0/data_0_ptr``, which no OpenCL compiler accepts. Invalid characters
    become ``_`` (made unique); the VM's inputs keep their order, which is how `dwsep-run` and
    the verification pass them."""
    main = mod["main"]
    taken = {p.name for p in main.params}
    renamed = {}
    for param in main.params:
        name = param.name
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            continue
        safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
        safe = safe if re.match(r"[A-Za-z_]", safe) else f"_{safe}"
        while safe in taken:
            safe += "_"
        taken.add(safe)
        renamed[param] = relax.Var(safe, param.ty)
    if not renamed:
        return mod
    bound = main.bind_params(dict(renamed))
    params = [renamed.get(p, p) for p in main.params]
    func = relax.Function(params, bound.body, main.ret_ty, main.is_pure, main.attrs, main.span)
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = func
    return out


def lower(mod: tvm.IRModule, target, rules=None, fuse: bool = True,
          records=None) -> GpuProgram:
    """Run the Relax pipeline (`relax_pipeline`: TVM's for ``target``, with our schedule rules
    first; ``rules`` and ``fuse`` as there) and the TIR pipeline ``tvm.compile`` uses on
    ``mod`` (a Relax module as imported), for ``target`` (an OpenCL target, preset, or dict),
    and describe every kernel."""
    target = _with_host(_as_target(target))
    pipeline, schedule = relax_pipeline(target, rules, fuse, records)
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
            for binding in main_bindings(func):
                op = getattr(binding.value, "op", None)
                if isinstance(op, tvm.ir.GlobalVar):
                    names.add(op.name_hint)
    return names


def main_bindings(func: relax.Function):
    """The bindings of a lowered Relax function, in order (its body is one flat sequence)."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise DwsepError("internal: Relax main is not a sequence of bindings")
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
          name: str | None = None, records=None) -> tuple[relax.Executable, GpuProgram]:
    """Build ``mod`` for an OpenCL target; raise `GpuLimitError` if a kernel breaks ``limits``.

    The executable is ``tvm.compile`` of the lowered module (the Relax pipeline runs once); its
    OpenCL source is checked to be the one the launch data were taken from.
    """
    program = lower(mod, target, records=records)
    executable = tvm.compile(program.relax_mod, target=program.target, relax_pipeline=None)
    shipped = opencl_source(executable)
    if shipped != program.source:
        raise DwsepError("internal: the library's OpenCL source differs from the lowered kernels")
    program.executable = executable
    _LOWERED[executable] = program  # so that program_of(executable) finds it
    if limits:
        violations = check_limits(list(program.kernels.values()), limits)
        if violations:
            label = f"target '{name}'" if name else "the target"
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise GpuLimitError(f"a kernel exceeds the device limits of {label}: "
                                f"{violations[0]}{more}")
    return executable, program


def build_for_this_host(obj) -> relax.Executable:
    """The same OpenCL kernels with host code for this machine: how a build whose host is a
    phone's CPU (``mali``, ``adreno``) runs through the Relax VM on a local OpenCL device.

    ``obj``: an executable made by `build` (or its `GpuProgram`). The lowered Relax module is
    compiled again with an x86 host; its OpenCL source must be byte-identical to the shipped
    library's (the device code does not depend on the host), or this raises."""
    program = program_of(obj)
    spec = dict(program.target.export())
    spec["host"] = {"kind": "llvm"}
    twin = tvm.compile(program.relax_mod, target=tvm.target.Target(spec), relax_pipeline=None)
    if opencl_source(twin) != program.source:
        raise DwsepError("internal: the host-side twin's OpenCL source differs from the library's")
    return twin


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
    program = program_of(mod_or_executable, target)
    return list(program.kernels.values())


def program_of(obj, target=None) -> GpuProgram:
    """The `GpuProgram` of a Relax module (lowered here for ``target``), of an executable made
    by `build`, or the program itself."""
    if isinstance(obj, GpuProgram):
        return obj
    if isinstance(obj, tvm.IRModule):
        if target is None:
            raise DwsepError("gpu_kernels(IRModule) needs the target")
        return lower(obj, target)
    program = _LOWERED.get(obj)
    if program is None:
        raise DwsepError("launch sizes are not recoverable from a plain executable: pass the "
                         "Relax module and target, or build with dwsep_compiler.compile.opencl.build")
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
