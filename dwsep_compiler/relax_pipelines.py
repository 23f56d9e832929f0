"""Our Relax pipelines under names ``tvm.compile`` knows, for users who build with TVM directly:

    import tvm
    from dwsep_compiler.compile.cpu import PASS_CONFIG

    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        executable = tvm.compile(mod, target="llvm -mcpu=cortex-a76 -mtriple=aarch64-linux-gnu",
                                 relax_pipeline="dwsep_cpu", tir_pipeline="dwsep_cpu")

``dwsep_cpu``: the CPU pipeline `dwsep_compiler.compile.build` runs (our lowering passes and
schedule rules, `dwsep_compiler.compile.cpu.relax_pipeline`); ``dwsep_opencl``: the OpenCL one
(`opencl.relax_pipeline`). Both read the target ``tvm.compile`` sets. The TIR half of a CPU
build is registered as TIR pipeline ``dwsep_cpu`` (`dwsep_compiler.compile.cpu.tir_pipeline`:
TVM's lowering, then kernel scratch buffers on the stack); the PassContext above is what
`build` uses with it (loop partitioning). Without either, the kernels compute the same with
slightly different loop code.

`import dwsep_compiler` calls `install`: it registers at once when TVM is already imported,
else right after TVM's pipeline module is first imported (an import hook), so that the CLI and
the device tools, which import this package, do not pay for importing TVM.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

NAMES = ("dwsep_cpu", "dwsep_opencl")
_TVM_PIPELINES = "tvm.relax.pipeline"
_TVM_TIR_PIPELINES = "tvm.tirx.compilation_pipeline"


def _current_target(name: str, kind: str):
    import tvm

    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != kind:
        got = "none" if target is None else repr(target.kind.name)
        raise ValueError(f"relax_pipeline={name!r} needs a target of kind {kind!r} given to "
                         f"tvm.compile (got {got})")
    return target


def dwsep_cpu(fuse: bool | str = True, records=None):
    """``compile.cpu.relax_pipeline`` for the target of the enclosing ``tvm.compile``."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="dwsep_cpu")
    def pipeline(mod, _ctx):
        from dwsep_compiler.compile import cpu

        return cpu.relax_pipeline(_current_target("dwsep_cpu", "llvm"), fuse, records)(mod)

    return pipeline


def dwsep_opencl(fuse: bool = True):
    """``opencl.relax_pipeline`` for the target of the enclosing ``tvm.compile``."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="dwsep_opencl")
    def pipeline(mod, _ctx):
        from dwsep_compiler.compile import opencl

        lowering, _ = opencl.relax_pipeline(_current_target("dwsep_opencl", "opencl"), None, fuse)
        return lowering(mod)

    return pipeline


def dwsep_cpu_tir():
    """``compile.cpu.tir_pipeline``: TVM's TIR lowering with our scratch-buffer placement."""
    from dwsep_compiler.compile import cpu

    return cpu.tir_pipeline()


def register() -> None:
    """Register both Relax pipelines and the CPU TIR pipeline with TVM (again: nothing
    happens)."""
    pipeline = importlib.import_module(_TVM_PIPELINES)  # mid-import of tvm.relax: by name
    for name, factory in zip(NAMES, (dwsep_cpu, dwsep_opencl)):
        if name not in pipeline.PIPELINE_MAP:
            pipeline.register_pipeline(name)(factory)
    tir = importlib.import_module(_TVM_TIR_PIPELINES)
    if NAMES[0] not in tir.PIPELINE_MAP:
        tir.register_tir_pipeline(NAMES[0], dwsep_cpu_tir)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when TVM's pipeline module is about to be imported, it lets the
    regular finders find it and has its loader call `register` once the module ran."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TVM_PIPELINES:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if TVM's pipeline module is loaded, else when it is."""
    if _TVM_PIPELINES in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
