"""OpenCL targets (mali, adreno): the kernels TVM generates run on PoCL and match onnxruntime;
every launch fits a phone's limits (256 threads per work-group, 16 KB local memory), which PoCL
itself (4096 / 512 KB) would never enforce.

Needs pyopencl and an OpenCL ICD (Debian pocl-opencl-icd): missing ones fail, never skip.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm

from dwsep_compiler import compile as tvm_compile
from dwsep_compiler.compile import opencl
from dwsep_compiler.device import pocl
from dwsep_compiler.errors import DwsepError
from dwsep_compiler.targets import resolve_target

from gpu_builds import PHONE, SHAPE, gpu_build
from helpers import rel_error, run_onnx

pytestmark = pytest.mark.opencl

_CTYPE_BYTES = {"float": 4, "half": 2, "double": 8, "int": 4, "uint": 4, "char": 1, "uchar": 1,
                "short": 2, "ushort": 2, "long": 8, "ulong": 8}


def _source_local_bytes(section: str) -> int:
    total = 0
    for ctype, count in re.findall(r"__local\s+(\w+)\s+\w+\[(\d+)\]", section):
        base = re.match(r"[a-z]+", ctype).group(0)
        lanes = int(ctype[len(base):] or 1)
        total += _CTYPE_BYTES[base] * lanes * int(count)
    return total


@pytest.mark.parametrize("target_name", ["mali", "adreno"])
@pytest.mark.parametrize("model_name", ["cnn", "cnn_rank2"])
def test_runs_on_pocl_and_matches_onnxruntime(cl_context, models, model_name, target_name):
    _, preset, executable = gpu_build(models, model_name, target_name)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    (actual,) = pocl.run_on_pocl(executable, [x], context=cl_context)
    (expected,) = run_onnx(models[model_name], {"x": x})
    assert actual.shape == expected.shape
    error = rel_error(actual, expected)
    assert error < 1e-4, f"{model_name} on {target_name}: max rel error {error:.2e}"


@pytest.mark.parametrize("target_name", ["mali", "adreno"])
@pytest.mark.parametrize("model_name", ["cnn", "cnn_rank2"])
def test_every_kernel_fits_a_phone(models, model_name, target_name):
    _, preset, executable = gpu_build(models, model_name, target_name)
    kernels = opencl.gpu_kernels(executable)
    table = opencl.format_kernels(kernels)
    assert kernels and any(k.name.startswith(("conv2d", "fused_conv2d")) for k in kernels), table
    for k in kernels:
        assert 1 <= k.threads_per_group <= PHONE["max_threads_per_block"], table
        assert k.local_memory_bytes <= PHONE["max_shared_memory_per_block"], table
        # local memory as declared in the OpenCL source itself
        assert k.local_memory_bytes == _source_local_bytes(k.source), (k.name, k.source[:500])
        assert all(g >= l for g, l in zip(k.global_size, k.local_size)), table
    assert opencl.check_limits(kernels, preset.gpu_limits) == []
    assert opencl.check_limits(kernels, PHONE) == []


def test_launch_sizes_match_the_scheduled_tir(models):
    """The launch sizes (read from the host code's kernel calls) agree with the thread bindings
    of the scheduled PrimFuncs, and the source is what plain tvm.compile generates with our Relax
    pipeline (TVM's for the target, our schedule rules before dlight's)."""
    mod, preset, executable = gpu_build(models, "cnn_rank2", "mali")
    program = opencl.program_of(executable)
    plain = tvm.compile(mod, target=preset.tvm_target(),
                        relax_pipeline=opencl.relax_pipeline(preset)[0])
    assert opencl.opencl_source(plain) == opencl.opencl_source(executable) == program.source
    for kernel in program.kernels.values():
        extents = {}

        def visit(loop):
            if loop.thread_binding is not None:
                tag = str(loop.thread_binding.thread_tag)
                extents.setdefault(tag, set()).add(int(loop.extent))

        import tvm_ffi

        tvm_ffi.structural_walk(program.relax_mod[kernel.primfunc].body,
                                [(tvm.tirx.For, visit)])
        # several loops may bind one thread tag (e.g. cooperative fetches): same extent each
        for i, dim in enumerate("xyz"):
            assert {kernel.grid[i]} == extents.get(f"blockIdx.{dim}", {1}), (kernel.name, extents)
            assert {kernel.block[i]} == extents.get(f"threadIdx.{dim}", {1}), (kernel.name, extents)
        # the kernel arguments are the source's, in the source's order
        header = re.search(rf"__kernel void {kernel.name}\(([^)]*)\)", kernel.source).group(1)
        assert [p.name for p in kernel.params] == re.findall(r"(\w+)(?:,|$)", header)


def test_check_limits_flags_kernels_over_the_limit(models):
    _, preset, executable = gpu_build(models, "cnn", "mali")
    kernels = opencl.gpu_kernels(executable)
    most_threads = max(k.threads_per_group for k in kernels)
    most_local = max(k.local_memory_bytes for k in kernels)
    assert most_local > 0
    tight = {"max_threads_per_block": most_threads - 1,
             "max_shared_memory_per_block": most_local - 1}
    violations = opencl.check_limits(kernels, tight)
    threads = [v for v in violations if "threads per work-group" in v]
    local = [v for v in violations if "local memory" in v]
    assert threads and local, violations
    assert any(f"{most_threads} threads per work-group" in v for v in threads)
    assert any(f"{most_local} bytes of local memory > {most_local - 1}" in v for v in local)


def test_build_fails_when_a_kernel_breaks_the_preset_limits(models):
    """A preset whose TVM target lets dlight use 1024 threads, but whose device allows 256:
    compile.build (so compile_model and the CLI) must refuse with one line."""
    mali = resolve_target("mali")
    target = dict(mali.target, max_num_threads=1024, max_threads_per_block=1024)
    preset = dataclasses.replace(mali, name="mali-misconfigured", target=target)
    mod = tvm_compile.import_onnx(models["cnn"], {"x": SHAPE})
    with pytest.raises(opencl.GpuLimitError) as info:
        tvm_compile.build(mod, preset)
    message = str(info.value)
    assert isinstance(info.value, DwsepError) and "\n" not in message
    assert "mali-misconfigured" in message and "> 256" in message, message


def test_cli_compiles_for_mali(tmp_path, models, cl_context):
    import onnx

    from dwsep_compiler.cli import main

    path = tmp_path / "cnn.onnx"
    onnx.save(models["cnn"], str(path))
    out = tmp_path / "out"
    assert main([str(path), "--target", "mali", "--rank", "2", "-o", str(out), "-q"]) == 0
    files = set(p.name for p in out.iterdir())
    assert "model.onnx" in files and ({"model.so", "model.tar"} & files), files
    # the rewritten model that was built, run through the same GPU path on PoCL
    rewritten = onnx.load(str(out / "model.onnx"))
    preset = resolve_target("mali")
    executable = tvm_compile.build(tvm_compile.import_onnx(rewritten, {"x": SHAPE}), preset)
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    (actual,) = pocl.run_on_pocl(executable, [x], context=cl_context)
    (expected,) = run_onnx(rewritten, {"x": x})
    assert rel_error(actual, expected) < 1e-4


def test_run_on_pocl_checks_its_inputs(cl_context, models):
    _, _, executable = gpu_build(models, "cnn", "mali")
    with pytest.raises(DwsepError, match=r"input x: expected \(1, 3, 16, 16\) float32"):
        pocl.run_on_pocl(executable, [np.zeros((1, 3, 8, 8), np.float32)], context=cl_context)
    with pytest.raises(DwsepError, match="launch sizes are not recoverable"):
        opencl.gpu_kernels(tvm.compile(tvm_compile.import_onnx(models["cnn"], {"x": SHAPE}),
                                       target=resolve_target("mali").tvm_target()))
